"""What several lease stores share: the SQL lease table, and how a lost fenced write is worded.

The SQL stores (SQLite, PostgreSQL) keep a lease as one row of the same columns in the same
order; only the column types and how a shard-id set is stored differ, so each passes its own.
A fenced write that loses raises :class:`~kinesis_butler.errors.StaleLease` worded alike in
every store: ``cannot <op> lease <key> at counter <n>: <reason>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from kinesis_butler.errors import StaleLease
from kinesis_butler.models import ExtendedSequenceNumber, Lease

LEASE_COLUMNS: Final = (
    "lease_key",
    "lease_owner",
    "lease_counter",
    "checkpoint",
    "checkpoint_sub",
    "pending_checkpoint",
    "pending_checkpoint_sub",
    "owner_switches",
    "parent_shard_ids",
    "child_shard_ids",
    "starting_hash_key",
    "ending_hash_key",
    "checkpoint_owner",
    "stream_name",
    "shard_id",
)
"""The columns of a lease row in a SQL store, in the order rows are written and read."""
ALL_COLUMNS: Final = frozenset({"app", *LEASE_COLUMNS})
"""The columns of a SQL store's lease table: the application's name, then the lease."""
META_COLUMNS: Final = frozenset({"key", "value"})
"""The columns of a SQL store's meta table, which records the schema version."""
SELECT_LEASE: Final = ", ".join(LEASE_COLUMNS)
"""What a SQL store selects (and returns) to read a lease row."""

UNEXPLAINED: Final = "its counter or owner changed"
"""The reason given when the store could not be read again to say more."""


def column_definitions(types: Mapping[str, str]) -> str:
    """The lease columns of a CREATE TABLE, in order, from each column's declaration."""
    return ", ".join(f"{name} {types[name]}" for name in LEASE_COLUMNS)


def lease_to_row(lease: Lease, ids: Callable[[frozenset[str]], object]) -> tuple[object, ...]:
    """``lease`` as the values of :data:`LEASE_COLUMNS`; ``ids`` stores a shard-id set."""
    cp, pending = lease.checkpoint, lease.pending_checkpoint
    return (
        lease.lease_key, lease.lease_owner, lease.lease_counter, cp.sequence, cp.sub_sequence,
        pending and pending.sequence, pending and pending.sub_sequence, lease.owner_switches_since_checkpoint,
        ids(lease.parent_shard_ids), ids(lease.child_shard_ids), lease.starting_hash_key,
        lease.ending_hash_key, lease.checkpoint_owner, lease.stream_name, lease.shard_id,
    )  # fmt: skip


def lease_from_row(row: Sequence[Any], ids: Callable[[Any], frozenset[str]]) -> Lease:
    """The lease a row of :data:`LEASE_COLUMNS` holds; ``ids`` reads a stored shard-id set."""
    (key, owner, counter, cp, cp_sub, pending, pending_sub, switches, parents, children, start, end, cp_owner,
     stream, shard) = row  # fmt: skip
    return Lease(
        lease_key=key,
        lease_owner=owner,
        lease_counter=counter,
        checkpoint=ExtendedSequenceNumber(cp, cp_sub),
        pending_checkpoint=None if pending is None else ExtendedSequenceNumber(pending, pending_sub or 0),
        owner_switches_since_checkpoint=switches,
        parent_shard_ids=ids(parents),
        child_shard_ids=ids(children),
        starting_hash_key=start,
        ending_hash_key=end,
        checkpoint_owner=cp_owner,
        stream_name=stream,
        shard_id=shard,
    )


def stale_reason(op: str, lease: Lease, stored: Sequence[Any] | None, *, check_owner: bool) -> str:
    """Why the fenced write ``op`` of ``lease`` found no row to update.

    Args:
        op: the write, as in the message (``"renew"``, ``"hand off"``, ...).
        lease: the lease as the caller saw it.
        stored: the stored ``(lease_counter, lease_owner)``, read after the write failed; None
            when the lease is gone.
        check_owner: whether the write was fenced on the owner too.
    """
    if stored is None:
        return "the lease does not exist (it was deleted)"
    counter, owner = stored[0], stored[1]
    if counter != lease.lease_counter:
        return f"its counter moved on to {counter}"
    if check_owner and owner != lease.lease_owner:
        return f"it is owned by {owner!r}, not {lease.lease_owner!r}"
    if op.endswith("hand off"):
        return "it has no owner or a handoff is already under way"
    if "handoff" in op:
        return "no handoff is under way"
    return "it changed and changed back"


def stale_lease(op: str, lease: Lease, reason: str) -> StaleLease:
    """The StaleLease for the fenced write ``op`` of ``lease`` that failed because of ``reason``."""
    key, counter = lease.lease_key, lease.lease_counter
    return StaleLease(
        f"cannot {op} lease {key!r} at counter {counter}: {reason}", lease_key=key, expected_counter=counter
    )

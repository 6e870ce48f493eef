"""The SQLite lease store's SQL: the schema, every statement it runs, and its rows.

Statements take named parameters (``:app``, ``:key``, ``:counter``, ``:owner``, ...). Hash keys
are decimal TEXT: 128-bit values overflow INTEGER. Shard-id sets are sorted JSON arrays.
Positions are (sequence TEXT, sub-sequence INTEGER).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from kinesis_butler.models import ExtendedSequenceNumber, Lease
from kinesis_butler.stores._common import (
    LEASE_COLUMNS,
    SELECT_LEASE,
    column_definitions,
    lease_from_row,
    lease_to_row,
)

_COLUMN_TYPES: Final = {
    "lease_key": "TEXT NOT NULL",
    "lease_owner": "TEXT",
    "lease_counter": "INTEGER NOT NULL",
    "checkpoint": "TEXT NOT NULL",
    "checkpoint_sub": "INTEGER NOT NULL",
    "pending_checkpoint": "TEXT",
    "pending_checkpoint_sub": "INTEGER",
    "owner_switches": "INTEGER NOT NULL",
    "parent_shard_ids": "TEXT NOT NULL",
    "child_shard_ids": "TEXT NOT NULL",
    "starting_hash_key": "TEXT",
    "ending_hash_key": "TEXT",
    "checkpoint_owner": "TEXT",
    "stream_name": "TEXT",
    "shard_id": "TEXT",
}
# WITHOUT ROWID clusters rows by (app, lease_key): listing an app is one range scan that is
# already in lease-key order. The default BINARY collation orders UTF-8 bytes, which is the
# code-point order Python's sorted() uses.
CREATE_LEASES: Final = (
    "CREATE TABLE leases (app TEXT NOT NULL, "
    + column_definitions(_COLUMN_TYPES)
    + ", PRIMARY KEY (app, lease_key)) WITHOUT ROWID"
)
CREATE_META: Final = "CREATE TABLE schema_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
INSERT_VERSION: Final = (
    "INSERT INTO schema_meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING"
)
SELECT_VERSION: Final = "SELECT value FROM schema_meta WHERE key = 'schema_version'"
INSERT: Final = (
    f"INSERT INTO leases (app, {SELECT_LEASE}) VALUES (:app, {', '.join(':' + c for c in LEASE_COLUMNS)}) "  # noqa: S608
    "ON CONFLICT (app, lease_key) DO NOTHING"
)
LIST: Final = f"SELECT {SELECT_LEASE} FROM leases WHERE app = ? ORDER BY lease_key"  # noqa: S608
GET: Final = f"SELECT {SELECT_LEASE} FROM leases WHERE app = ? AND lease_key = ?"  # noqa: S608
EXPLAIN: Final = "SELECT lease_counter, lease_owner FROM leases WHERE app = ? AND lease_key = ?"
DELETE: Final = "DELETE FROM leases WHERE app = :app AND lease_key = :key AND lease_counter = :counter"


def _fenced_update(assignments: str, *, check_owner: bool, extra: str = "") -> str:
    owner = " AND lease_owner IS :owner" if check_owner else ""
    return (
        f"UPDATE leases SET lease_counter = lease_counter + 1{assignments} "  # noqa: S608 - constants only
        f"WHERE app = :app AND lease_key = :key AND lease_counter = :counter{owner}{extra} "
        f"RETURNING {SELECT_LEASE}"
    )


RENEW: Final = _fenced_update("", check_owner=True)
# Right-hand sides see the row as it was, so owner_switches compares against the old owner.
# As in the KCL, taking an unowned lease (or one already ours) is not an owner switch.
TAKE: Final = _fenced_update(
    ", owner_switches = owner_switches + (lease_owner IS NOT NULL AND lease_owner IS NOT :new_owner),"
    " lease_owner = :new_owner, checkpoint_owner = NULL",
    check_owner=False,
)
EVICT: Final = _fenced_update(", lease_owner = NULL, checkpoint_owner = NULL", check_owner=True)
CHECKPOINT: Final = _fenced_update(
    ", checkpoint = :checkpoint, checkpoint_sub = :checkpoint_sub, owner_switches = 0,"
    " pending_checkpoint = :pending_checkpoint, pending_checkpoint_sub = :pending_checkpoint_sub",
    check_owner=True,
)
# Handoff start: the current owner becomes checkpoint_owner; only when none is set.
HANDOFF: Final = _fenced_update(
    ", checkpoint_owner = lease_owner, lease_owner = :new_owner, owner_switches = owner_switches + 1",
    check_owner=True,
    extra=" AND lease_owner IS NOT NULL AND checkpoint_owner IS NULL",
)
_IN_HANDOFF: Final = " AND checkpoint_owner IS NOT NULL"
COMPLETE_HANDOFF: Final = _fenced_update(", checkpoint_owner = NULL", check_owner=False, extra=_IN_HANDOFF)
COMPLETE_HANDOFF_WITH_CHECKPOINT: Final = _fenced_update(
    ", checkpoint_owner = NULL, checkpoint = :checkpoint, checkpoint_sub = :checkpoint_sub,"
    " owner_switches = 0, pending_checkpoint = NULL, pending_checkpoint_sub = NULL",
    check_owner=False,
    extra=_IN_HANDOFF,
)
LINEAGE: Final = _fenced_update(", child_shard_ids = :child_shard_ids", check_owner=False)


def columns(conn: sqlite3.Connection, table: str) -> frozenset[str]:
    """The column names of ``table``; empty when there is no such table."""
    return frozenset(row[0] for row in conn.execute("SELECT name FROM pragma_table_info(?)", (table,)))


def to_json(ids: frozenset[str]) -> str:
    """A shard-id set as stored: a sorted JSON array."""
    return json.dumps(sorted(ids))


def _from_json(text: str) -> frozenset[str]:
    return frozenset(json.loads(text))


def position(column: str, position: ExtendedSequenceNumber | None) -> dict[str, object]:
    """The parameters ``column`` and ``column_sub`` of a position; both None for no position."""
    if position is None:
        return {column: None, f"{column}_sub": None}
    return {column: position.sequence, f"{column}_sub": position.sub_sequence}


def to_params(app: str, lease: Lease) -> dict[str, object]:
    """The parameters of :data:`INSERT`: ``app``, then one per lease column."""
    return {"app": app, **dict(zip(LEASE_COLUMNS, lease_to_row(lease, to_json), strict=True))}


def to_lease(row: Sequence[Any]) -> Lease:
    """The lease a row selected with the lease columns holds."""
    return lease_from_row(row, _from_json)

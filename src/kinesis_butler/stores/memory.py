"""An in-process lease store for unit tests and simulations.

Leases live in a :class:`MemoryBacking`. Each :class:`MemoryLeaseStore` is one worker's
handle on it, so several simulated workers in one process can share one backing and see
each other's writes, exactly as workers sharing a real table would.

Every call yields to the event loop once before it runs. A real store call is always a
suspension point, so code that only works because a store call *doesn't* yield would break
in production; yielding here makes unit tests interleave the way production does, while
staying deterministic (asyncio runs ready callbacks in FIFO order).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import TypeVar

from kinesis_butler.errors import ClosedError, StaleLease
from kinesis_butler.models import ExtendedSequenceNumber, Lease

__all__ = ["MemoryBacking", "MemoryLeaseStore"]

_T = TypeVar("_T")


class MemoryBacking:
    """The shared table behind one or more :class:`MemoryLeaseStore` instances.

    Holds the leases of every application, keyed by application name then lease key.
    Thread-safe, so a backing may also be shared with stores driven from another thread's
    event loop (the sync facade runs the core on a private loop thread).

    Example:
        >>> backing = MemoryBacking()
        >>> worker_a = MemoryLeaseStore("app", backing=backing)
        >>> worker_b = MemoryLeaseStore("app", backing=backing)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[str, dict[str, Lease]] = {}
        self._failures: deque[Exception] = deque()

    def fail_next(self, error: Exception, *, times: int = 1) -> None:
        """Make the next ``times`` calls on any store of this backing raise ``error``.

        Lets tests simulate an unreachable store (e.g. ``StoreUnavailable``) without a real
        outage. A failed call has no effect on the stored leases.

        Args:
            error: the exception to raise.
            times: how many consecutive calls fail.
        """
        with self._lock:
            self._failures.extend([error] * times)

    def leases(self, app: str) -> list[Lease]:
        """A snapshot of ``app``'s leases in lease-key order, for assertions in tests."""
        with self._lock:
            table = self._tables.get(app, {})
            return [table[key] for key in sorted(table)]

    def _apply(self, app: str, action: Callable[[dict[str, Lease]], _T]) -> _T:
        with self._lock:
            if self._failures:
                raise self._failures.popleft()
            return action(self._tables.setdefault(app, {}))


class MemoryLeaseStore:
    """A :class:`~kinesis_butler.stores.LeaseStore` kept in process memory.

    Args:
        app: the application whose leases this store holds.
        backing: the table to use; share one between stores to simulate several workers.
            A fresh, private backing is created when omitted.
    """

    def __init__(self, app: str = "default", *, backing: MemoryBacking | None = None) -> None:
        self._app = app
        self._backing = backing if backing is not None else MemoryBacking()
        self._closed = False

    @property
    def backing(self) -> MemoryBacking:
        """The table this store reads and writes."""
        return self._backing

    @property
    def app(self) -> str:
        """The application whose leases this store holds."""
        return self._app

    def __repr__(self) -> str:
        return f"MemoryLeaseStore(app={self._app!r})"

    async def _call(self, action: Callable[[dict[str, Lease]], _T]) -> _T:
        if self._closed:
            raise ClosedError(f"{self!r} was closed and cannot be used again")
        await asyncio.sleep(0)
        # Checked again: the store may have been closed while this call waited its turn.
        if self._closed:
            raise ClosedError(f"{self!r} was closed and cannot be used again")
        return self._backing._apply(self._app, action)

    async def initialize(self) -> None:
        """Nothing to create; checks the store is open."""
        await self._call(lambda table: None)

    async def list_leases(self) -> list[Lease]:
        """Every lease of this application, in lease-key order."""
        return await self._call(lambda table: [table[key] for key in sorted(table)])

    async def get_lease(self, lease_key: str) -> Lease | None:
        """One lease, or None."""
        return await self._call(lambda table: table.get(lease_key))

    async def create_lease_if_absent(self, lease: Lease) -> bool:
        """Insert ``lease`` unless its key exists. True if it was created."""

        def create(table: dict[str, Lease]) -> bool:
            if lease.lease_key in table:
                return False
            table[lease.lease_key] = lease
            return True

        return await self._call(create)

    async def renew_lease(self, lease: Lease) -> Lease:
        """counter+1; requires the stored counter and owner to match ``lease``."""
        return await self._call(lambda table: _write(table, "renew", lease, check_owner=True, changes={}))

    async def take_lease(self, lease: Lease, owner: str) -> Lease:
        """Become the owner; requires the stored counter to match ``lease``."""

        def take(table: dict[str, Lease]) -> Lease:
            stored = _check(table, "take", lease, check_owner=False)
            # As in the KCL: taking an unowned lease, or one we already own, is no switch.
            switched = stored.lease_owner is not None and stored.lease_owner != owner
            changes = {
                "lease_owner": owner,
                "checkpoint_owner": None,
                "owner_switches_since_checkpoint": stored.owner_switches_since_checkpoint + int(switched),
            }
            return _write(table, "take", lease, check_owner=False, changes=changes)

        return await self._call(take)

    async def evict_lease(self, lease: Lease) -> Lease:
        """Release the lease; requires the stored counter and owner to match ``lease``."""
        changes = {"lease_owner": None, "checkpoint_owner": None}
        return await self._call(
            lambda table: _write(table, "evict", lease, check_owner=True, changes=changes)
        )

    async def checkpoint(
        self,
        lease: Lease,
        checkpoint: ExtendedSequenceNumber,
        *,
        pending_checkpoint: ExtendedSequenceNumber | None = None,
    ) -> Lease:
        """Write the checkpoint; requires the stored counter and owner to match ``lease``."""
        changes = {
            "checkpoint": checkpoint,
            "pending_checkpoint": pending_checkpoint,
            "owner_switches_since_checkpoint": 0,
        }
        return await self._call(
            lambda table: _write(table, "checkpoint", lease, check_owner=True, changes=changes)
        )

    async def initiate_handoff(self, lease: Lease, new_owner: str) -> Lease:
        """Planned move to ``new_owner``; see :meth:`LeaseStore.initiate_handoff`."""

        def handoff(table: dict[str, Lease]) -> Lease:
            stored = _check(table, "hand off", lease, check_owner=True)
            _require_handoff_state(stored, "hand off", starting=True)
            changes = {
                "lease_owner": new_owner,
                "checkpoint_owner": stored.lease_owner,
                "owner_switches_since_checkpoint": stored.owner_switches_since_checkpoint + 1,
            }
            return _write(table, "hand off", lease, check_owner=True, changes=changes)

        return await self._call(handoff)

    async def complete_handoff(self, lease: Lease, checkpoint: ExtendedSequenceNumber | None) -> Lease:
        """The old owner's final write; see :meth:`LeaseStore.complete_handoff`."""

        def complete(table: dict[str, Lease]) -> Lease:
            stored = _check(table, "complete the handoff of", lease, check_owner=False)
            _require_handoff_state(stored, "complete the handoff of", starting=False)
            changes: dict[str, object] = {"checkpoint_owner": None}
            if checkpoint is not None:
                changes |= {
                    "checkpoint": checkpoint,
                    "pending_checkpoint": None,
                    "owner_switches_since_checkpoint": 0,
                }
            return _write(table, "complete the handoff of", lease, check_owner=False, changes=changes)

        return await self._call(complete)

    async def update_lineage(self, lease: Lease, *, child_shard_ids: frozenset[str]) -> Lease:
        """Record the children of a shard; requires the stored counter to match ``lease``."""
        changes = {"child_shard_ids": frozenset(child_shard_ids)}
        return await self._call(
            lambda table: _write(table, "update lineage of", lease, check_owner=False, changes=changes)
        )

    async def delete_lease(self, lease: Lease) -> None:
        """Delete the lease; requires the stored counter to match ``lease``."""

        def delete(table: dict[str, Lease]) -> None:
            _check(table, "delete", lease, check_owner=False)
            del table[lease.lease_key]

        await self._call(delete)

    async def aclose(self) -> None:
        """Mark this handle closed (the backing and its leases stay). Idempotent."""
        self._closed = True


def _check(table: dict[str, Lease], op: str, lease: Lease, *, check_owner: bool) -> Lease:
    """The fencing condition: return the stored lease, or raise StaleLease saying why."""
    key, counter = lease.lease_key, lease.lease_counter
    stored = table.get(key)
    if stored is None:
        reason = "the lease does not exist (it was deleted)"
    elif stored.lease_counter != counter:
        reason = f"its counter moved on to {stored.lease_counter}"
    elif check_owner and stored.lease_owner != lease.lease_owner:
        reason = f"it is owned by {stored.lease_owner!r}, not {lease.lease_owner!r}"
    else:
        return stored
    raise StaleLease(
        f"cannot {op} lease {key!r} at counter {counter}: {reason}",
        lease_key=key,
        expected_counter=counter,
    )


def _require_handoff_state(stored: Lease, op: str, *, starting: bool) -> None:
    if starting and (stored.lease_owner is None or stored.checkpoint_owner is not None):
        reason = "it has no owner" if stored.lease_owner is None else "a handoff is already under way"
    elif not starting and stored.checkpoint_owner is None:
        reason = "no handoff is under way"
    else:
        return
    raise StaleLease(
        f"cannot {op} lease {stored.lease_key!r}: {reason}",
        lease_key=stored.lease_key,
        expected_counter=stored.lease_counter,
    )


def _write(
    table: dict[str, Lease], op: str, lease: Lease, *, check_owner: bool, changes: Mapping[str, object]
) -> Lease:
    stored = _check(table, op, lease, check_owner=check_owner)
    updated = stored.replace(lease_counter=stored.lease_counter + 1, **changes)
    table[lease.lease_key] = updated
    return updated

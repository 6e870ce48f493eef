"""LeaseCoordinator: renews the leases this worker holds, takes new ones, and reports losses.

Expiry follows the KCL: no timestamps are stored; this worker notes on its own monotonic
clock when it first saw each lease's counter value, and a lease is expired when that counter
has not moved for ``failover_time``. Every write goes through a per-lease lock so that a
renewal and a checkpoint of the same lease never race on the counter they are fenced by.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

from kinesis_butler.balancing import plan_takes
from kinesis_butler.config import ConsumerConfig
from kinesis_butler.errors import LeaseLost, StaleLease, StoreError, StoreUnavailable
from kinesis_butler.models import ExtendedSequenceNumber, Lease
from kinesis_butler.stores.base import LeaseStore

__all__ = ["HeldLease", "LeaseCoordinator"]

log = logging.getLogger("kinesis_butler.leasing")


@dataclasses.dataclass(eq=False)
class HeldLease:
    """A lease this worker holds, and the state that fences writes to it."""

    lease: Lease
    acquired_at: float
    last_renewed: float
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # new per acquisition
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    lost: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # set once it is not ours
    released: bool = False  # this worker gave it up on purpose (set before the release write)

    @property
    def key(self) -> str:
        return self.lease.lease_key


class LeaseCoordinator:
    """Owns this worker's view of the lease table.

    Args:
        store: the application's lease store.
        worker_id: this worker's identity in ``leaseOwner``.
        config: timings (failover, renew and take intervals).
        on_acquired: called with each newly taken lease.
        on_lost: called once when a held lease is lost (stolen, expired, deleted).
        clock: a monotonic clock in seconds (virtual in simulations).
    """

    def __init__(
        self,
        store: LeaseStore,
        worker_id: str,
        config: ConsumerConfig,
        *,
        on_acquired: Callable[[HeldLease], None],
        on_lost: Callable[[HeldLease], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.config = config
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._clock = clock
        self.held: dict[str, HeldLease] = {}
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (counter, when first seen)
        self._refused: set[str] = set()  # leases this worker must not take again (failed shards)
        self.taking = True

    # -- observation ---------------------------------------------------------------------
    def _observe(self, leases: list[Lease]) -> set[str]:
        now = self._clock()
        expired: set[str] = set()
        current: dict[str, tuple[int, float]] = {}
        for lease in leases:
            seen = self._seen.get(lease.lease_key)
            if seen is None or seen[0] != lease.lease_counter:
                seen = (lease.lease_counter, now)
            current[lease.lease_key] = seen
            if now - seen[1] >= self.config.failover_time:
                expired.add(lease.lease_key)
        self._seen = current
        return expired

    # -- loops ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Renew and take until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._loop(self.renew_all, self.config.effective_renew_interval))
            group.create_task(self._loop(self.take_round, self.config.effective_take_interval))

    async def _loop(self, step: Callable[[], object], interval: float) -> None:
        while True:
            started = self._clock()
            try:
                await step()  # type: ignore[misc]
            except StoreError as exc:
                log.warning("lease store error (will retry): %s", exc)
            await asyncio.sleep(max(0.0, interval - (self._clock() - started)))

    async def take_round(self) -> list[HeldLease]:
        """Read the table, then take this worker's share of free and expired leases."""
        leases = await self.store.list_leases()
        expired = self._observe(leases)
        self._check_held_against(leases)
        if not self.taking:
            return []
        candidates = [lease for lease in leases if lease.lease_key not in self._refused]
        plan = plan_takes(candidates, self.worker_id, expired, max_leases=self.config.max_leases)
        taken: list[HeldLease] = []
        for lease in plan.take:
            if lease.lease_key in self.held:
                continue
            try:
                stored = await self.store.take_lease(lease, self.worker_id)
            except StaleLease:
                continue  # someone else moved it first; fine
            now = self._clock()
            held = HeldLease(stored, acquired_at=now, last_renewed=now)
            self.held[stored.lease_key] = held
            self._seen[stored.lease_key] = (stored.lease_counter, now)
            log.info("took lease %s (counter %d)", stored.lease_key, stored.lease_counter)
            taken.append(held)
            self._on_acquired(held)
        return taken

    def _check_held_against(self, leases: list[Lease]) -> None:
        by_key = {lease.lease_key: lease for lease in leases}
        for held in list(self.held.values()):
            if held.lock.locked():
                continue  # a write is in flight; its result is the truth
            stored = by_key.get(held.key)
            if stored is None or stored.lease_owner != self.worker_id:
                self._lose(held, "deleted" if stored is None else f"now owned by {stored.lease_owner}")

    async def renew_all(self) -> None:
        """Renew every held lease once; lose those whose renewal is refused or too late."""
        await asyncio.gather(*(self._renew(held) for held in list(self.held.values())))

    async def _renew(self, held: HeldLease) -> None:
        async with held.lock:
            if held.lost.is_set():
                return
            try:
                held.lease = await self.store.renew_lease(held.lease)
                held.last_renewed = self._clock()
            except StaleLease:
                self._lose(held, "renewal refused: the lease counter moved on")
            except StoreUnavailable as exc:
                # Keep processing what we hold until others could consider it expired.
                if self._clock() - held.last_renewed >= self.config.failover_time:
                    self._lose(held, f"not renewed for the failover time ({exc})")
                else:
                    log.warning("could not renew %s (will retry): %s", held.key, exc)

    def _lose(self, held: HeldLease, why: str) -> None:
        if self.held.get(held.key) is held:
            del self.held[held.key]
        if not held.lost.is_set():
            held.lost.set()
            log.warning("lost lease %s: %s", held.key, why)
            self._on_lost(held)

    # -- writes on behalf of shard loops ---------------------------------------------------
    async def checkpoint(
        self,
        held: HeldLease,
        position: ExtendedSequenceNumber,
        *,
        pending: ExtendedSequenceNumber | None = None,
    ) -> Lease:
        """Write a checkpoint for a held lease; LeaseLost if it is gone."""
        async with held.lock:
            if held.lost.is_set() or held.released:
                raise LeaseLost(
                    f"lease {held.key} was lost; checkpoint {position} refused", lease_key=held.key
                )
            try:
                held.lease = await self.store.checkpoint(held.lease, position, pending_checkpoint=pending)
            except StaleLease:
                self._lose(held, "checkpoint refused: the lease counter moved on")
                raise LeaseLost(
                    f"lease {held.key} is owned by another worker now; checkpoint {position} refused",
                    lease_key=held.key,
                ) from None
            held.last_renewed = self._clock()
            return held.lease

    async def update_children(self, held: HeldLease, child_ids: frozenset[str]) -> None:
        async with held.lock:
            if held.lost.is_set():
                return
            try:
                held.lease = await self.store.update_lineage(held.lease, child_shard_ids=child_ids)
            except StaleLease:
                self._lose(held, "lineage update refused")

    async def release(self, held: HeldLease) -> None:
        """Give a held lease up so that any worker can take it at once."""
        async with held.lock:
            if self.held.get(held.key) is held:
                del self.held[held.key]
            if held.lost.is_set() or held.released:
                return
            held.released = True
            try:
                await self.store.evict_lease(held.lease)
                log.info("released lease %s", held.key)
            except StaleLease:
                log.info("lease %s was already taken over when released", held.key)
            finally:
                held.lost.set()

    def refuse(self, lease_key: str) -> None:
        """Never take ``lease_key`` again in this worker (its processor failed for good)."""
        self._refused.add(lease_key)

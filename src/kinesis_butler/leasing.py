"""LeaseCoordinator: renews the leases this worker holds, takes and steals new ones, hands
leases over gracefully, and reports losses.

Expiry follows the KCL: no timestamps are stored; this worker notes on its own monotonic
clock when it first saw each lease's counter value, and a lease is expired when that counter
has not moved for ``failover_time``. Every write goes through a per-lease lock so that a
renewal and a checkpoint of the same lease never race on the counter they are fenced by.

Planned moves use a graceful handoff (the KCL 3 ``checkpointOwner`` protocol)::

    thief                               store                         owner
    initiate_handoff ─────────► owner=thief, checkpointOwner=owner
                                               ◄──── renew refused (counter moved): re-read,
                                                     sees checkpointOwner == me: finish the
                                                     in-flight batch, checkpoint locally
                                 checkpoint, checkpointOwner=∅ ◄──── complete_handoff
    sees checkpointOwner=∅ ─► starts exactly after the final checkpoint (no duplicates)

If the owner dies mid-handoff, the counter stops moving; after the failover time the thief
takes the lease over (which clears ``checkpointOwner``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from kinesis_butler.balancing import plan_takes
from kinesis_butler.config import ConsumerConfig
from kinesis_butler.errors import CheckpointError, LeaseLost, StaleLease, StoreError, StoreUnavailable
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
    handoff: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # another worker asked for it
    # Accepted but not yet in the store: during a handoff (written by its final write), or
    # during a store outage for a non-waiting checkpoint (written when the store returns).
    unwritten_checkpoint: ExtendedSequenceNumber | None = None

    @property
    def key(self) -> str:
        return self.lease.lease_key


@dataclasses.dataclass
class _Incoming:
    """A lease this worker asked for by handoff and is waiting to receive."""

    lease: Lease  # as stored right after initiate_handoff
    since: float  # when its counter was last seen to change


class LeaseCoordinator:
    """Owns this worker's view of the lease table.

    Args:
        store: the application's lease store.
        worker_id: this worker's identity in ``leaseOwner``.
        config: timings (failover, renew and take intervals).
        on_acquired: called with each newly taken lease.
        on_lost: called once when a held lease is lost (stolen, expired, deleted).
        on_handoff: called once when another worker asked for a held lease; the shard should
            finish its in-flight batch and stop, then :meth:`release` completes the handoff.
        eligible: which lease keys this worker may take (e.g. those of the streams it reads).
        clock: a monotonic clock in seconds (virtual in simulations).
        sleep: the sleep used by the loops (virtual in simulations).
    """

    def __init__(
        self,
        store: LeaseStore,
        worker_id: str,
        config: ConsumerConfig,
        *,
        on_acquired: Callable[[HeldLease], None],
        on_lost: Callable[[HeldLease], None],
        on_handoff: Callable[[HeldLease], None] = lambda held: None,
        eligible: Callable[[Lease], bool] = lambda lease: True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.config = config
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._on_handoff = on_handoff
        self._eligible = eligible
        self._clock = clock
        self._sleep = sleep
        self.held: dict[str, HeldLease] = {}
        self.incoming: dict[str, _Incoming] = {}
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (counter, when first seen)
        self._refused: set[str] = set()  # leases this worker must not take again (failed shards)
        # Positions processed but never written because the store was down when the lease was
        # lost: (the counter the lease had, the position). Written if we take the lease back
        # with that same counter, i.e. nobody else touched it in between.
        self._orphaned: dict[str, tuple[int, ExtendedSequenceNumber]] = {}
        self._releasing: set[str] = set()  # leases whose release write is in flight
        self.taking = True

    @property
    def stopping(self) -> bool:
        return not self.taking

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
        """Renew, take and receive handoffs until cancelled."""
        handoff_poll = min(0.5, self.config.effective_take_interval)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._loop(self.renew_all, self.config.effective_renew_interval))
            group.create_task(self._loop(self.take_round, self.config.effective_take_interval))
            group.create_task(self._loop(self.receive_handoffs, handoff_poll))
            group.create_task(self._loop(self.watchdog, min(0.25, self.config.effective_renew_interval / 4)))

    @property
    def self_fence_after(self) -> float:
        """Seconds without a successful write after which we stop working on a lease: a little
        before others may judge it expired (they wait the failover time from when they first
        saw its counter, which is no earlier than our last write)."""
        return self.config.failover_time - min(
            self.config.effective_renew_interval, self.config.failover_time / 5
        )

    async def watchdog(self) -> None:
        """Drop leases not renewed in time, even while a store call hangs (it holds the lease
        lock, so the renewal path itself could not decide)."""
        now = self._clock()
        for held in list(self.held.values()):
            if held.handoff.is_set() or held.released or held.lost.is_set():
                continue
            if now - held.last_renewed >= self.self_fence_after:
                self._lose(
                    held,
                    f"not renewed for {now - held.last_renewed:.1f} s (the store is unreachable or slow)",
                )

    async def _loop(self, step: Callable[[], Awaitable[object]], interval: float) -> None:
        while True:
            started = self._clock()
            try:
                await step()
            except StoreError as exc:
                log.warning("lease store error (will retry): %s", exc)
            await self._sleep(max(0.0, interval - (self._clock() - started)))

    async def take_round(self) -> list[HeldLease]:
        """Read the table, take free and expired leases, and start handoffs of stolen ones."""
        leases = await self.store.list_leases()
        expired = self._observe(leases)
        await self._check_held_against(leases)
        for lease in leases:
            if lease.checkpoint_owner == self.worker_id and lease.lease_key not in self.held:
                await self._hand_back_unstarted(lease)
        if not self.taking:
            return []
        # Leases on their way to us stay in: they are ours (lease_owner) and count toward our
        # share; plan_takes never takes or steals a lease whose handoff is under way.
        candidates = [
            lease for lease in leases if lease.lease_key not in self._refused and self._eligible(lease)
        ]
        plan = plan_takes(candidates, self.worker_id, expired, max_leases=self.config.max_leases)
        taken: list[HeldLease] = []
        for lease in plan.take:
            if lease.lease_key in self.held:
                continue
            started = self._clock()
            try:
                stored = await self.store.take_lease(lease, self.worker_id)
            except StaleLease:
                continue  # someone else moved it first; fine
            if self.stopping:  # shutdown began while we were taking it: give it straight back
                with contextlib.suppress(StaleLease):
                    await self.store.evict_lease(stored)
                continue
            stored = await self._adopt_orphan(lease, stored)
            taken.append(self._hold(stored, "took", written_at=started))
        for lease in plan.steal:
            asked = await self._initiate_handoff(lease)
            if asked is None:
                continue
            log.info("asked %s to hand over lease %s", lease.lease_owner, lease.lease_key)
            self.incoming[asked.lease_key] = _Incoming(asked, self._clock())
        return taken

    async def _initiate_handoff(self, lease: Lease) -> Lease | None:
        """Ask ``lease``'s owner to hand it over. When the owner renewed it since we read it (a
        renewal landing in the same instant as our take round is common when workers start
        together and tick in step), re-read it and ask once more if nothing but the counter
        changed; otherwise give up for this round."""
        try:
            return await self.store.initiate_handoff(lease, self.worker_id)
        except StaleLease:
            fresh = await self.store.get_lease(lease.lease_key)
        if fresh is None or fresh.lease_owner != lease.lease_owner or fresh.checkpoint_owner is not None:
            return None
        try:
            return await self.store.initiate_handoff(fresh, self.worker_id)
        except StaleLease:
            return None

    def _hold(self, stored: Lease, how: str, *, written_at: float | None = None) -> HeldLease:
        now = self._clock()
        held = HeldLease(stored, acquired_at=now, last_renewed=now if written_at is None else written_at)
        self.held[stored.lease_key] = held
        self._seen[stored.lease_key] = (stored.lease_counter, now)
        log.info("%s lease %s (counter %d)", how, stored.lease_key, stored.lease_counter)
        self._on_acquired(held)
        return held

    async def receive_handoffs(self) -> list[HeldLease]:
        """Start the leases whose old owner completed the handoff; take over stuck ones."""
        received: list[HeldLease] = []
        for key, incoming in list(self.incoming.items()):
            started = self._clock()
            current = await self.store.get_lease(key)
            now = self._clock()
            if current is None or current.lease_owner != self.worker_id or not self.taking:
                del self.incoming[key]  # deleted, taken by someone else, or we are stopping
                if current is not None:
                    await self._hand_back_unstarted(current)
                continue
            if current.checkpoint_owner is None:
                del self.incoming[key]
                if current.checkpoint.is_shard_end:
                    # The old owner read it to its end before handing over: nothing left to do.
                    with contextlib.suppress(StaleLease):
                        await self.store.evict_lease(current)
                    continue
                received.append(self._hold(current, "received", written_at=started))
                continue
            if current.lease_counter != incoming.lease.lease_counter:
                self.incoming[key] = _Incoming(current, now)
            elif now - incoming.since >= self.config.failover_time:
                # The old owner stopped writing mid-handoff: it died. Take it over.
                del self.incoming[key]
                try:
                    stored = await self.store.take_lease(current, self.worker_id)
                except StaleLease:
                    continue
                received.append(self._hold(stored, "took over stuck handoff of", written_at=now))
        return received

    async def _hand_back_unstarted(self, lease: Lease) -> None:
        """A handoff names us as the old owner of a lease we never started (it was stolen from
        us while it was still on its way to us, or we restarted): nothing of ours to write, so
        complete it at once instead of making the new owner wait out the failover time."""
        if lease.checkpoint_owner != self.worker_id or lease.lease_key in self.held:
            return
        if lease.lease_key in self._releasing:
            return  # our own release is writing the final checkpoint right now
        with contextlib.suppress(StaleLease):
            await self.store.complete_handoff(lease, None)
            log.info(
                "handed over lease %s, which we had not started, to %s", lease.lease_key, lease.lease_owner
            )

    async def _check_held_against(self, leases: list[Lease]) -> None:
        by_key = {lease.lease_key: lease for lease in leases}
        for held in list(self.held.values()):
            if held.lock.locked() or held.handoff.is_set():
                continue  # a write is in flight (its result is the truth), or already handing off
            stored = by_key.get(held.key)
            if stored is None or stored.lease_owner != self.worker_id:
                async with held.lock:
                    await self._stale(held, "the lease table shows another owner")

    async def renew_all(self) -> None:
        """Renew every held lease once; lose those whose renewal is refused or too late."""
        await asyncio.gather(*(self._renew(held) for held in list(self.held.values())))

    async def _renew(self, held: HeldLease) -> None:
        async with held.lock:
            if held.lost.is_set() or held.handoff.is_set() or held.released:
                return  # during a handoff the lease belongs to the new owner: no writes
            started = self._clock()
            try:
                renewed = await self.store.renew_lease(held.lease)
                if held.lost.is_set():
                    return  # the watchdog gave it up while the call hung: the lease is not ours
                held.lease = renewed
                held.last_renewed = started  # when the write began: the safe side
                if held.unwritten_checkpoint is not None:  # the store is back: catch up
                    held.lease = await self.store.checkpoint(held.lease, held.unwritten_checkpoint)
                    held.unwritten_checkpoint = None
            except StaleLease:
                await self._stale(held, "renewal refused: the lease counter moved on")
            except StoreUnavailable as exc:
                # Keep processing what we hold until others could consider it expired.
                if self._clock() - held.last_renewed >= self.self_fence_after:
                    self._lose(held, f"not renewed for the failover time ({exc})")
                else:
                    log.warning("could not renew %s (will retry): %s", held.key, exc)

    async def _stale(self, held: HeldLease, why: str) -> bool:
        """A fenced write to ``held`` failed (lock held): is it a handoff request or a loss?
        Returns True for a handoff."""
        try:
            current = await self.store.get_lease(held.key)
        except StoreError:
            current = None
        if (
            current is not None
            and current.checkpoint_owner == self.worker_id
            and current.lease_owner != self.worker_id
        ):
            held.lease = current  # the counter our final write is fenced by
            if not held.handoff.is_set():
                held.handoff.set()
                log.info("handing lease %s over to %s", held.key, current.lease_owner)
                self._on_handoff(held)
            return True
        self._lose(held, why if current is None else f"{why}; now owned by {current.lease_owner}")
        return False

    async def _adopt_orphan(self, seen: Lease, stored: Lease) -> Lease:
        orphan = self._orphaned.pop(stored.lease_key, None)
        if orphan is None or orphan[0] != seen.lease_counter or not stored.checkpoint < orphan[1]:
            return stored
        try:
            stored = await self.store.checkpoint(stored, orphan[1])
        except StoreError as exc:
            log.warning(
                "could not write the checkpoint kept through the outage for %s: %s", stored.lease_key, exc
            )
        else:
            log.info("wrote checkpoint %s of %s kept through the store outage", orphan[1], stored.lease_key)
        return stored

    def _lose(self, held: HeldLease, why: str) -> None:
        if held.unwritten_checkpoint is not None and not held.handoff.is_set():
            self._orphaned[held.key] = (held.lease.lease_counter, held.unwritten_checkpoint)
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
        wait: bool = True,
    ) -> Lease:
        """Write a checkpoint for a held lease; LeaseLost if it is gone.

        During a handoff the position is kept and written by the handoff's final write. With
        ``wait=False`` a store outage does not block: the position is kept and written by the
        next renewal that reaches the store (the lease is lost if none does within the
        failover time, and the next owner then starts from the last written checkpoint)."""
        async with held.lock:
            if held.lost.is_set() or held.released:
                raise LeaseLost(
                    f"lease {held.key} was lost; checkpoint {position} refused", lease_key=held.key
                )
            # Checked here, under the lock, so that two concurrent checkpoints cannot both pass
            # a check made against a position that the other one is about to replace.
            current = held.unwritten_checkpoint or held.lease.checkpoint
            if position < current:
                raise CheckpointError(
                    f"checkpoint {position} on {held.key} goes backwards (stored: {current})"
                )
            if position == current:
                return held.lease
            if not held.handoff.is_set():
                try:
                    held.lease = await self._write_checkpoint(held, position, pending, wait=wait)
                    held.unwritten_checkpoint = None
                    return held.lease
                except StoreUnavailable:
                    held.unwritten_checkpoint = position  # only raised when not waiting
                    return held.lease
                except StaleLease:
                    if not await self._stale(held, "checkpoint refused: the lease counter moved on"):
                        raise LeaseLost(
                            f"lease {held.key} is owned by another worker now; checkpoint {position} refused",
                            lease_key=held.key,
                        ) from None
            held.unwritten_checkpoint = position
            return held.lease

    async def _write_checkpoint(
        self,
        held: HeldLease,
        position: ExtendedSequenceNumber,
        pending: ExtendedSequenceNumber | None,
        *,
        wait: bool = True,
    ) -> Lease:
        """The store write, retried through a store outage for as long as the lease is ours:
        until others could consider it expired. Then the lease is lost (LeaseLost), rather
        than the processor failing its batch over and over."""
        delay = 0.1
        while True:
            started = self._clock()
            try:
                lease = await self.store.checkpoint(held.lease, position, pending_checkpoint=pending)
            except StoreUnavailable as exc:
                if not wait and self._clock() - held.last_renewed < self.self_fence_after:
                    log.warning("checkpoint of %s deferred until the store answers: %s", held.key, exc)
                    raise
                if held.lost.is_set() or self._clock() - held.last_renewed >= self.self_fence_after:
                    self._lose(held, f"the store was unreachable for the failover time ({exc})")
                    raise LeaseLost(
                        f"lease {held.key}: the store was unreachable for the failover time; "
                        f"checkpoint {position} not written",
                        lease_key=held.key,
                    ) from exc
                log.warning("checkpoint of %s failed (will retry in %.1f s): %s", held.key, delay, exc)
                await self._sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if held.lost.is_set():  # the watchdog gave it up while the write was in flight
                raise LeaseLost(
                    f"lease {held.key} was given up; checkpoint {position} refused", lease_key=held.key
                )
            held.last_renewed = started
            return lease

    async def update_children(self, held: HeldLease, child_ids: frozenset[str]) -> None:
        async with held.lock:
            if held.lost.is_set() or held.handoff.is_set():
                return
            try:
                held.lease = await self.store.update_lineage(held.lease, child_shard_ids=child_ids)
            except StaleLease:
                await self._stale(held, "lineage update refused")

    async def release(self, held: HeldLease) -> None:
        """Give a held lease up: complete a handoff (final checkpoint for the new owner), or
        clear the owner so that any worker can take it at once."""
        async with held.lock:
            if self.held.get(held.key) is held:
                del self.held[held.key]
            if held.lost.is_set() or held.released:
                return
            held.released = True
            self._releasing.add(held.key)
            try:
                if held.handoff.is_set():
                    await self.store.complete_handoff(held.lease, held.unwritten_checkpoint)
                    log.info(
                        "handed lease %s over at %s",
                        held.key,
                        held.unwritten_checkpoint or held.lease.checkpoint,
                    )
                else:
                    if held.unwritten_checkpoint is not None:
                        held.lease = await self.store.checkpoint(held.lease, held.unwritten_checkpoint)
                    await self.store.evict_lease(held.lease)
                    log.info("released lease %s", held.key)
            except StaleLease:
                log.info("lease %s was already taken over when released", held.key)
            except StoreError as exc:
                log.warning("could not release lease %s (it will expire instead): %s", held.key, exc)
            finally:
                self._releasing.discard(held.key)
                held.lost.set()

    def refuse(self, lease_key: str) -> None:
        """Never take ``lease_key`` again in this worker (its processor failed for good)."""
        self._refused.add(lease_key)

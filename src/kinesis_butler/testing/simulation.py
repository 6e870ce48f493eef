"""Deterministic simulation of a consumer group: virtual time, FakeKinesis, a shared
MemoryBacking and scheduled faults. tests/unit/test_simulation.py checks the invariants of its
runs; bench/rebalance.py and bench/failover.py measure with it.

:class:`VirtualEventLoop`'s clock only moves when nothing is ready to run, then jumps to the
next timer (trio's autojump clock), so sleeps and timeouts end at once, in an order fixed by the
schedule; :func:`virtual_clocks` points the library's ``time.monotonic``/``time.time`` at it.
No thread may run (its work would not advance virtual time): processors are ``async def``.

Faults (:class:`Event`): ``crash`` = SIGKILL (every later store, Kinesis and processor call of
the worker hangs: no more writes, no graceful shutdown); ``pause`` freezes the process, which
resumes with its stale view (the zombie fencing must stop); ``slow_store`` delays each store
call, half before the store applies it and half before the reply; ``outage`` fails store
calls; ``leave`` stops gracefully; ``split``/``merge`` reshard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from typing import Any, Literal, TypeVar, cast

from kinesis_butler.config import ConsumerConfig
from kinesis_butler.consumer import AsyncConsumer, KinesisApi
from kinesis_butler.errors import StoreUnavailable
from kinesis_butler.models import ExtendedSequenceNumber, Lease, Shard
from kinesis_butler.processor import (
    InitializationInput,
    ProcessRecordsInput,
    RecordProcessorBase,
    ShutdownRequestedInput,
)
from kinesis_butler.stores.memory import MemoryBacking, MemoryLeaseStore
from kinesis_butler.testing.fake import FakeKinesis
from kinesis_butler.testing.virtual_time import (
    SimulationDeadlock,
    VirtualEventLoop,
    run_simulation,
    virtual_clocks,
)

__all__ = ["Delivery", "Event", "Simulation", "SimulationDeadlock", "Snapshot", "Tenure", "VirtualEventLoop"]
__all__ += ["WorkerState", "balanced", "run_simulation", "virtual_clocks"]

_T = TypeVar("_T")

EventKind = Literal["join", "leave", "crash", "pause", "slow_store", "outage", "split", "merge"]
_LASTING = frozenset({"pause", "slow_store", "outage"})


@dataclasses.dataclass(frozen=True)
class Event:
    """A scheduled action. ``seconds``: how long a pause, outage or slow store lasts; ``delay``:
    the slow store's latency per call; ``shard``: for split/merge, an index into the open
    shards in hash-key order (modulo their number; a merge takes that shard and the next)."""

    at: float
    kind: EventKind
    worker: str = ""
    seconds: float = math.inf
    delay: float = 0.0
    shard: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One batch handed to a processor. ``since_write``: seconds since the lease's counter last
    moved with this worker as its owner, under the claim this tenure runs on (infinite if the
    worker claimed the lease anew after this tenure began): what other workers' expiry
    clocks measure."""

    index: int  # position in the global order of deliveries
    at: float
    worker: str
    tenure: int
    shard: str
    sequences: tuple[int, ...]
    attempt: int
    since_write: float


@dataclasses.dataclass(frozen=True, slots=True)
class Tenure:
    """One processor instance: one acquisition of a lease by a worker."""

    worker: str
    shard: str
    started: float  # when ``initialize`` ran
    checkpoint: ExtendedSequenceNumber  # where it started reading


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """Lease ownership right after a write that changed it."""

    at: float
    owners: Mapping[str, str | None]
    finished: frozenset[str]  # at SHARD_END
    handoffs: frozenset[str]  # checkpoint_owner set

    @classmethod
    def of(cls, at: float, leases: Sequence[Lease]) -> Snapshot:
        owners = {lease.lease_key: lease.lease_owner for lease in leases}
        finished = frozenset(lease.lease_key for lease in leases if lease.checkpoint.is_shard_end)
        return cls(
            at, owners, finished, frozenset(lease.lease_key for lease in leases if lease.checkpoint_owner)
        )


def balanced(snapshot: Snapshot, workers: Collection[str]) -> bool:
    """Every active lease is owned by one of ``workers``, none is mid-handoff, and the
    workers' counts differ by at most one."""
    active = [owner for key, owner in snapshot.owners.items() if key not in snapshot.finished]
    if snapshot.handoffs - snapshot.finished or any(owner not in workers for owner in active):
        return False
    counts = Counter({worker: 0 for worker in workers}) + Counter(active)
    return max(counts.values(), default=0) - min((counts[w] for w in workers), default=0) <= 1


@dataclasses.dataclass(eq=False)
class WorkerState:
    """A simulated worker and the faults applied to it."""

    name: str
    consumer: AsyncConsumer
    task: asyncio.Task[None]
    crashed: bool = False
    left: bool = False
    frozen_until: float = 0.0
    outage_until: float = 0.0
    slow_until: float = 0.0
    slow_delay: float = 0.0
    pauses: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (start, end)
    held_at_crash: tuple[str, ...] = ()


def _shape(lease: Lease) -> tuple[str | None, str | None, bool]:
    return lease.lease_owner, lease.checkpoint_owner, lease.checkpoint.is_shard_end


class _SimStore(MemoryLeaseStore):
    """One worker's handle on the shared backing, behind its faults. Every MemoryLeaseStore
    call goes through ``_call``; the leases it changed are reported to the simulation."""

    def __init__(self, sim: Simulation, worker: str) -> None:
        super().__init__(sim.app, backing=sim.backing)
        self._sim, self._worker = sim, worker

    async def _call(self, action: Callable[[dict[str, Lease]], _T]) -> _T:
        sim, w = self._sim, self._sim.workers[self._worker]
        await sim._gate(w)
        delay = w.slow_delay if sim.now < w.slow_until else 0.0
        if delay:
            await asyncio.sleep(delay / 2)  # the request travels
            await sim._gate(w)
        if sim.now < w.outage_until:
            raise StoreUnavailable(f"simulated outage of {w.name}'s lease store")
        changed: list[tuple[Lease | None, Lease | None]] = []

        def observed(table: dict[str, Lease]) -> _T:
            before = dict(table)
            result = action(table)  # under the backing's lock: nothing else changes the table
            changed.extend((before.get(key), new) for key, new in table.items() if before.get(key) is not new)
            changed.extend((old, None) for key, old in before.items() if key not in table)
            return result

        result = await super()._call(observed)
        sim._stored(w.name, changed)
        if delay:
            await asyncio.sleep(delay / 2)  # the reply travels: applied, not yet known to the worker
        await sim._gate(w)  # a crashed or paused process does not see the reply
        return result


class _SimKinesis:
    """One worker's view of the shared FakeKinesis: each call first passes the worker's gate."""

    def __init__(self, sim: Simulation, worker: str) -> None:
        self._sim, self._worker = sim, worker

    def __getattr__(self, name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        call = getattr(self._sim.fake, name)

        async def gated(*args: Any, **kwargs: Any) -> Any:
            await self._sim._gate(self._sim.workers[self._worker])
            return await call(*args, **kwargs)

        return gated


class _Recorder(RecordProcessorBase):
    """Every simulated worker's processor: records each batch, works ``processing_time``, and
    checkpoints every ``checkpoint_every`` batches (0: only on shutdown) without waiting on
    the store, as the function API does."""

    def __init__(self, sim: Simulation, worker: str) -> None:
        self._sim, self._worker = sim, worker
        self._tenure = next(sim._tenure_ids)
        self._batches = 0

    async def initialize(self, initialization_input: InitializationInput) -> None:
        sim, inp = self._sim, initialization_input
        await sim._gate(sim.workers[self._worker])
        sim.tenures[self._tenure] = Tenure(self._worker, inp.shard_id, sim.now, inp.checkpoint)

    async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
        sim, inp = self._sim, process_records_input
        await sim._gate(sim.workers[self._worker])
        sim._delivered(self._worker, self._tenure, inp)
        await asyncio.sleep(sim.processing_time)
        self._batches += 1
        if sim.checkpoint_every and self._batches % sim.checkpoint_every == 0:
            await inp.checkpointer.checkpoint(wait=False)

    async def shutdown_requested(self, shutdown_requested_input: ShutdownRequestedInput) -> None:
        await shutdown_requested_input.checkpointer.checkpoint()


class Simulation:
    """Workers of one application on a FakeKinesis stream, driven through ``events``: a producer
    puts a record into every open shard each ``produce_interval`` until ``drain`` seconds before
    the end, which is ``quiet`` seconds after the last fault ended. Deterministic per ``seed``."""

    def __init__(
        self,
        events: Sequence[Event],
        *,
        shards: int = 4,
        config: ConsumerConfig | None = None,
        quiet: float | None = None,
        drain: float = 5.0,
        produce_interval: float = 1.0,
        processing_time: float = 0.05,
        checkpoint_every: int = 1,
        seed: int = 0,
    ) -> None:
        self.events = sorted(events, key=lambda event: event.at)
        self.config = config or ConsumerConfig()
        self.quiet = quiet if quiet is not None else max(60.0, 6 * self.config.failover_time)
        self.shard_count, self.drain, self.produce_interval = shards, drain, produce_interval
        self.processing_time, self.checkpoint_every, self.seed = processing_time, checkpoint_every, seed
        self.app = self.stream = "sim"
        self.fake, self.backing = FakeKinesis(), MemoryBacking()
        self.workers: dict[str, WorkerState] = {}
        self.applied: list[Event] = []  # the events that took effect, at the time they did
        self.deliveries: list[Delivery] = []
        self.tenures: dict[int, Tenure] = {}
        self.snapshots: list[Snapshot] = []
        self.written: dict[str, list[int]] = defaultdict(list)  # shard -> its sequence numbers, in order
        self.regressions: list[str] = []  # checkpoints that went backwards
        self.failures: dict[str, list[str]] = {}  # running workers' shard errors at the end
        self.exits: dict[str, BaseException | None] = {}  # workers whose run() ended by itself
        self.end, self.final, self.shards = 0.0, Snapshot.of(0.0, []), list[Shard]()
        self._tenure_ids = itertools.count()
        self._last_write: dict[tuple[str, str], float] = {}  # (owner, key) -> its counter last moved
        self._claimed: dict[tuple[str, str], float] = {}  # (worker, key) -> when it became the owner
        self._checkpoint: dict[str, ExtendedSequenceNumber] = {}
        self._closing = False
        self._keys: dict[str, str] = {}  # shard -> a partition key that hashes into it

    @property
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    @property
    def live(self) -> list[str]:
        """The workers still running (not crashed, left or exited)."""
        return sorted(n for n, w in self.workers.items() if not (w.crashed or w.left or n in self.exits))

    def run(self) -> Simulation:
        run_simulation(self._main, seed=self.seed)
        return self

    async def _main(self) -> None:
        self._teardown = asyncio.Event()
        self.fake.create_stream(self.stream, self.shard_count)
        # A call made at the last moment of a slow spell still takes ``delay``.
        ends = [
            e.at + (e.seconds + e.delay if e.kind in _LASTING and e.seconds < math.inf else 0)
            for e in self.events
        ]
        self.end = max(ends, default=0.0) + self.quiet
        producer = asyncio.create_task(self._produce(self.end - self.drain))
        for event in self.events:
            await asyncio.sleep(max(0.0, event.at - self.now))
            await self._apply(event)
        await asyncio.sleep(max(0.0, self.end - self.now))
        await producer
        self._closing = True  # what follows is teardown, not part of the run
        self.final = Snapshot.of(self.now, self.backing.leases(self.app))
        self.shards = await self.fake.list_shards(self.stream)
        for w in self.workers.values():
            if not (w.crashed or w.left):
                if w.task.done():
                    self.exits[w.name] = None if w.task.cancelled() else w.task.exception()
                self.failures[w.name] = [str(failure) for failure in w.consumer.failures]
                w.consumer.request_stop()
        self._teardown.set()  # crashed workers' hung calls fail now, so their tasks can end
        for w in self.workers.values():
            if w.crashed:
                w.task.cancel()
        await asyncio.gather(*(w.task for w in self.workers.values()), return_exceptions=True)

    async def _produce(self, until: float) -> None:
        while self.now < until:
            for shard in await self.fake.list_shards(self.stream):
                if not shard.is_closed:
                    record = self.fake.put(self.stream, b"x", self._key_for(shard))
                    self.written[shard.shard_id].append(int(record.sequence_number))
            await asyncio.sleep(self.produce_interval)

    def _key_for(self, shard: Shard) -> str:
        for n in itertools.count() if shard.shard_id not in self._keys else ():
            digest = int(hashlib.md5(f"k{n}".encode()).hexdigest(), 16)  # noqa: S324 - Kinesis's hash
            if shard.starting_hash_key <= digest <= shard.ending_hash_key:
                self._keys[shard.shard_id] = f"k{n}"
                break
        return self._keys[shard.shard_id]

    async def _apply(self, event: Event) -> None:
        now, w, name = self.now, self.workers.get(event.worker), event.worker
        if event.kind in ("split", "merge"):
            shards = [s for s in await self.fake.list_shards(self.stream) if not s.is_closed]
            shards.sort(key=lambda shard: shard.starting_hash_key)  # open shards tile the hash range
            i = event.shard % max(1, len(shards) - (event.kind == "merge"))
            if event.kind == "split":
                self.fake.split(self.stream, shards[i].shard_id)
            elif len(shards) > 1:
                self.fake.merge(self.stream, shards[i].shard_id, shards[i + 1].shard_id)
        elif event.kind == "join" and w is None:
            store, client = _SimStore(self, name), cast(KinesisApi, _SimKinesis(self, name))
            consumer = AsyncConsumer(self.stream, self.app, lambda: _Recorder(self, name), client=client,
                                     store=store, worker_id=name, config=self.config)  # fmt: skip
            self.workers[name] = WorkerState(name, consumer, asyncio.create_task(consumer.run(), name=name))
        elif w is None or w.crashed or w.left or event.kind == "join":
            return  # not running: nothing happens (random schedules may say anything)
        elif event.kind == "leave":
            w.left = True
            w.consumer.request_stop()
        elif event.kind == "crash":
            w.crashed, w.held_at_crash = True, tuple(sorted(w.consumer.coordinator.held))
        elif event.kind == "pause":
            w.frozen_until = max(w.frozen_until, now + event.seconds)
            w.pauses.append((now, w.frozen_until))
        elif event.kind == "slow_store":
            w.slow_delay, w.slow_until = event.delay, now + event.seconds
        elif event.kind == "outage":
            w.outage_until = now + event.seconds
        self.applied.append(dataclasses.replace(event, at=now))

    # -- hooks of the wrappers and the processor ----------------------------------------------
    async def _gate(self, w: WorkerState) -> None:
        """Where a crashed worker hangs for good and a paused one until its pause ends."""
        while w.crashed or w.frozen_until > self.now:
            if w.crashed and self._teardown.is_set():
                raise StoreUnavailable(f"{w.name} was killed")  # only at teardown: unwind
            if w.crashed:
                await self._teardown.wait()
            else:
                await asyncio.sleep(w.frozen_until - self.now)

    def _stored(self, worker: str, changed: list[tuple[Lease | None, Lease | None]]) -> None:
        now, moved = self.now, False
        for old, new in changed:
            if new is None:  # deleted
                self._checkpoint.pop(old.lease_key if old else "", None)
                moved = True
                continue
            key, before = new.lease_key, self._checkpoint.get(new.lease_key)
            # Any write that moves the counter of a lease owned by X restarts everyone's expiry
            # clock for X's claim (the old owner's complete_handoff does so for the new owner).
            if old is not None and new.lease_owner is not None:
                self._last_write[(new.lease_owner, key)] = now
                if old.lease_owner != new.lease_owner:  # a take or a handoff start: a new claim
                    self._claimed[(new.lease_owner, key)] = now
            if before is not None and new.checkpoint < before:
                self.regressions.append(
                    f"checkpoint of {key} went backwards from {before} to {new.checkpoint} "
                    f"(written by {worker} at t={now:.2f})"
                )
            self._checkpoint[key] = new.checkpoint
            moved |= old is None or _shape(old) != _shape(new)
        if moved and not self._closing:
            self.snapshots.append(Snapshot.of(now, self.backing.leases(self.app)))

    def _delivered(self, worker: str, tenure: int, inp: ProcessRecordsInput) -> None:
        # Only writes under a claim made before this tenure began count, so a zombie's old
        # tenure does not turn fresh when its worker claims the lease anew.
        key, now = (worker, inp.shard_id), self.now
        since = now - self._last_write.get(key, -math.inf)
        if self._claimed.get(key, math.inf) > self.tenures[tenure].started:
            since = math.inf
        sequences = tuple(int(record.sequence_number) for record in inp.records)
        self.deliveries.append(
            Delivery(len(self.deliveries), now, worker, tenure, inp.shard_id, sequences, inp.attempt, since)
        )

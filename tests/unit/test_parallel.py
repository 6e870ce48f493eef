"""ordered_parallel: per-key order, real concurrency, a checkpoint that never passes an
incomplete record, retries, failure, and the shard's endings.

Most tests drive one processor directly with a fake Checkpointer; the last ones run it in an
AsyncConsumer on FakeKinesis and the memory store. Every wait is on a condition or an Event.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kinesis_butler import (
    AsyncConsumer,
    ConfigError,
    ConsumerConfig,
    ExtendedSequenceNumber,
    LeaseLost,
    ProcessorFailed,
    ProcessRecordsInput,
    Record,
    ShardEndedInput,
    ShutdownRequestedInput,
)
from kinesis_butler import parallel as parallel_module
from kinesis_butler.models import TRIM_HORIZON
from kinesis_butler.parallel import OrderedParallelProcessor, ParallelConfig, ordered_parallel
from kinesis_butler.processor import CheckpointTarget, LeaseLostInput
from kinesis_butler.stores import MemoryLeaseStore
from kinesis_butler.testing.fake import FakeKinesis
from tests.helpers import wait_until

SHARD = "shardId-000000000000"


def rec(n: int, key: str | None = None, *, seq: int | None = None, sub: int = 0) -> Record:
    """Record ``n`` (payload ``{"n": n}``), sequence number 1000 + n unless given."""
    sequence = str(1000 + (n if seq is None else seq))
    return Record(
        json.dumps({"n": n}).encode(),
        key if key is not None else f"k{n}",
        sequence,
        sub_sequence_number=sub,
        shard_id=SHARD,
        stream="s",
    )


def n_of(record: Record) -> int:
    return int(json.loads(record.data)["n"])


def pos(record: Record) -> ExtendedSequenceNumber:
    return record.extended_sequence_number


class FakeCheckpointer:
    """Remembers every checkpoint; fails the test if one goes backwards or is written twice,
    or if ``check(position)`` says a record at or before it had not completed."""

    def __init__(self, check: Callable[[ExtendedSequenceNumber], None] | None = None) -> None:
        self.positions: list[ExtendedSequenceNumber] = []
        self.check = check
        self.lost = False

    async def checkpoint(self, target: CheckpointTarget = None, *, wait: bool = True) -> None:
        assert isinstance(target, ExtendedSequenceNumber)
        assert wait is False
        if self.lost:
            raise LeaseLost("the lease is gone", lease_key=SHARD)
        assert not self.positions or target > self.positions[-1], f"{target} after {self.positions[-1]}"
        if self.check is not None:
            self.check(target)
        self.positions.append(target)

    @property
    def last_checkpoint(self) -> ExtendedSequenceNumber:
        return self.positions[-1] if self.positions else TRIM_HORIZON

    @property
    def last(self) -> ExtendedSequenceNumber | None:
        return self.positions[-1] if self.positions else None


class Harness:
    """One processor for one shard, fed batches directly (as the shard loop does)."""

    def __init__(self, handler: Any, checkpointer: FakeCheckpointer | None = None, **knobs: Any) -> None:
        knobs.setdefault("checkpoint_interval", 0)
        knobs.setdefault("retry_base", 0.001)
        knobs.setdefault("retry_cap", 0.01)
        self.processor = OrderedParallelProcessor(handler, ParallelConfig(**knobs))
        self.checkpointer = checkpointer or FakeCheckpointer()

    async def feed(self, records: list[Record], batch: int = 100) -> None:
        for first in range(0, len(records), batch):
            await self.processor.process_records(
                ProcessRecordsInput(records[first : first + batch], self.checkpointer, SHARD, "s")
            )

    async def shutdown(self) -> None:
        await self.processor.shutdown_requested(ShutdownRequestedInput(SHARD, "s", self.checkpointer))

    async def shard_ended(self) -> None:
        await self.processor.shard_ended(ShardEndedInput(SHARD, "s", self.checkpointer))


async def settle(rounds: int = 20) -> None:
    """Let every ready task run a few steps (to show that something does NOT happen)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- order and concurrency ---------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    plan=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 6)), min_size=1, max_size=150),
    concurrency=st.integers(1, 8),
    extra_pending=st.integers(0, 40),
    batch=st.integers(1, 60),
)
def test_each_key_runs_in_shard_order_once_and_the_checkpoint_follows_completion(
    plan: list[tuple[int, int]], concurrency: int, extra_pending: int, batch: int
) -> None:
    """Random keys and random per-record delays (event-loop yields): per key the records run
    one at a time in shard order, each exactly once, and no checkpoint ever names a position
    at or before which some record had not completed."""
    records = [rec(n, f"key-{key}") for n, (key, _) in enumerate(plan)]
    finished: list[int] = []
    running: set[str] = set()

    async def handle(record: Record) -> None:
        assert record.partition_key not in running, "two records of one key overlapped"
        running.add(record.partition_key)
        for _ in range(plan[n_of(record)][1]):
            await asyncio.sleep(0)
        running.discard(record.partition_key)
        finished.append(n_of(record))

    def check(position: ExtendedSequenceNumber) -> None:
        done = set(finished)
        assert all(n in done for n, r in enumerate(records) if pos(r) <= position)

    async def scenario() -> None:
        harness = Harness(
            handle, FakeCheckpointer(check), concurrency=concurrency, max_pending=concurrency + extra_pending
        )
        await harness.feed(records, batch)
        await harness.shutdown()
        assert harness.checkpointer.last == pos(records[-1])

    asyncio.run(scenario())
    assert Counter(finished) == Counter(range(len(plan)))
    by_key: dict[int, list[int]] = defaultdict(list)
    for n in finished:
        by_key[plan[n][0]].append(n)
    assert all(ns == sorted(ns) for ns in by_key.values())


async def test_concurrency_reaches_the_limit_and_never_exceeds_it() -> None:
    gate = asyncio.Event()
    active = peak = 0
    done: list[int] = []

    async def handle(record: Record) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await gate.wait()
        active -= 1
        done.append(n_of(record))

    harness = Harness(handle, concurrency=4)
    await harness.feed([rec(n) for n in range(12)])
    await wait_until(lambda: active == 4, what="4 handlers running at once")
    await settle()
    assert active == 4 and peak == 4  # a fifth never starts while four run
    gate.set()
    await harness.shutdown()
    assert sorted(done) == list(range(12)) and peak == 4


async def test_records_of_one_key_never_overlap_whatever_the_concurrency() -> None:
    active = peak = 0
    done: list[int] = []

    async def handle(record: Record) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await settle(3)
        active -= 1
        done.append(n_of(record))

    harness = Harness(handle, concurrency=8)
    await harness.feed([rec(n, "same") for n in range(20)], batch=7)
    await harness.shutdown()
    assert peak == 1 and done == list(range(20))


async def test_process_records_returns_while_records_run_and_waits_when_max_pending_is_reached() -> None:
    gate = asyncio.Event()
    started: list[int] = []

    async def handle(record: Record) -> None:
        started.append(n_of(record))
        await gate.wait()

    harness = Harness(handle, concurrency=2, max_pending=4)
    await harness.feed([rec(n) for n in range(3)])  # returns at once: 3 pending < 4
    assert harness.processor.pending == 3
    await wait_until(lambda: len(started) == 2, what="two records started")
    second = asyncio.create_task(harness.feed([rec(n) for n in range(3, 6)]))
    await wait_until(lambda: harness.processor.pending == 4, what="the pipeline to fill")
    await settle()
    assert not second.done()  # back-pressure: it waits for room
    gate.set()
    await asyncio.wait_for(second, timeout=5)
    await harness.shutdown()
    assert harness.checkpointer.last == pos(rec(5))


async def test_a_plain_function_handler_runs_in_a_worker_thread() -> None:
    threads: set[int] = set()
    done: list[int] = []

    def handle(record: Record) -> None:
        threads.add(threading.get_ident())
        done.append(n_of(record))

    harness = Harness(handle, concurrency=4)
    await harness.feed([rec(n, f"key-{n % 3}") for n in range(30)])
    await harness.shutdown()
    assert threading.get_ident() not in threads
    assert sorted(done) == list(range(30))
    assert all([n for n in done if n % 3 == k] == list(range(k, 30, 3)) for k in range(3))


async def test_a_key_function_chooses_what_is_ordered() -> None:
    active: Counter[int] = Counter()
    overlapped = False

    async def handle(record: Record) -> None:
        nonlocal overlapped
        user = n_of(record) % 2
        overlapped |= active[user] > 0
        active[user] += 1
        await settle(2)
        active[user] -= 1

    harness = Harness(handle, concurrency=8, key=lambda r: n_of(r) % 2)  # partition keys all differ
    await harness.feed([rec(n) for n in range(40)])
    await harness.shutdown()
    assert not overlapped


# -- the checkpoint ----------------------------------------------------------------------------
async def test_the_checkpoint_stops_just_before_an_incomplete_record_then_advances() -> None:
    release = asyncio.Event()
    done: set[int] = set()

    async def handle(record: Record) -> None:
        if n_of(record) == 10:
            await release.wait()
        done.add(n_of(record))

    records = [rec(n) for n in range(30)]
    harness = Harness(handle, concurrency=4)
    await harness.feed(records, batch=8)
    await wait_until(lambda: len(done) == 29, what="every record but #10")
    await wait_until(lambda: harness.checkpointer.last == pos(records[9]), what="checkpoint at #9")
    await settle()
    assert all(p <= pos(records[9]) for p in harness.checkpointer.positions)
    release.set()
    await wait_until(lambda: harness.checkpointer.last == pos(records[29]), what="checkpoint at #29")
    await harness.shutdown()


async def test_sub_records_of_one_kpl_record_are_checkpointed_by_sub_sequence_number() -> None:
    release = asyncio.Event()
    records = [rec(n, seq=500, sub=n) for n in range(5)] + [rec(5, seq=501)]

    async def handle(record: Record) -> None:
        if record.sub_sequence_number == 3:
            await release.wait()

    harness = Harness(handle, concurrency=8)
    await harness.feed(records)
    await wait_until(
        lambda: harness.checkpointer.last == ExtendedSequenceNumber("1500", 2), what="checkpoint 1500/2"
    )
    await settle()
    assert harness.checkpointer.last == ExtendedSequenceNumber("1500", 2)
    release.set()
    await wait_until(lambda: harness.checkpointer.last == ExtendedSequenceNumber("1501"), what="1501")
    await harness.shutdown()


async def test_checkpoints_are_spaced_by_checkpoint_interval() -> None:
    harness = Harness(lambda_async_noop, checkpoint_interval=30)
    await harness.feed([rec(n) for n in range(50)], batch=5)
    await wait_until(lambda: harness.processor.pending == 0, what="every record done")
    await settle()
    assert harness.checkpointer.positions == []  # the first write waits out the interval
    await harness.shutdown()  # the final one is written when asked, whatever the interval
    assert harness.checkpointer.positions == [pos(rec(49))]


async def lambda_async_noop(record: Record) -> None:
    return None


# -- retries and failure -----------------------------------------------------------------------
async def test_a_failing_record_is_retried_with_backoff_while_other_keys_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bounds: list[float] = []

    def uniform(low: float, high: float) -> float:
        bounds.append(high)
        return high

    monkeypatch.setattr(parallel_module.random, "uniform", uniform)
    calls: Counter[int] = Counter()
    finished: list[str] = []

    async def handle(record: Record) -> None:
        calls[n_of(record)] += 1
        if n_of(record) == 0 and calls[0] <= 2:
            raise ConnectionError("downstream busy")
        finished.append(f"{record.partition_key}{n_of(record)}")

    records = [rec(0, "a"), rec(1, "b"), rec(2, "a"), rec(3, "b"), rec(4, "b")]
    harness = Harness(handle, concurrency=2, retry_base=0.01, retry_cap=0.015)
    await harness.feed(records)
    await harness.shutdown()
    assert finished == ["b1", "b3", "b4", "a0", "a2"]  # b went on during a0's backoff; a2 waited
    assert calls[0] == 3
    assert bounds == [0.01, 0.015]  # full jitter below base * 2**(attempt - 1), capped
    assert harness.checkpointer.last == pos(records[-1])


async def test_a_record_out_of_attempts_stops_the_shard_before_it() -> None:
    calls: Counter[int] = Counter()

    async def handle(record: Record) -> None:
        calls[n_of(record)] += 1
        if n_of(record) == 5:
            raise ValueError("boom")

    records = [rec(n, "bad" if n in (5, 12) else f"k{n}") for n in range(20)]
    harness = Harness(handle, concurrency=4, max_attempts=3)
    await harness.feed(records[:10])
    await wait_until(lambda: calls[5] == 3, what="three attempts at record 5")
    with pytest.raises(ProcessorFailed) as raised:
        await harness.feed(records[10:])
    failure = raised.value
    assert failure.shard_id == SHARD and failure.attempts == 3
    assert isinstance(failure.__cause__, ValueError)
    for part in (SHARD, "sequence number 1005", "sub-sequence 0", "'bad'", "ValueError: boom"):
        assert part in str(failure)
    assert harness.checkpointer.last == pos(records[4])  # the prefix, and not one record further
    assert calls[12] == 0  # the failed key's later record never ran
    with pytest.raises(ProcessorFailed):  # and the shutdown path reports it again
        await harness.shutdown()


async def test_a_failure_found_at_shutdown_is_raised_there_after_checkpointing_the_prefix() -> None:
    async def handle(record: Record) -> None:
        if n_of(record) == 3:
            raise RuntimeError("poison")

    records = [rec(n) for n in range(8)]
    harness = Harness(handle, concurrency=3, max_attempts=2)
    await harness.feed(records)
    with pytest.raises(ProcessorFailed, match="RuntimeError: poison"):
        await harness.shutdown()
    assert harness.checkpointer.last == pos(records[2])


async def test_a_key_function_that_raises_stops_the_shard() -> None:
    def key(record: Record) -> str:
        if n_of(record) == 2:
            raise KeyError("no user id")
        return record.partition_key

    harness = Harness(lambda_async_noop, key=key)
    with pytest.raises(ProcessorFailed, match="sequence number 1002"):
        await harness.feed([rec(n) for n in range(5)])
    assert harness.checkpointer.last == pos(rec(1))


# -- the endings -------------------------------------------------------------------------------
async def test_shutdown_waits_for_in_flight_records_then_checkpoints_the_last() -> None:
    gate = asyncio.Event()
    done: list[int] = []

    async def handle(record: Record) -> None:
        await gate.wait()
        done.append(n_of(record))

    harness = Harness(handle, concurrency=4)
    await harness.feed([rec(n) for n in range(20)])
    stopping = asyncio.create_task(harness.shutdown())
    await settle()
    assert not stopping.done() and harness.checkpointer.positions == []
    gate.set()
    await asyncio.wait_for(stopping, timeout=5)
    assert sorted(done) == list(range(20))
    assert harness.checkpointer.last == pos(rec(19))


async def test_shutdown_stops_waiting_after_drain_timeout_and_checkpoints_what_completed() -> None:
    cancelled = asyncio.Event()

    async def handle(record: Record) -> None:
        if n_of(record) == 3:
            try:
                await asyncio.Event().wait()  # never completes
            except asyncio.CancelledError:
                cancelled.set()
                raise

    harness = Harness(handle, concurrency=4, drain_timeout=0.05)
    await harness.feed([rec(n) for n in range(10)])
    await asyncio.wait_for(harness.shutdown(), timeout=5)
    assert cancelled.is_set()
    assert harness.checkpointer.last == pos(rec(2))


async def test_lease_lost_cancels_in_flight_handlers_at_once_and_checkpoints_nothing() -> None:
    cancelled: list[int] = []
    done: list[int] = []

    async def handle(record: Record) -> None:
        if n_of(record) >= 5:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(n_of(record))
                raise
        done.append(n_of(record))

    harness = Harness(handle, concurrency=8, checkpoint_interval=60)
    await harness.feed([rec(n) for n in range(10)])
    await wait_until(lambda: len(done) == 5, what="records 0-4 done")
    await asyncio.wait_for(harness.processor.lease_lost(LeaseLostInput(SHARD, "s")), timeout=1)
    assert sorted(cancelled) == [5, 6, 7, 8, 9]
    await settle()
    assert harness.checkpointer.positions == []


async def test_shard_ended_returns_only_when_every_record_completed() -> None:
    gate = asyncio.Event()

    async def handle(record: Record) -> None:
        if n_of(record) == 7:
            await gate.wait()

    harness = Harness(handle, concurrency=4)
    await harness.feed([rec(n) for n in range(10)])
    ending = asyncio.create_task(harness.shard_ended())
    await settle()
    assert not ending.done()
    gate.set()
    await asyncio.wait_for(ending, timeout=5)
    assert harness.checkpointer.last == pos(rec(9))


@pytest.mark.parametrize(
    ("knobs", "name"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 2.5}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"max_pending": 0}, "max_pending"),
        ({"concurrency": 32, "max_pending": 8}, "max_pending"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"retry_base": 0}, "retry_base"),
        ({"retry_cap": -1.0}, "retry_cap"),
        ({"checkpoint_interval": -0.5}, "checkpoint_interval"),
        ({"checkpoint_interval": "1"}, "checkpoint_interval"),
        ({"drain_timeout": 0}, "drain_timeout"),
        ({"key": "partition_key"}, "key"),
    ],
)
def test_bad_arguments_raise_config_error_naming_them(knobs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must"):
        ordered_parallel(lambda_async_noop, **knobs)


@pytest.mark.parametrize("handler", [None, 42, Record])
def test_a_handler_that_is_not_a_function_is_refused(handler: Any) -> None:
    with pytest.raises(ConfigError, match="handler must be a function"):
        ordered_parallel(handler)


# -- in a consumer -----------------------------------------------------------------------------
FAST = ConsumerConfig(
    failover_time=1.0,
    idle_poll_interval=0.01,
    min_poll_interval=0.001,
    shard_sync_interval=0.05,
    take_interval=0.05,
    processor_retry_base=0.001,
    processor_retry_cap=0.01,
    shutdown_timeout=5,
)


async def test_in_a_consumer_every_record_runs_once_in_key_order_through_a_split() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 2)
    for n in range(150):
        fake.put("s", json.dumps({"n": n}).encode(), f"key-{n % 20}")
    seen: list[Record] = []
    delays = [n % 4 for n in range(300)]

    async def handle(record: Record) -> None:
        await settle(delays[n_of(record)])
        seen.append(record)

    store = MemoryLeaseStore("app")
    factory = ordered_parallel(handle, concurrency=8, checkpoint_interval=0.01)
    consumer = AsyncConsumer("s", "app", factory, store=store, client=fake, config=FAST)
    runner = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: len(seen) >= 150, what="the first 150 records")
        fake.split("s", SHARD)
        for n in range(150, 300):
            fake.put("s", json.dumps({"n": n}).encode(), f"key-{n % 20}")
        await wait_until(lambda: len(seen) >= 300, what="300 records")
    finally:
        consumer.request_stop()
        await runner
    assert consumer.failures == []
    assert Counter(n_of(r) for r in seen) == Counter(range(300))
    by_key: dict[str, list[int]] = defaultdict(list)
    for record in seen:
        by_key[record.partition_key].append(n_of(record))
    assert all(ns == sorted(ns) for ns in by_key.values())
    last: dict[str, str] = {}
    for record in sorted(seen, key=lambda r: int(r.sequence_number)):
        last[record.shard_id] = record.sequence_number
    reopened = MemoryLeaseStore("app", backing=store.backing)  # the consumer closed its store
    leases = {lease.lease_key: lease for lease in await reopened.list_leases()}
    assert leases[SHARD].checkpoint.is_shard_end
    for shard, sequence in last.items():
        if shard != SHARD:
            assert leases[shard].checkpoint == ExtendedSequenceNumber(sequence), shard


async def test_in_a_consumer_a_record_out_of_attempts_fails_the_shard_once_before_it() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    puts = [fake.put("s", json.dumps({"n": n}).encode(), f"key-{n}") for n in range(10)]

    calls: Counter[int] = Counter()

    async def handle(record: Record) -> None:
        calls[n_of(record)] += 1
        if n_of(record) == 4:
            raise ValueError("bad payload")

    store = MemoryLeaseStore("app")
    factory = ordered_parallel(handle, concurrency=4, max_attempts=2, retry_base=0.001, retry_cap=0.01)
    consumer = AsyncConsumer("s", "app", factory, store=store, client=fake, config=FAST)
    runner = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: calls[4] == 2, what="two attempts at record 4")
        fake.put("s", b'{"n": 10}', "key-10")  # the next batch meets the failure: the shard stops
        await wait_until(lambda: bool(consumer.failures), what="the shard to fail")
        assert SHARD not in consumer.shards
    finally:
        consumer.request_stop()
        await runner
    (failure,) = consumer.failures  # once: the shard loop does not retry a processor that gave up
    assert isinstance(failure, ProcessorFailed) and failure.attempts == 2
    assert f"sequence number {puts[4].sequence_number}" in str(failure)
    assert calls[10] == 0
    (lease,) = await MemoryLeaseStore("app", backing=store.backing).list_leases()
    assert lease.checkpoint == ExtendedSequenceNumber(puts[3].sequence_number)

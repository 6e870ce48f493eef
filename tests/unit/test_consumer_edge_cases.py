"""Regression tests for bugs found in review (the comment on each says what went wrong).

They run on FakeKinesis and the memory store, like tests/unit/test_consumer.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterator

import pytest

from kinesis_butler import (
    AsyncConsumer,
    CheckpointError,
    Consumer,
    ConsumerConfig,
    InitializationInput,
    LeaseLostInput,
    ProcessRecordsInput,
    RecordProcessorBase,
    ShutdownRequestedInput,
)
from kinesis_butler.errors import ConfigError, InvalidArgument, Throttled
from kinesis_butler.models import Lease
from kinesis_butler.stores import MemoryBacking, MemoryLeaseStore
from kinesis_butler.testing.fake import FakeKinesis
from tests.helpers import Collector, consume_until, wait_until, wait_until_async, wait_until_sync

FAST = ConsumerConfig(
    failover_time=1.0,
    renew_interval=0.05,
    idle_poll_interval=0.01,
    min_poll_interval=0.001,
    shard_read_calls_per_second=1000.0,
    shard_sync_interval=0.05,
    take_interval=0.05,
    processor_retry_base=0.001,
    processor_retry_cap=0.01,
    processor_max_attempts=2,
    shutdown_timeout=5,
)
SHARD0 = "shardId-000000000000"


def _fill(fake: FakeKinesis, stream: str, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        fake.put(stream, json.dumps({"n": n}).encode(), f"key-{n % 13}")


def _n(record: object) -> int:
    return int(json.loads(record.data)["n"])  # type: ignore[attr-defined]


async def _lease(backing: MemoryBacking, key: str) -> Lease:
    lease = await MemoryLeaseStore("app", backing=backing).get_lease(key)
    assert lease is not None
    return lease


async def _cancel_leftover_tasks() -> None:
    """Tests that expose leaked tasks clean them up so the next test starts clean."""
    me = asyncio.current_task()
    leftovers = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


# --------------------------------------------------------------------------------------------
# WAS A BUG (lifecycle.py ShardCheckpointer.checkpoint, l.123-130 + leasing.py checkpoint l.182-188):
# the "goes backwards" check reads held.lease.checkpoint *before* taking the per-lease lock, and
# LeaseCoordinator.checkpoint does not re-check under the lock. Two concurrent checkpoints both
# pass the check; the one that writes second wins, so the stored checkpoint moves backwards.
async def test_concurrent_checkpoints_can_move_the_stored_checkpoint_backwards() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    backing = MemoryBacking()
    results: list[object] = []
    done = asyncio.Event()
    last_seq: list[str] = []

    class P(RecordProcessorBase):
        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            records = process_records_input.records
            cp = process_records_input.checkpointer
            last_seq.append(records[-1].sequence_number)
            results.extend(
                await asyncio.gather(
                    cp.checkpoint(records[-1]), cp.checkpoint(records[0]), return_exceptions=True
                )
            )
            done.set()

    consumer = AsyncConsumer(
        "s", "app", P, store=MemoryLeaseStore("app", backing=backing), client=fake, config=FAST
    )
    runner = asyncio.create_task(consumer.run())
    await asyncio.wait_for(done.wait(), 5)
    stored = (await _lease(backing, SHARD0)).checkpoint
    consumer.request_stop()
    await runner
    assert stored.sequence == last_seq[0], f"checkpoint went backwards to {stored} (results: {results})"
    assert isinstance(results[1], CheckpointError)


# --------------------------------------------------------------------------------------------
# WAS A BUG (lifecycle.py ShardCheckpointer.checkpoint, l.115): a SHARD_END target skips every
# validation, so process_records on an OPEN shard can checkpoint SHARD_END. The lease then counts
# as finished: plan_takes never takes it again and its children may start, so every later record
# of the shard is lost after a restart or failover.
async def test_checkpointing_shard_end_on_an_open_shard_is_refused() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 3)
    errors: list[BaseException] = []
    done = asyncio.Event()

    class P(RecordProcessorBase):
        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            try:
                await process_records_input.checkpointer.checkpoint("SHARD_END")
            except CheckpointError as exc:
                errors.append(exc)
            done.set()

    backing = MemoryBacking()
    consumer = AsyncConsumer(
        "s", "app", P, store=MemoryLeaseStore("app", backing=backing), client=fake, config=FAST
    )
    runner = asyncio.create_task(consumer.run())
    await asyncio.wait_for(done.wait(), 5)
    consumer.request_stop()
    await runner
    stored = (await _lease(backing, SHARD0)).checkpoint
    assert not stored.is_shard_end, "an open shard was marked SHARD_END by a processor checkpoint"
    assert errors and isinstance(errors[0], CheckpointError)


# --------------------------------------------------------------------------------------------
# WAS A BUG (lifecycle.py ShardConsumer.run l.184-185 / consumer.py _run_shard l.270-284): when
# processor.initialize (or shard_ended) raises, the exception escapes _run_shard (only ButlerError
# is caught), is never retrieved, is not put in consumer.failures, and the lease is NOT released:
# the coordinator keeps renewing it, so no worker (this one included) ever processes the shard.
async def test_initialize_error_is_reported_or_the_shard_is_retried() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    backing = MemoryBacking()
    init_calls = 0
    got: list[int] = []

    class P(RecordProcessorBase):
        async def initialize(self, initialization_input: InitializationInput) -> None:
            nonlocal init_calls
            init_calls += 1
            if init_calls == 1:
                raise RuntimeError("downstream not ready")

        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            got.extend(_n(r) for r in process_records_input.records)

    consumer = AsyncConsumer(
        "s", "app", P, store=MemoryLeaseStore("app", backing=backing), client=fake, config=FAST
    )
    runner = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: init_calls >= 1, timeout=5)
        # Either the shard is retried (a second initialize), or its loop has ended.
        await wait_until(lambda: init_calls >= 2 or SHARD0 not in consumer.shards, timeout=5)
        lease = await _lease(backing, SHARD0)
        retried = init_calls >= 2
        reported = bool(consumer.failures)
        released = lease.lease_owner != consumer.worker_id or SHARD0 not in consumer.coordinator.held
        assert retried or (reported and released), (
            f"shard is dead but still leased and renewed by this worker (failures={consumer.failures}, "
            f"owner={lease.lease_owner}, counter={lease.lease_counter})"
        )
    finally:
        consumer.request_stop()
        await runner


# --------------------------------------------------------------------------------------------
# WAS A BUG (consumer.py _run_shard l.275-282): a shard loop that stops with a ButlerError other than
# ProcessorFailed (here a non-retriable GetShardIterator error) is recorded in failures, but its
# lease stays in coordinator.held and keeps being renewed: no other worker can ever take the
# shard while this worker lives. The ProcessorFailed path releases it; this one does not.
async def test_a_shard_stopped_by_an_error_releases_its_lease() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    backing = MemoryBacking()
    fake.fail_next("get_shard_iterator", InvalidArgument("bad iterator", operation="GetShardIterator"))
    consumer = AsyncConsumer(
        "s", "app", Collector(), store=MemoryLeaseStore("app", backing=backing), client=fake, config=FAST
    )
    runner = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: bool(consumer.failures) and SHARD0 not in consumer.shards, timeout=5)
        counter = (await _lease(backing, SHARD0)).lease_counter
        holder: list[Lease] = []

        async def settled() -> bool:
            # either released, or renewed again (the bug) — both happen within a few renew intervals
            lease = await _lease(backing, SHARD0)
            if lease.lease_owner != consumer.worker_id or lease.lease_counter > counter + 1:
                holder.append(lease)
                return True
            return False

        await wait_until_async(settled, timeout=5, what="the failed shard's lease to settle")
        assert holder[0].lease_owner != consumer.worker_id, (
            f"failed shard's lease is still owned and renewed by this worker (counter {counter} -> "
            f"{holder[0].lease_counter})"
        )
    finally:
        consumer.request_stop()
        await runner


# --------------------------------------------------------------------------------------------
# WAS A BUG (retrieval/polling.py _fetch_forever l.161 and l.172): only GetRecords errors are retried.
# A retriable error from GetShardIterator (Throttled / LimitExceeded — 5 calls/s per shard —,
# ServiceUnavailable, EndpointUnreachable) escapes the fetch task and kills the shard for good
# (and, with the bug above, the lease stays held). It happens at start and on every expired-
# iterator recovery.
async def test_a_throttled_get_shard_iterator_is_retried() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    fake.fail_next("get_shard_iterator", Throttled("Rate exceeded", operation="GetShardIterator"))
    collect = Collector()
    consumer = AsyncConsumer("s", "app", collect, store=MemoryLeaseStore("app"), client=fake, config=FAST)
    await consume_until(consumer, lambda: len(collect.records) >= 5 or bool(consumer.failures), timeout=5)
    assert consumer.failures == []
    assert collect.numbers == list(range(5))


# --------------------------------------------------------------------------------------------
# WAS A BUG (lifecycle.py ShardConsumer.run l.173-176): run() waits on `work` with asyncio.wait, which
# does not cancel it. When graceful shutdown times out it cancels the shard task, but the inner
# `work` task survives: the processor keeps running after AsyncConsumer.run() returned, and the
# store/client are already closed under it.
async def test_shutdown_timeout_cancels_in_flight_processing() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 3)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    class Stuck(RecordProcessorBase):
        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

    config = dataclasses.replace(FAST, shutdown_timeout=0.2)
    consumer = AsyncConsumer("s", "app", Stuck, store=MemoryLeaseStore("app"), client=fake, config=config)
    runner = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(started.wait(), 5)
        consumer.request_stop()
        await asyncio.wait_for(runner, 5)
        assert cancelled.is_set(), "process_records still running after the consumer stopped"
    finally:
        await _cancel_leftover_tasks()


# --------------------------------------------------------------------------------------------
# WAS A BUG (consumer.py _graceful_shutdown l.206-208 + leasing.py take_round l.115-133): `taking` is
# checked once per round, before the awaits. A take that completes after shutdown began still
# calls on_acquired: a ShardConsumer is started whose `shutdown` event is never set (the loop over
# self.shards already ran) and whose task is not in the set being awaited. Its lease is then
# released under it, and it keeps polling/processing after run() returned (a leaked task).
async def test_a_lease_taken_while_shutting_down_is_shut_down_too() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 2)
    backing = MemoryBacking()
    gate = asyncio.Event()
    second_take_waiting = asyncio.Event()
    release_first = asyncio.Event()
    shutdown_calls: list[str] = []

    class GatedStore(MemoryLeaseStore):
        takes = 0

        async def take_lease(self, lease: Lease, owner: str) -> Lease:
            GatedStore.takes += 1
            if GatedStore.takes == 2:
                second_take_waiting.set()
                await gate.wait()
            return await super().take_lease(lease, owner)

    class P(RecordProcessorBase):
        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            return None

        async def shutdown_requested(self, shutdown_requested_input: ShutdownRequestedInput) -> None:
            shutdown_calls.append(shutdown_requested_input.shard_id)
            if len(shutdown_calls) == 1:
                await release_first.wait()

    consumer = AsyncConsumer(
        "s", "app", P, store=GatedStore("app", backing=backing), client=fake, config=FAST
    )
    runner = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(second_take_waiting.wait(), 5)
        await wait_until(lambda: len(consumer.shards) == 1, timeout=5)
        consumer.request_stop()
        await wait_until(lambda: len(shutdown_calls) == 1, timeout=5)
        gate.set()  # the second take completes while the first shard is shutting down
        # The late take is given straight back: no shard starts for it, and no lease stays held.
        release_first.set()
        await asyncio.wait_for(runner, 10)
        alive = [
            t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("shard-") and not t.done()
        ]
        assert alive == [], f"shard tasks still running after run() returned: {alive}"
        assert len(shutdown_calls) == 1
        leases = await MemoryLeaseStore("app", backing=backing).list_leases()
        assert [lease.lease_owner for lease in leases] == [None, None]
    finally:
        gate.set()
        release_first.set()
        await _cancel_leftover_tasks()


# --------------------------------------------------------------------------------------------
# WAS A BUG (consumer.py _IteratorProcessor l.72-87 + lifecycle.py _shard_ended l.310-331): with the
# `async for` API a batch counts as processed as soon as it is queued, so at the end of a closed
# shard the library writes SHARD_END while the user has not checkpointed (or even read) those
# records. If the worker stops or crashes then, the records are never redelivered: lost.
# (Also: consumer.checkpoint() of those records then raises LeaseLost, since the shard is gone.)
async def test_iteration_does_not_write_shard_end_over_records_the_user_never_checkpointed() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    fake.split("s", SHARD0)
    backing = MemoryBacking()
    got: list[int] = []
    async with AsyncConsumer(
        "s", "app", store=MemoryLeaseStore("app", backing=backing), client=fake, config=FAST
    ) as consumer:
        async for record in consumer:
            got.append(_n(record))  # read but never checkpointed (e.g. the process dies now)
            if len(got) == 5:
                break
    parent = await _lease(backing, SHARD0)
    assert not parent.checkpoint.is_shard_end, (
        "SHARD_END was written although the user checkpointed none of the shard's records"
    )


# --------------------------------------------------------------------------------------------
# WAS A BUG (consumer.py AsyncConsumer.__anext__ l.318-331): if __anext__ is cancelled (the common
# `await asyncio.wait_for(anext(consumer), timeout)` pattern), its `getter` task
# (queue.get) is not cancelled. It later takes the next batch off the queue and drops it; the
# user checkpoints later records of the shard, so the dropped batch is lost for good.
async def test_a_timed_out_anext_does_not_swallow_the_next_batch() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    async with AsyncConsumer("s", "app", store=MemoryLeaseStore("app"), client=fake, config=FAST) as consumer:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(consumer), 0.05)  # nothing there yet
        _fill(fake, "s", 5)
        await wait_until(lambda: SHARD0 in consumer.shards and consumer.shards[SHARD0].records_processed >= 5)
        _fill(fake, "s", 5, start=5)
        first = await asyncio.wait_for(anext(consumer), 5)
    assert _n(first) == 0, f"records 0..{_n(first) - 1} were swallowed by a cancelled __anext__"


# --------------------------------------------------------------------------------------------
# WAS A BUG (lifecycle.py ShardConsumer._work l.215-224): when `work` is cancelled (lease lost) while it
# waits for a batch, its `batch_task` (source.next_batch) and `stop_task` (shutdown.wait) are not
# cancelled; both stay pending forever. Two tasks leak per lost lease.
async def test_a_lost_lease_leaks_no_tasks() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    store = MemoryLeaseStore("app")
    lost: list[str] = []

    class P(RecordProcessorBase):
        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            return None

        async def lease_lost(self, lease_lost_input: LeaseLostInput) -> None:
            lost.append(lease_lost_input.shard_id)

    consumer = AsyncConsumer("s", "app", P, store=store, client=fake, config=FAST)
    runner = asyncio.create_task(consumer.run())
    try:
        await wait_until(
            lambda: SHARD0 in consumer.shards and consumer.shards[SHARD0].state.name == "PROCESSING"
        )
        old = consumer.shards[SHARD0]
        thief = MemoryLeaseStore("app", backing=store.backing)
        (lease,) = await thief.list_leases()
        await thief.take_lease(lease, "thief")
        await wait_until(lambda: lost == [SHARD0] and consumer.shards.get(SHARD0) is not old)

        def belongs_to_old(task: asyncio.Task[object]) -> bool:
            coro = task.get_coro()
            frame = getattr(coro, "cr_frame", None)
            owner = frame.f_locals.get("self") if frame is not None else None
            return owner is old.shutdown or owner is old._source

        leaked = [t for t in asyncio.all_tasks() if not t.done() and belongs_to_old(t)]
        assert leaked == [], f"tasks of the stopped shard loop are still pending: {leaked}"
    finally:
        consumer.request_stop()
        await runner
        await _cancel_leftover_tasks()


# --------------------------------------------------------------------------------------------
# WAS A BUG (processor.py as_processor_factory l.551-553): AsyncConsumer documents `processor` as "a
# RecordProcessor class (or zero-argument factory)", but any non-class callable is taken as a
# record function: a factory is called with the records, so the shard fails with ProcessorFailed
# (TypeError) -- or, for a factory that accepts the argument, records are checkpointed unprocessed.
async def test_a_zero_argument_processor_factory_is_accepted() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    got: list[int] = []

    class P(RecordProcessorBase):
        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            got.extend(_n(r) for r in process_records_input.records)
            await process_records_input.checkpointer.checkpoint()

    def factory() -> P:
        return P()

    consumer = AsyncConsumer("s", "app", factory, store=MemoryLeaseStore("app"), client=fake, config=FAST)
    await consume_until(consumer, lambda: len(got) >= 5 or bool(consumer.failures), timeout=5)
    assert consumer.failures == []
    assert got == list(range(5))


# --------------------------------------------------------------------------------------------
# WAS A BUG (sync.py Consumer.__init__ l.43-48 / start l.62-68): the private loop thread is started
# before the AsyncConsumer is built and before __aenter__; if either raises (bad argument, stream
# not found) __exit__/close() never runs and the thread (a running event loop) leaks.
def _loop_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "kinesis-butler-loop" and t.is_alive()}


@contextlib.contextmanager
def _no_new_loop_threads() -> Iterator[None]:
    before = _loop_threads()
    yield
    new = _loop_threads() - before
    assert not new, f"{len(new)} event-loop thread(s) leaked"


def test_sync_consumer_that_fails_to_start_leaks_no_thread() -> None:
    fake = FakeKinesis()  # no stream "missing"
    with (
        _no_new_loop_threads(),
        pytest.raises(ConfigError),
        Consumer("missing", "app", Collector(), store=MemoryLeaseStore("app"), client=fake, config=FAST),
    ):
        pass


# --------------------------------------------------------------------------------------------
# WAS A BUG (sync.py Consumer.stop l.87-90): stop() is documented thread-safe, but called from the
# processor (a plain function runs in a worker thread) it blocks that thread until the run ends,
# while graceful shutdown waits for that very batch: a deadlock broken only by shutdown_timeout
# (30 s by default), after which the shard is cancelled instead of shut down gracefully. The sync
# facade has no non-blocking request_stop() to use instead.
def test_sync_stop_from_the_processor_does_not_wait_out_the_shutdown_timeout() -> None:

    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    config = dataclasses.replace(FAST, shutdown_timeout=1.0)
    took: list[float] = []
    holder: list[Consumer] = []

    def handle(records: list[object]) -> None:
        if not took:
            started = time.monotonic()
            holder[0].stop()
            took.append(time.monotonic() - started)

    consumer = Consumer("s", "app", handle, store=MemoryLeaseStore("app"), client=fake, config=config)
    holder.append(consumer)
    try:
        consumer.start()
        consumer.wait(timeout=10)
        wait_until_sync(lambda: bool(took), timeout=10, what="the processor to return from stop()")
    finally:
        consumer.close()
    assert took, "the processor never returned from stop()"
    assert took[0] < config.shutdown_timeout, f"stop() from the processor blocked {took[0]:.2f} s"

"""The worker end to end on FakeKinesis and the memory store (fast, deterministic).

The same scenarios run against the real emulator in tests/integration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter, defaultdict

import pytest

from kinesis_butler import (
    AsyncConsumer,
    CheckpointError,
    ConsumerConfig,
    InitializationInput,
    LeaseLost,
    LeaseLostInput,
    ProcessorFailed,
    ProcessRecordsInput,
    Record,
    RecordProcessorBase,
    ShardEndedInput,
)
from kinesis_butler.errors import ExpiredIterator, Throttled
from kinesis_butler.stores import MemoryBacking, MemoryLeaseStore
from kinesis_butler.testing.fake import FakeKinesis
from tests.helpers import Collector, consume_until, wait_until

FAST = ConsumerConfig(
    failover_time=1.0,
    idle_poll_interval=0.01,
    min_poll_interval=0.001,
    shard_read_calls_per_second=1000.0,
    shard_sync_interval=0.05,
    take_interval=0.05,
    processor_retry_base=0.001,
    processor_retry_cap=0.01,
    shutdown_timeout=5,
)


def _fill(fake: FakeKinesis, stream: str, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        fake.put(stream, json.dumps({"n": n}).encode(), f"key-{n % 13}")


async def test_every_record_is_consumed_once_in_shard_order() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 4)
    _fill(fake, "s", 400)
    collect = Collector()
    consumer = AsyncConsumer("s", "app", collect, store=MemoryLeaseStore("app"), client=fake, config=FAST)
    await consume_until(consumer, lambda: len(collect.records) >= 400)
    assert sorted(collect.numbers) == list(range(400))
    by_shard: dict[str, list[int]] = defaultdict(list)
    for record in collect.records:
        by_shard[record.shard_id].append(int(record.sequence_number))
        assert record.stream == "s"
    assert len(by_shard) == 4
    assert all(seqs == sorted(seqs) for seqs in by_shard.values())


async def test_restart_resumes_after_the_last_checkpoint() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 2)
    backing = MemoryBacking()
    _fill(fake, "s", 100)
    first = Collector()
    await consume_until(
        AsyncConsumer(
            "s", "app", first, store=MemoryLeaseStore("app", backing=backing), client=fake, config=FAST
        ),
        lambda: len(first.records) >= 100,
    )
    _fill(fake, "s", 50, start=100)
    second = Collector()
    await consume_until(
        AsyncConsumer(
            "s", "app", second, store=MemoryLeaseStore("app", backing=backing), client=fake, config=FAST
        ),
        lambda: len(second.records) >= 50,
    )
    assert sorted(second.numbers) == list(range(100, 150))
    assert sorted(first.numbers) == list(range(100))


async def test_a_raising_processor_gets_the_same_batch_again() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 10)
    attempts: list[int] = []
    delivered: list[int] = []

    class Flaky(RecordProcessorBase):
        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            attempts.append(process_records_input.attempt)
            if len(attempts) < 3:
                raise RuntimeError("downstream unavailable")
            delivered.extend(json.loads(r.data)["n"] for r in process_records_input.records)
            await process_records_input.checkpointer.checkpoint()

    consumer = AsyncConsumer("s", "app", Flaky, store=MemoryLeaseStore("app"), client=fake, config=FAST)
    await consume_until(consumer, lambda: len(delivered) >= 10)
    assert attempts[:3] == [1, 2, 3]
    assert delivered == list(range(10))
    assert consumer.failures == []


async def test_a_processor_that_keeps_raising_stops_its_shard_without_checkpointing() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    store = MemoryLeaseStore("app")
    calls = 0

    async def broken(records: list[Record]) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad record")

    config = dataclasses.replace(FAST, processor_max_attempts=3)
    consumer = AsyncConsumer("s", "app", broken, store=store, client=fake, config=config)
    await consume_until(consumer, lambda: bool(consumer.failures))
    (failure,) = consumer.failures
    assert isinstance(failure, ProcessorFailed)
    assert failure.attempts == 3 and calls == 3
    assert "ValueError: bad record" in str(failure)
    backing_store = MemoryLeaseStore("app", backing=store.backing)
    (lease,) = await backing_store.list_leases()
    assert lease.checkpoint.sequence == "TRIM_HORIZON"  # nothing was skipped


async def test_expired_iterators_and_throttling_lose_and_repeat_nothing() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 30)
    collect = Collector()
    fake.fail_next("get_records", Throttled("slow down", operation="GetRecords"))
    config = dataclasses.replace(FAST, max_records=10)
    consumer = AsyncConsumer("s", "app", collect, store=MemoryLeaseStore("app"), client=fake, config=config)
    runner = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(collect.records) >= 10)
    fake.fail_next("get_records", ExpiredIterator("expired", operation="GetRecords"))
    await wait_until(lambda: len(collect.records) >= 30)
    consumer.request_stop()
    await runner
    assert collect.numbers == list(range(30))


async def test_children_start_only_after_their_parents_reach_shard_end() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 2)
    _fill(fake, "s", 60)
    collect = Collector()
    store = MemoryLeaseStore("app")
    consumer = AsyncConsumer("s", "app", collect, store=store, client=fake, config=FAST)
    runner = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(collect.records) >= 60)
    left, right = fake.split("s", "shardId-000000000000")
    merged = fake.merge("s", right, "shardId-000000000001")
    _fill(fake, "s", 60, start=60)
    await wait_until(lambda: len(collect.records) >= 120)
    consumer.request_stop()
    await runner
    assert sorted(collect.numbers) == list(range(120))
    order = [r.shard_id for r in collect.records]
    last_of = {shard: max(i for i, s in enumerate(order) if s == shard) for shard in set(order)}
    first_of = {shard: min(i for i, s in enumerate(order) if s == shard) for shard in set(order)}
    for parent, child in [
        ("shardId-000000000000", left),
        ("shardId-000000000000", right),
        (right, merged),
        ("shardId-000000000001", merged),
    ]:
        if parent in last_of and child in first_of:
            assert last_of[parent] < first_of[child], f"{child} read before its parent {parent} ended"
    assert {left, merged} <= set(first_of)  # `right` was merged away before it got records
    leases = {
        lease.lease_key: lease for lease in await MemoryLeaseStore("app", backing=store.backing).list_leases()
    }
    for closed in ("shardId-000000000000", "shardId-000000000001", right):
        assert leases[closed].checkpoint.is_shard_end


async def test_shard_end_writes_shard_end_and_the_children() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    left, right = fake.split("s", "shardId-000000000000")
    store = MemoryLeaseStore("app")
    ended: list[str] = []

    class P(RecordProcessorBase):
        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            return None

        async def shard_ended(self, shard_ended_input: ShardEndedInput) -> None:
            ended.append(shard_ended_input.shard_id)

    consumer = AsyncConsumer("s", "app", P, store=store, client=fake, config=FAST)
    observer = MemoryLeaseStore("app", backing=store.backing)
    runner = asyncio.create_task(consumer.run())
    await wait_until(lambda: ended == ["shardId-000000000000"])
    consumer.request_stop()
    await runner
    parent = await observer.get_lease("shardId-000000000000")
    assert parent is not None and parent.checkpoint.is_shard_end
    assert parent.child_shard_ids == {left, right}
    for child in (left, right):
        lease = await observer.get_lease(child)
        assert lease is not None and lease.parent_shard_ids == {"shardId-000000000000"}


async def test_a_lost_lease_cancels_processing_calls_lease_lost_and_refuses_checkpoints() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    store = MemoryLeaseStore("app")
    started = asyncio.Event()
    cancelled = asyncio.Event()
    lost: list[str] = []
    checkpointers = []

    class Slow(RecordProcessorBase):
        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            checkpointers.append(process_records_input.checkpointer)
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def lease_lost(self, lease_lost_input: LeaseLostInput) -> None:
            lost.append(lease_lost_input.shard_id)

    config = dataclasses.replace(FAST, renew_interval=0.05)
    consumer = AsyncConsumer("s", "app", Slow, store=store, client=fake, config=config)
    runner = asyncio.create_task(consumer.run())
    await asyncio.wait_for(started.wait(), 10)
    # Another worker steals the lease (a fenced take from the counter it read).
    thief = MemoryLeaseStore("app", backing=store.backing)
    (lease,) = await thief.list_leases()
    await thief.take_lease(lease, "thief")
    await asyncio.wait_for(cancelled.wait(), 10)
    await wait_until(lambda: lost == ["shardId-000000000000"])
    with pytest.raises(LeaseLost):
        await checkpointers[0].checkpoint()
    consumer.request_stop()
    await runner
    (after,) = await thief.list_leases()
    assert after.lease_owner == "thief"
    assert after.checkpoint.sequence == "TRIM_HORIZON"


async def test_checkpoints_cannot_go_backwards_or_past_what_was_delivered() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 3)
    errors: list[Exception] = []
    done = asyncio.Event()

    class P(RecordProcessorBase):
        async def initialize(self, initialization_input: InitializationInput) -> None:
            assert initialization_input.checkpoint.sequence == "TRIM_HORIZON"

        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            records = process_records_input.records
            cp = process_records_input.checkpointer
            await cp.checkpoint(records[1])
            for bad in (records[0], (str(int(records[-1].sequence_number) + 1), 0), "TRIM_HORIZON"):
                try:
                    await cp.checkpoint(bad)  # type: ignore[arg-type]
                except CheckpointError as exc:
                    errors.append(exc)
            await cp.checkpoint((records[2].sequence_number, 0))
            done.set()

    consumer = AsyncConsumer("s", "app", P, store=MemoryLeaseStore("app"), client=fake, config=FAST)
    runner = asyncio.create_task(consumer.run())
    await asyncio.wait_for(done.wait(), 10)
    consumer.request_stop()
    await runner
    assert [type(e) for e in errors] == [CheckpointError] * 3
    assert "goes backwards" in str(errors[0]) and "beyond the last delivered" in str(errors[1])


async def test_async_iteration_with_explicit_checkpoints() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 2)
    _fill(fake, "s", 40)
    backing = MemoryBacking()
    got: list[int] = []
    async with AsyncConsumer(
        "s", "app", store=MemoryLeaseStore("app", backing=backing), client=fake, config=FAST
    ) as consumer:
        async for record in consumer:
            got.append(json.loads(record.data)["n"])
            await consumer.checkpoint(record)
            if len(got) == 40:
                break
    assert sorted(got) == list(range(40))
    leases = await MemoryLeaseStore("app", backing=backing).list_leases()
    assert all(not lease.checkpoint.is_sentinel and lease.lease_owner is None for lease in leases)
    assert Counter(got).most_common(1)[0][1] == 1

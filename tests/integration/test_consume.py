"""A worker consuming the real emulator with the SQLite store: exactly once, resume, resharding."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from kinesis_butler import (
    AsyncConsumer,
    Consumer,
    ConsumerConfig,
    Lease,
    ProcessRecordsInput,
    Record,
    RecordProcessorBase,
    ShardEndedInput,
)
from kinesis_butler.aws import KinesisClient
from kinesis_butler.stores import open_store
from tests.helpers import Collector, consume_until, wait_until, wait_until_sync
from tests.integration.conftest import StreamFactory, put_numbers

pytestmark = pytest.mark.integration

CONFIG = ConsumerConfig(
    failover_time=3.0,
    idle_poll_interval=0.1,
    min_poll_interval=0.05,
    shard_read_calls_per_second=1000.0,
    shard_sync_interval=1.0,
    take_interval=0.2,
    shutdown_timeout=10,
)


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'leases.db'}"


async def _leases(tmp_path: Path) -> dict[str, Lease]:
    store = open_store(_sqlite(tmp_path), "app")
    await store.initialize()
    try:
        return {lease.lease_key: lease for lease in await store.list_leases()}
    finally:
        await store.aclose()


async def test_every_record_of_a_4_shard_stream_is_consumed_exactly_once(
    kinesis: KinesisClient, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(4)
    await put_numbers(kinesis, stream, 0, 2000)
    collect = Collector()
    consumer = AsyncConsumer(stream, "app", collect, store=_sqlite(tmp_path), client=kinesis, config=CONFIG)
    await consume_until(consumer, lambda: len(collect.records) >= 2000)
    assert Counter(collect.numbers) == Counter(range(2000))
    per_shard: dict[str, list[int]] = defaultdict(list)
    for record in collect.records:
        per_shard[record.shard_id].append(int(record.sequence_number))
    assert len(per_shard) == 4
    assert all(seqs == sorted(seqs) for seqs in per_shard.values())
    leases = list((await _leases(tmp_path)).values())
    assert len(leases) == 4
    assert all(lease.lease_owner is None for lease in leases)  # released on shutdown
    last = {shard: str(seqs[-1]) for shard, seqs in per_shard.items()}
    assert {lease.lease_key: lease.checkpoint.sequence for lease in leases} == last


async def test_stop_and_restart_resumes_with_nothing_lost_or_repeated(
    kinesis: KinesisClient, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(4)
    await put_numbers(kinesis, stream, 0, 600)
    first = Collector()
    await consume_until(
        AsyncConsumer(stream, "app", first, store=_sqlite(tmp_path), client=kinesis, config=CONFIG),
        lambda: len(first.records) >= 600,
    )
    await put_numbers(kinesis, stream, 600, 400)
    second = Collector()
    await consume_until(
        AsyncConsumer(stream, "app", second, store=_sqlite(tmp_path), client=kinesis, config=CONFIG),
        lambda: len(second.records) >= 400,
    )
    assert Counter(first.numbers) == Counter(range(600))
    assert Counter(second.numbers) == Counter(range(600, 1000))


async def test_split_and_merge_mid_consumption_keep_every_record_and_parent_order(
    kinesis: KinesisClient, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(2)
    await put_numbers(kinesis, stream, 0, 400)
    collect = Collector()
    consumer = AsyncConsumer(stream, "app", collect, store=_sqlite(tmp_path), client=kinesis, config=CONFIG)
    runner = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: len(collect.records) >= 100, timeout=60, what="the first records")
        shards = {s.shard_id: s for s in await kinesis.list_shards(stream)}
        first, second = sorted(shards)
        middle = (shards[first].starting_hash_key + shards[first].ending_hash_key) // 2
        await kinesis.split_shard(stream, first, middle)
        await kinesis.wait_for_active(stream)
        await put_numbers(kinesis, stream, 400, 300)
        after_split = {s.shard_id: s for s in await kinesis.list_shards(stream)}
        upper = next(
            s.shard_id
            for s in after_split.values()
            if s.parent_shard_id == first and s.starting_hash_key == middle
        )
        await kinesis.merge_shards(stream, upper, second)
        await kinesis.wait_for_active(stream)
        await put_numbers(kinesis, stream, 700, 300)
        await wait_until(lambda: len(set(collect.numbers)) >= 1000, timeout=90, what="all 1000 records")
    finally:
        consumer.request_stop()
        await runner
    assert Counter(collect.numbers) == Counter(range(1000))  # every record, once
    shards_now = await kinesis.list_shards(stream)
    order = [r.shard_id for r in collect.records]
    first_read = {s: order.index(s) for s in set(order)}
    last_read = {s: len(order) - 1 - order[::-1].index(s) for s in set(order)}
    checked = 0
    for shard in shards_now:
        for parent in shard.parent_ids:
            if shard.shard_id in first_read and parent in last_read:
                assert last_read[parent] < first_read[shard.shard_id], (
                    f"{shard.shard_id} read before {parent} ended"
                )
                checked += 1
    assert checked >= 2
    leases = await _leases(tmp_path)
    assert leases[first].checkpoint.is_shard_end
    assert leases[second].checkpoint.is_shard_end
    assert leases[upper].checkpoint.is_shard_end


async def test_a_kcl_style_processor_sees_its_lifecycle_and_checkpoints_sub_sequences(
    kinesis: KinesisClient, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(1)
    await put_numbers(kinesis, stream, 0, 50)
    events: list[str] = []
    got: list[Record] = []

    class Processor(RecordProcessorBase):
        async def initialize(self, initialization_input: object) -> None:
            events.append("initialize")

        async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
            got.extend(process_records_input.records)
            last = process_records_input.records[-1]
            await process_records_input.checkpointer.checkpoint((last.sequence_number, 0))

        async def shutdown_requested(self, shutdown_requested_input: object) -> None:
            events.append("shutdown_requested")

        async def shard_ended(self, shard_ended_input: ShardEndedInput) -> None:
            events.append("shard_ended")

    consumer = AsyncConsumer(stream, "app", Processor, store=_sqlite(tmp_path), client=kinesis, config=CONFIG)
    await consume_until(consumer, lambda: len(got) >= 50)
    assert events == ["initialize", "shutdown_requested"]
    (lease,) = (await _leases(tmp_path)).values()
    assert lease.checkpoint.sequence == got[-1].sequence_number
    assert lease.checkpoint.sub_sequence == 0


async def test_async_iteration_with_explicit_checkpoints(
    kinesis: KinesisClient, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(2)
    await put_numbers(kinesis, stream, 0, 100)
    got: list[int] = []
    async with AsyncConsumer(
        stream, "app", store=_sqlite(tmp_path), client=kinesis, config=CONFIG
    ) as consumer:
        async for record in consumer:
            got.append(json.loads(record.data)["n"])
            await consumer.checkpoint(record)
            if len(got) == 100:
                break
    assert sorted(got) == list(range(100))


def test_the_sync_facade_runs_a_plain_function(kinesis_endpoint: str, tmp_path: Path) -> None:
    async def setup() -> str:
        async with KinesisClient(endpoint_url=kinesis_endpoint, region="us-east-1") as client:
            name = f"kb-sync-{tmp_path.name[-8:]}".replace("_", "-")
            await client.create_stream(name, 2)
            await client.wait_for_active(name)
            await put_numbers(client, name, 0, 200)
            return name

    stream = asyncio.run(setup())
    got: list[int] = []

    def handle(records: list[Record]) -> None:  # a plain function: runs in a worker thread
        got.extend(json.loads(r.data)["n"] for r in records)

    consumer = Consumer(
        stream, "app", handle, store=_sqlite(tmp_path), endpoint_url=kinesis_endpoint, config=CONFIG
    )
    with consumer:
        wait_until_sync(lambda: len(got) >= 200, timeout=60, what="200 records")
    assert sorted(got) == list(range(200))


async def test_a_stream_deleted_under_a_running_worker_stops_it_with_a_clear_error(
    kinesis: KinesisClient, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(2)
    await put_numbers(kinesis, stream, 0, 50)
    collect = Collector()
    consumer = AsyncConsumer(stream, "app", collect, store=_sqlite(tmp_path), client=kinesis, config=CONFIG)
    runner = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(collect.records) >= 50, timeout=60, what="the records")
    await kinesis.delete_stream(stream)
    await asyncio.wait_for(runner, 60)  # the worker stops by itself: no tight retry loop
    assert consumer.failures
    assert any(
        "not found" in str(f).lower() or "ResourceNotFound" in type(f).__name__ for f in consumer.failures
    )
    leases = await _leases(tmp_path)
    assert all(lease.lease_owner is None for lease in leases.values())  # released, checkpoints kept
    assert all(not lease.checkpoint.is_sentinel for lease in leases.values())

"""Enhanced fan-out and KPL aggregates end to end, on the real emulator (kinesis-local serves
SubscribeToShard over HTTP/1.1; HTTP/2 is covered against the in-repo fan-out server)."""

from __future__ import annotations

import json
import uuid

import pytest

from kinesis_butler import AsyncConsumer, ConsumerConfig, ProcessRecordsInput, Record, RecordProcessorBase
from kinesis_butler.aws import KinesisClient, PutRecordsEntry
from kinesis_butler.retrieval.kpl import aggregate
from kinesis_butler.stores.memory import MemoryBacking, MemoryLeaseStore
from tests.helpers import Collector, consume_until
from tests.integration.conftest import StreamFactory, put_numbers

pytestmark = pytest.mark.integration


def _config(retrieval: str, **overrides: object) -> ConsumerConfig:
    return ConsumerConfig(
        failover_time=3.0,
        idle_poll_interval=0.2,
        min_poll_interval=0.05,
        shard_read_calls_per_second=50.0,
        shard_sync_interval=1.0,
        retrieval=retrieval,
        fanout_consumer_name=f"kb-{uuid.uuid4().hex[:8]}",
        **overrides,  # type: ignore[arg-type]
    )


async def test_a_fan_out_consumer_reads_every_record_once_and_resumes(
    kinesis: KinesisClient, new_stream: StreamFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stream = await new_stream(2)
    await put_numbers(kinesis, stream, 0, 400)
    backing = MemoryBacking()
    config = _config("fanout")
    first = Collector()
    consumer = AsyncConsumer(
        stream, "app", first, store=MemoryLeaseStore("app", backing=backing), client=kinesis, config=config
    )
    await consume_until(consumer, lambda: len(first.records) >= 400)
    arn = consumer.sources.fanout[stream]
    assert arn is not None
    assert "/consumer/" in arn
    assert "polling" not in caplog.text  # no shard fell back: it really was fan-out
    assert sorted(first.numbers) == list(range(400))

    await put_numbers(kinesis, stream, 400, 200)
    second = Collector()
    await consume_until(
        AsyncConsumer(
            stream,
            "app",
            second,
            store=MemoryLeaseStore("app", backing=backing),
            client=kinesis,
            config=config,
        ),
        lambda: len(second.records) >= 200,
    )
    assert sorted(second.numbers) == list(range(400, 600))  # resumed from the checkpoints
    consumers = await kinesis.list_stream_consumers(
        (await kinesis.describe_stream_summary(stream)).stream_arn
    )
    assert [c.consumer_name for c in consumers] == [config.fanout_consumer_name]  # registered once


class _StopsMidAggregate(RecordProcessorBase):
    """Checkpoints inside the second aggregate, once, and remembers everything it saw."""

    async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
        records = process_records_input.records
        before = len(_StopsMidAggregate.delivered)
        _StopsMidAggregate.delivered.extend(records)
        if before <= 136 < len(_StopsMidAggregate.delivered):
            await process_records_input.checkpointer.checkpoint(_StopsMidAggregate.delivered[136])

    delivered: list[Record] = []  # noqa: RUF012 - shared across the shard's instances on purpose


async def _run_until(
    kinesis: KinesisClient, stream: str, backing: MemoryBacking, config: ConsumerConfig, count: int
) -> list[Record]:
    """Run a worker until ``count`` records were delivered; return them."""
    _StopsMidAggregate.delivered = []
    store = MemoryLeaseStore("app", backing=backing)
    consumer = AsyncConsumer(stream, "app", _StopsMidAggregate, store=store, client=kinesis, config=config)
    await consume_until(consumer, lambda: len(_StopsMidAggregate.delivered) >= count)
    return _StopsMidAggregate.delivered


@pytest.mark.parametrize("retrieval", ["polling", "fanout"])
async def test_kpl_aggregates_are_expanded_and_a_restart_resumes_inside_one(
    kinesis: KinesisClient, new_stream: StreamFactory, retrieval: str
) -> None:
    stream = await new_stream(1)
    entries = [
        PutRecordsEntry(
            data=aggregate([(json.dumps({"n": a * 100 + i}).encode(), f"k{i}", None) for i in range(100)]),
            partition_key=f"agg-{a}",
        )
        for a in range(3)
    ]
    assert (await kinesis.put_records(stream, entries)).failed_record_count == 0
    backing = MemoryBacking()
    config = _config(retrieval)
    first = await _run_until(kinesis, stream, backing, config, 300)
    assert [json.loads(r.data)["n"] for r in first] == list(range(300))
    assert [r.sub_sequence_number for r in first[:101]] == [*range(100), 0]
    assert {r.partition_key for r in first} == {f"k{i}" for i in range(100)}
    checkpointed = first[136]
    assert checkpointed.sub_sequence_number == 36

    resumed = await _run_until(kinesis, stream, backing, config, 163)
    assert [json.loads(r.data)["n"] for r in resumed] == list(range(137, 300))  # inside aggregate 2
    assert resumed[0].sequence_number == checkpointed.sequence_number
    assert resumed[0].sub_sequence_number == 37

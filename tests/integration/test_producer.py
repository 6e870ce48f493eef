"""AsyncProducer against the real emulator, read back with AsyncConsumer: every record once,
in order per key, with KPL aggregation on and off."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict

import pytest

from kinesis_butler import AsyncConsumer
from kinesis_butler.aws import KinesisClient
from kinesis_butler.config import ProducerConfig
from kinesis_butler.producer import AsyncProducer
from kinesis_butler.retrieval.kpl import MAGIC
from tests.helpers import Collector, consume_until
from tests.integration.conftest import FAST_CONSUMER, StreamFactory

pytestmark = pytest.mark.integration

CONSUMER = FAST_CONSUMER
COUNT, KEYS = 3000, 60


@pytest.mark.parametrize("aggregate", [True, False], ids=["aggregated", "plain"])
async def test_round_trip_every_record_once_and_in_order_per_key(
    kinesis: KinesisClient, new_stream: StreamFactory, aggregate: bool
) -> None:
    stream = await new_stream(4)
    config = ProducerConfig(aggregate=aggregate, ordered=True, linger=0.02)
    async with AsyncProducer(stream, client=kinesis, config=config) as producer:
        handles = [await producer.put(json.dumps({"n": n}).encode(), f"key-{n % KEYS}") for n in range(COUNT)]
        await producer.flush()
        results = [await handle for handle in handles]
    assert {result.shard_id for result in results} == {f"shardId-{i:012d}" for i in range(4)}
    assert all((result.sub_sequence_number is not None) == aggregate for result in results)

    collect = Collector()
    consumer = AsyncConsumer(stream, "app", collect, store="memory://", client=kinesis, config=CONSUMER)
    await consume_until(consumer, lambda: len(collect.records) >= COUNT)
    assert Counter(collect.numbers) == Counter(range(COUNT))
    per_key: dict[str, list[int]] = defaultdict(list)
    for record in collect.records:
        per_key[record.partition_key].append(json.loads(record.data)["n"])
        assert not record.data.startswith(MAGIC)  # de-aggregated by the consumer
    assert len(per_key) == KEYS
    for key, numbers in per_key.items():
        assert numbers == [n for n in range(COUNT) if f"key-{n % KEYS}" == key]
    # Each handle named where its record was read.
    by_n = {
        json.loads(r.data)["n"]: (r.shard_id, r.sequence_number, r.sub_sequence_number)
        for r in collect.records
    }
    for n, result in enumerate(results):
        assert by_n[n] == (result.shard_id, result.sequence_number, result.sub_sequence_number or 0)


async def test_a_reshard_while_producing_loses_and_repeats_nothing(
    kinesis: KinesisClient, new_stream: StreamFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kinesis_butler.producer")
    stream = await new_stream(2)
    config = ProducerConfig(ordered=True, linger=0.02)
    half = COUNT // 2
    async with AsyncProducer(stream, client=kinesis, config=config) as producer:
        first = [await producer.put(json.dumps({"n": n}).encode(), f"key-{n % KEYS}") for n in range(half)]
        await producer.flush()
        assert all(handle.exception() is None for handle in first)
        await kinesis.update_shard_count(stream, 4)  # the producer's map still has the two parents
        await kinesis.wait_for_active(stream, timeout=20)
        second = [
            await producer.put(json.dumps({"n": n}).encode(), f"key-{n % KEYS}") for n in range(half, COUNT)
        ]
        await producer.flush()
        landed = {(await handle).shard_id for handle in second}
    open_shards = {s.shard_id for s in await kinesis.list_shards(stream) if not s.is_closed}
    assert landed <= open_shards
    assert "landed on" in caplog.text  # aggregates built for the parents were re-routed

    collect = Collector()
    consumer = AsyncConsumer(stream, "app", collect, store="memory://", client=kinesis, config=CONSUMER)
    await consume_until(consumer, lambda: len(collect.records) >= COUNT)
    assert Counter(collect.numbers) == Counter(range(COUNT))
    per_key: dict[str, list[int]] = defaultdict(list)
    for record in collect.records:
        per_key[record.partition_key].append(json.loads(record.data)["n"])
    for key, numbers in per_key.items():
        assert numbers == [n for n in range(COUNT) if f"key-{n % KEYS}" == key]

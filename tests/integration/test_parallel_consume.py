"""ordered_parallel against the real emulator: every record exactly once, per-key order kept,
real overlap between keys, and final checkpoints at each shard's last record."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from kinesis_butler import AsyncConsumer, ConsumerConfig, Record
from kinesis_butler.aws import KinesisClient
from kinesis_butler.parallel import ordered_parallel
from kinesis_butler.stores import open_store
from tests.helpers import consume_until
from tests.integration.conftest import StreamFactory, put_numbers

pytestmark = pytest.mark.integration

CONFIG = ConsumerConfig(
    failover_time=3.0,
    idle_poll_interval=0.1,
    min_poll_interval=0.05,
    shard_sync_interval=1.0,
    take_interval=0.2,
    shutdown_timeout=10,
)
RECORDS = 2000
KEYS = 300
CONCURRENCY = 32


async def test_2000_records_over_300_keys_run_once_in_key_order_with_concurrency_32(
    kinesis: KinesisClient, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(2)
    await put_numbers(kinesis, stream, 0, RECORDS, keys=KEYS)
    done: list[Record] = []
    running: dict[str, set[str]] = defaultdict(set)  # by shard: the keys being handled
    peak: Counter[str] = Counter()
    rng = random.Random(7)

    async def handle(record: Record) -> None:
        keys = running[record.shard_id]
        assert record.partition_key not in keys, "two records of one key overlapped"
        keys.add(record.partition_key)
        peak[record.shard_id] = max(peak[record.shard_id], len(keys))
        await asyncio.sleep(rng.random() * 0.004)  # a little I/O of random length
        keys.discard(record.partition_key)
        done.append(record)

    store_url = f"sqlite:///{tmp_path / 'leases.db'}"
    consumer = AsyncConsumer(
        stream,
        "app",
        ordered_parallel(handle, concurrency=CONCURRENCY, checkpoint_interval=0.2),
        store=store_url,
        client=kinesis,
        config=CONFIG,
    )
    await consume_until(consumer, lambda: len(done) >= RECORDS)
    assert consumer.failures == []

    numbers = [json.loads(r.data)["n"] for r in done]
    assert Counter(numbers) == Counter(range(RECORDS))  # exactly once
    by_key: dict[str, list[int]] = defaultdict(list)
    for record, n in zip(done, numbers, strict=True):
        by_key[record.partition_key].append(n)
    assert len(by_key) == KEYS
    assert all(ns == sorted(ns) for ns in by_key.values())  # put in n order, so run in n order
    assert peak == {shard: CONCURRENCY for shard in peak} and len(peak) == 2  # reached, never passed
    in_order = sorted(done, key=lambda r: int(r.sequence_number))

    last = {record.shard_id: record.sequence_number for record in in_order}
    assert len(last) == 2
    store = open_store(store_url, "app")
    await store.initialize()
    try:
        leases = await store.list_leases()
    finally:
        await store.aclose()
    assert {lease.lease_key: lease.checkpoint.sequence for lease in leases} == last
    assert all(lease.lease_owner is None for lease in leases)  # released on shutdown

"""A real store outage: PostgreSQL or Redis stopped for longer than the failover time, then back.

Workers keep processing what they hold until the failover time, then stop; when the store
returns they take their shards back and resume from the checkpoints. No record is lost and no
lease is corrupted (every lease ends released, with a checkpoint at the last record).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from kinesis_butler import AsyncConsumer, ConsumerConfig
from kinesis_butler.aws import KinesisClient
from kinesis_butler.stores import open_store
from tests.helpers import Collector, wait_until
from tests.integration.conftest import StreamFactory, put_numbers

pytestmark = pytest.mark.integration

FAILOVER = 4.0
OUTAGE = 10.0  # 2.5 x the failover time: long enough that every lease is given up


class _Server:
    def __init__(self, url: str, stop: object, start: object) -> None:
        self.url, self.stop, self.start = url, stop, start


@pytest.fixture(params=["postgres", "redis"])
def server(request: pytest.FixtureRequest) -> Iterator[_Server]:
    if request.param == "postgres":
        from kinesis_butler.testing.postgres import PostgresServer

        with PostgresServer.private() as pg:
            yield _Server(pg.dsn, pg.stop, pg.start)
    else:
        from kinesis_butler.testing.redis import RedisServer

        redis = RedisServer.private(persistent=True)  # durability needs AOF (docs/stores/redis.md)
        try:
            yield _Server(redis.url, redis.stop, redis.start)
        finally:
            redis.close()


async def test_an_outage_longer_than_the_failover_time_loses_nothing(
    server: _Server, kinesis: KinesisClient, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(2)
    await put_numbers(kinesis, stream, 0, 100)
    seen = Collector()
    config = ConsumerConfig(
        failover_time=FAILOVER,
        idle_poll_interval=0.1,
        min_poll_interval=0.05,
        shard_read_calls_per_second=1000.0,
        shard_sync_interval=2.0,
    )
    consumer = AsyncConsumer(stream, "outage-app", seen, store=server.url, client=kinesis, config=config)
    runner = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: len(seen.records) >= 100, timeout=60, what="the first records")
        await asyncio.to_thread(server.stop)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        down_since = loop.time()
        await put_numbers(kinesis, stream, 100, 50)
        # Within the failover time the worker goes on with the shards it holds.
        await wait_until(
            lambda: len(set(seen.numbers)) >= 150, timeout=FAILOVER, what="processing during the outage"
        )
        await wait_until(lambda: not consumer.coordinator.held, timeout=OUTAGE, what="leases given up")
        # Given up a little before others may take them (self-fencing), counted from the last
        # successful write, which was at most one renew interval before the outage began.
        gave_up = loop.time() - down_since
        fence = consumer.coordinator.self_fence_after
        assert fence - config.effective_renew_interval <= gave_up <= FAILOVER
        await wait_until(lambda: loop.time() - down_since >= OUTAGE, timeout=OUTAGE + 1, what="the outage")
        await put_numbers(kinesis, stream, 150, 50)
        await asyncio.to_thread(server.start)  # type: ignore[arg-type]
        await wait_until(
            lambda: set(seen.numbers) >= set(range(200)), timeout=60, what="recovery after the outage"
        )
    finally:
        consumer.request_stop()
        await runner
    assert consumer.failures == []
    store = open_store(server.url, "outage-app")
    await store.initialize()
    leases = await store.list_leases()
    await store.aclose()
    last = {}
    for record in seen.records:
        last[record.shard_id] = max(last.get(record.shard_id, 0), int(record.sequence_number))
    assert {lease.lease_key: int(lease.checkpoint.sequence) for lease in leases} == last
    assert all(lease.lease_owner is None for lease in leases)
    # What was processed during the outage was checkpointed when the store came back (the
    # worker took its own leases back, untouched by anyone else): nothing is delivered twice.
    assert sorted(seen.numbers) == list(range(200))

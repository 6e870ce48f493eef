"""Fixtures for tests against the real emulator: a client, and fresh streams per test."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from kinesis_butler.aws import AwsCredentials, KinesisClient, PutRecordsEntry
from kinesis_butler.config import ConsumerConfig
from kinesis_butler.errors import ResourceInUse, ResourceNotFound

StreamFactory = Callable[[int], Awaitable[str]]

# A worker that reads the emulator quickly (no real read quota there) and stops fast.
FAST_CONSUMER = ConsumerConfig(
    failover_time=3.0,
    idle_poll_interval=0.1,
    min_poll_interval=0.05,
    shard_read_calls_per_second=1000.0,
    shard_sync_interval=1.0,
    take_interval=0.2,
    shutdown_timeout=10,
)
DEADLINE = 20.0  # seconds any wait may take before the test fails


@pytest.fixture
async def kinesis(kinesis_endpoint: str) -> AsyncIterator[KinesisClient]:
    async with KinesisClient(
        endpoint_url=kinesis_endpoint, region="us-east-1", credentials=AwsCredentials("test", "test")
    ) as client:
        yield client


@pytest.fixture
async def new_stream(kinesis: KinesisClient) -> AsyncIterator[StreamFactory]:
    """Creates fresh ACTIVE streams with unique names (the emulator slows down as shards fill);
    deletes them after the test."""
    created: list[str] = []

    async def create(shard_count: int) -> str:
        name = f"kb-{uuid.uuid4().hex[:12]}"
        await kinesis.create_stream(name, shard_count)
        created.append(name)
        await kinesis.wait_for_active(name, timeout=DEADLINE)
        return name

    yield create
    for name in created:
        with contextlib.suppress(ResourceNotFound, ResourceInUse):
            await kinesis.delete_stream(name)


async def put_numbers(kinesis: KinesisClient, stream: str, start: int, count: int, *, keys: int = 31) -> None:
    """Write records whose payload is ``{"n": i}`` for i in [start, start + count)."""
    for first in range(start, start + count, 500):
        entries = [
            PutRecordsEntry(data=json.dumps({"n": n}).encode(), partition_key=f"key-{n % keys}")
            for n in range(first, min(start + count, first + 500))
        ]
        result = await kinesis.put_records(stream, entries)
        assert result.failed_record_count == 0

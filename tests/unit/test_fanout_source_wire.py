"""FanOutSource on the wire: the real client over HTTP/2 (TLS, ALPN) against the in-repo fan-out
server, for what the emulator cannot do: broken subscriptions, refusals, shard end mid-stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kinesis_butler import ConsumerConfig
from kinesis_butler.aws import AwsCredentials, KinesisClient, StreamingOptions
from kinesis_butler.models import TRIM_HORIZON, Record, StartPosition
from kinesis_butler.retrieval.base import Batch
from kinesis_butler.retrieval.fanout import FanOutSource
from kinesis_butler.testing.fanout_server import FakeFanOutServer, Fault, Script

STREAM = "orders"
SHARD = "shardId-000000000000"
CREDENTIALS = AwsCredentials("test", "test")
CONFIG = ConsumerConfig(min_poll_interval=0.05)


@pytest.fixture
async def server() -> AsyncIterator[FakeFanOutServer]:
    async with FakeFanOutServer() as fake:
        fake.add_stream(STREAM, shards=1)
        fake.resubscribe_interval = 0.0
        fake.batch_size = 10
        yield fake


@pytest.fixture
async def client(server: FakeFanOutServer) -> AsyncIterator[KinesisClient]:
    async with KinesisClient(
        endpoint_url=server.https_url,
        region="us-east-1",
        credentials=CREDENTIALS,
        streaming_options=StreamingOptions(ca_data=server.ca_pem, read_timeout=2.0),
    ) as kinesis:
        yield kinesis


async def _consumer_arn(server: FakeFanOutServer) -> str:
    async with KinesisClient(
        endpoint_url=server.http_url, region="us-east-1", credentials=CREDENTIALS
    ) as admin:
        return (await admin.ensure_stream_consumer(server.stream_arn(STREAM), "app")).consumer_arn


def _source(client: KinesisClient, arn: str) -> FanOutSource:
    start = StartPosition()
    return FanOutSource(client, STREAM, SHARD, consumer_arn=arn, config=CONFIG, start_position=start)


async def _until_end(source: FanOutSource) -> list[Batch]:
    batches: list[Batch] = []
    async with asyncio.timeout(30):
        while not batches or not batches[-1].shard_end:
            batches.append(await source.next_batch())
    return batches


def _data(batches: list[Batch]) -> list[bytes]:
    return [r.data for b in batches for r in b.records]


async def test_broken_subscriptions_resume_and_the_shard_ends_with_its_children(
    server: FakeFanOutServer, client: KinesisClient
) -> None:
    arn = await _consumer_arn(server)
    for i in range(60):
        server.put(STREAM, SHARD, f"{i}".encode())
    server.faults.extend(
        [
            Script(Fault.END, after_events=1),  # ended early: resubscribe from the continuation
            Script(Fault.RESET, after_events=1),  # RST_STREAM
            Script(Fault.CORRUPT, after_events=1),  # a frame with a bad CRC
            Script(Fault.KILL, after_events=1),  # the connection dropped
            Script(Fault.EXCEPTION, after_events=1),  # InternalFailure frame
        ]
    )
    server.close_shard(STREAM, SHARD, ["shardId-000000000001", "shardId-000000000002"])
    source = FanOutSource(
        client, STREAM, SHARD, consumer_arn=arn, config=CONFIG, start_position=StartPosition()
    )
    await source.start(TRIM_HORIZON)
    try:
        batches = await _until_end(source)
    finally:
        await source.aclose()
    assert _data(batches) == [f"{i}".encode() for i in range(60)]  # each once, in order
    assert batches[-1].child_shard_ids == ("shardId-000000000001", "shardId-000000000002")
    assert [s.position["Type"] for s in server.subscriptions][:2] == ["TRIM_HORIZON", "AFTER_SEQUENCE_NUMBER"]
    assert len(server.subscriptions) == 6
    assert {s.protocol for s in server.subscriptions} == {"h2"}


async def test_a_duplicate_subscription_is_refused_then_retried(
    server: FakeFanOutServer, client: KinesisClient
) -> None:
    arn = await _consumer_arn(server)
    server.resubscribe_interval = 1.5  # AWS: 5 s
    for i in range(20):
        server.put(STREAM, SHARD, f"{i}".encode())
    server.faults.append(Script(Fault.END, after_events=1))
    source = FanOutSource(
        client, STREAM, SHARD, consumer_arn=arn, config=CONFIG, start_position=StartPosition()
    )
    await source.start(TRIM_HORIZON)
    got: list[Record] = []
    try:
        async with asyncio.timeout(30):
            while len(got) < 20:
                got.extend((await source.next_batch()).records)
    finally:
        await source.aclose()
    assert [r.data for r in got] == [f"{i}".encode() for i in range(20)]
    assert len(server.subscriptions) == 2  # the refused one in between was not accepted
    assert source.subscriptions == 2

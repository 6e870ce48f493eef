"""Enhanced fan-out against the real kinesis-local emulator: consumers, and SubscribeToShard from
every starting position over HTTP/1.1, h2c and HTTP/2 over TLS (ALPN h2 on its TLS port).

Emulator behaviour these tests allow for: it sends an event every second (so each subscription
takes a second or two), sends no ``initial-response``, answers a second concurrent subscription
with HTTP 200 and a ResourceInUseException frame, and keeps a subscription whose client left for
about 3 s (resubscribing to the same shard is retried through ResourceInUse).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from kinesis_butler.aws import AwsCredentials, KinesisClient, PutRecordsEntry
from kinesis_butler.aws.kinesis import ShardSubscription, StreamConsumer, SubscribeToShardEvent
from kinesis_butler.aws.streaming import StreamingOptions
from kinesis_butler.errors import ResourceInUse, ResourceNotFound
from kinesis_butler.models import Record, Shard
from kinesis_butler.testing.emulator import KinesisEmulator
from tests.helpers import wait_until_async
from tests.integration.conftest import DEADLINE, StreamFactory

pytestmark = pytest.mark.integration

CREDENTIALS = AwsCredentials("test", "test")


@pytest.fixture
async def consumer(kinesis: KinesisClient, new_stream: StreamFactory) -> AsyncIterator[StreamConsumer]:
    """An ACTIVE consumer on a fresh 3-shard stream; deregistered afterwards."""
    stream = await new_stream(3)
    stream_arn = (await kinesis.describe_stream_summary(stream)).stream_arn
    registered = await kinesis.ensure_stream_consumer(
        stream_arn, f"app-{uuid.uuid4().hex[:8]}", timeout=DEADLINE
    )
    yield registered
    await kinesis.deregister_stream_consumer(consumer_arn=registered.consumer_arn)


async def shards_of(kinesis: KinesisClient, consumer: StreamConsumer) -> list[Shard]:
    return await kinesis.list_shards(consumer.stream_arn.rsplit("/", 1)[-1])


async def put_to(kinesis: KinesisClient, stream: str, shard: Shard, payloads: list[bytes]) -> list[str]:
    """Writes ``payloads`` to ``shard`` (by explicit hash key); returns their sequence numbers."""
    entries = [PutRecordsEntry(p, "pk", explicit_hash_key=str(shard.starting_hash_key)) for p in payloads]
    result = await kinesis.put_records(stream, entries)
    assert result.failed_record_count == 0
    assert {r.shard_id for r in result.records} == {shard.shard_id}
    return [r.sequence_number or "" for r in result.records]


async def receive(
    kinesis: KinesisClient,
    consumer: StreamConsumer,
    shard: Shard,
    kind: str,
    count: int,
    *,
    sequence_number: str | None = None,
    timestamp: float | None = None,
) -> list[SubscribeToShardEvent]:
    """Subscribes (retrying while the emulator still holds a previous subscription) and returns
    the events until ``count`` records arrived (at least one event)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        events: list[SubscribeToShardEvent] = []
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                subscription = kinesis.subscribe_to_shard(
                    consumer.consumer_arn,
                    shard.shard_id,
                    kind,
                    sequence_number=sequence_number,
                    timestamp=timestamp,
                )
                async with subscription:
                    async for event in subscription:
                        events.append(event)
                        if sum(len(e.records) for e in events) >= count:
                            return events
        except ResourceInUse:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)  # poll interval while the emulator releases the old one


async def read_first(subscription: ShardSubscription) -> SubscribeToShardEvent:
    async with asyncio.timeout(DEADLINE), subscription:
        return await anext(subscription)


def records(events: list[SubscribeToShardEvent]) -> list[Record]:
    return [r for e in events for r in e.records]


def stream_name(consumer: StreamConsumer) -> str:
    return consumer.stream_arn.rsplit("/", 1)[-1]


# -- consumers -----------------------------------------------------------------------------------


async def test_the_consumer_lifecycle(kinesis: KinesisClient, new_stream: StreamFactory) -> None:
    stream = await new_stream(1)
    stream_arn = (await kinesis.describe_stream_summary(stream)).stream_arn
    registered = await kinesis.register_stream_consumer(stream_arn, "lifecycle")
    assert registered.consumer_name == "lifecycle"
    assert registered.consumer_arn.startswith(f"{stream_arn}/consumer/lifecycle:")
    assert registered.stream_arn == stream_arn
    active = await kinesis.wait_for_consumer_active(stream_arn=stream_arn, name="lifecycle", timeout=DEADLINE)
    assert active.consumer_status == "ACTIVE"
    by_arn = await kinesis.describe_stream_consumer(consumer_arn=registered.consumer_arn)
    assert by_arn == active
    assert (
        await kinesis.ensure_stream_consumer(stream_arn, "lifecycle")
    ).consumer_arn == registered.consumer_arn
    with pytest.raises(ResourceInUse):
        await kinesis.register_stream_consumer(stream_arn, "lifecycle")
    await kinesis.ensure_stream_consumer(stream_arn, "second", timeout=DEADLINE)  # CREATING ones cannot go
    assert sorted(c.consumer_name for c in await kinesis.list_stream_consumers(stream_arn)) == [
        "lifecycle",
        "second",
    ]
    assert (await kinesis.describe_stream_summary(stream)).consumer_count == 2

    await kinesis.deregister_stream_consumer(stream_arn=stream_arn, name="lifecycle")
    await kinesis.deregister_stream_consumer(stream_arn=stream_arn, name="second")

    async def gone() -> bool:
        try:
            await kinesis.describe_stream_consumer(consumer_arn=registered.consumer_arn)
        except ResourceNotFound:
            return True
        return False

    async def none_left() -> bool:
        return await kinesis.list_stream_consumers(stream_arn) == []

    await wait_until_async(gone, timeout=DEADLINE, what="the consumer to be deregistered")
    # Both were deregistered; the second may stay DELETING a moment longer than the first.
    await wait_until_async(none_left, timeout=DEADLINE, what="no consumer left on the stream")


# -- subscriptions -------------------------------------------------------------------------------


@pytest.fixture(params=["http/1.1", "h2c"])
async def subscriber(request: pytest.FixtureRequest, kinesis_endpoint: str) -> AsyncIterator[KinesisClient]:
    options = StreamingOptions(h2c=request.param == "h2c")
    async with KinesisClient(
        endpoint_url=kinesis_endpoint, region="us-east-1", credentials=CREDENTIALS, streaming_options=options
    ) as client:
        client.expected_protocol = "h2" if request.param == "h2c" else "http/1.1"  # type: ignore[attr-defined]
        yield client


async def test_trim_horizon_delivers_put_records(
    kinesis: KinesisClient, subscriber: KinesisClient, consumer: StreamConsumer
) -> None:
    shard = (await shards_of(kinesis, consumer))[0]
    payloads = [f"{i}:".encode() + os.urandom(16) for i in range(20)]
    sequences = await put_to(kinesis, stream_name(consumer), shard, payloads)
    events = await receive(subscriber, consumer, shard, "TRIM_HORIZON", 20)
    got = records(events)
    assert [r.data for r in got] == payloads
    assert [r.sequence_number for r in got] == sequences
    assert all(r.partition_key == "pk" and r.approximate_arrival_timestamp > 0 for r in got)
    assert events[-1].continuation_sequence_number == sequences[-1]
    assert events[-1].millis_behind_latest == 0
    assert not events[-1].at_shard_end


async def test_sequence_and_timestamp_positions(
    kinesis: KinesisClient, subscriber: KinesisClient, consumer: StreamConsumer
) -> None:
    shards = await shards_of(kinesis, consumer)
    stream = stream_name(consumer)
    written = {
        s.shard_id: await put_to(kinesis, stream, s, [bytes([i]) * 8 for i in range(10)]) for s in shards
    }
    # Arrival times as the emulator recorded them, read back by polling.
    iterator = await kinesis.get_shard_iterator(stream, shards[2].shard_id, "TRIM_HORIZON")
    arrivals = [r.approximate_arrival_timestamp for r in (await kinesis.get_records(iterator)).records]
    at_time = arrivals[5]

    at_seq, after_seq, at_ts = await asyncio.gather(
        receive(
            subscriber,
            consumer,
            shards[0],
            "AT_SEQUENCE_NUMBER",
            6,
            sequence_number=written[shards[0].shard_id][4],
        ),
        receive(
            subscriber,
            consumer,
            shards[1],
            "AFTER_SEQUENCE_NUMBER",
            5,
            sequence_number=written[shards[1].shard_id][4],
        ),
        receive(subscriber, consumer, shards[2], "AT_TIMESTAMP", 1, timestamp=at_time),
    )
    assert [r.data for r in records(at_seq)] == [bytes([i]) * 8 for i in range(4, 10)]
    assert [r.data for r in records(after_seq)] == [bytes([i]) * 8 for i in range(5, 10)]
    expected = [bytes([i]) * 8 for i, arrival in enumerate(arrivals) if arrival >= at_time]
    assert [r.data for r in records(at_ts)] == expected


async def test_latest_delivers_only_later_records(
    kinesis: KinesisClient, subscriber: KinesisClient, consumer: StreamConsumer
) -> None:
    shard = (await shards_of(kinesis, consumer))[1]
    stream = stream_name(consumer)
    await put_to(kinesis, stream, shard, [b"old"])
    got: list[bytes] = []
    async with asyncio.timeout(DEADLINE):
        subscription = subscriber.subscribe_to_shard(consumer.consumer_arn, shard.shard_id, "LATEST")
        async with subscription:
            assert subscription.protocol == subscriber.expected_protocol  # type: ignore[attr-defined]
            async for event in subscription:
                got += [r.data for r in event.records]
                if not got:  # the first (empty) event proves the subscription started
                    await put_to(kinesis, stream, shard, [b"new-1", b"new-2"])
                if len(got) >= 2:
                    break
    assert got == [b"new-1", b"new-2"]


async def test_resubscribing_from_the_continuation_sequence_number(
    kinesis: KinesisClient, subscriber: KinesisClient, consumer: StreamConsumer
) -> None:
    shard = (await shards_of(kinesis, consumer))[2]
    stream = stream_name(consumer)
    first = await put_to(kinesis, stream, shard, [b"a", b"b", b"c"])
    events = await receive(subscriber, consumer, shard, "TRIM_HORIZON", 3)
    continuation = events[-1].continuation_sequence_number
    assert continuation == first[-1]
    await put_to(kinesis, stream, shard, [b"d", b"e"])
    after = await receive(
        subscriber, consumer, shard, "AFTER_SEQUENCE_NUMBER", 2, sequence_number=continuation
    )
    assert [r.data for r in records(after)] == [b"d", b"e"]
    at = await receive(subscriber, consumer, shard, "AT_SEQUENCE_NUMBER", 3, sequence_number=continuation)
    assert [r.data for r in records(at)] == [b"c", b"d", b"e"]


async def test_a_second_concurrent_subscription_is_resource_in_use(
    kinesis: KinesisClient, consumer: StreamConsumer
) -> None:
    shard = (await shards_of(kinesis, consumer))[0]
    async with asyncio.timeout(DEADLINE):
        async with kinesis.subscribe_to_shard(consumer.consumer_arn, shard.shard_id, "LATEST") as first:
            await anext(first)
            with pytest.raises(ResourceInUse) as caught:  # an exception frame from kinesis-local
                async with kinesis.subscribe_to_shard(
                    consumer.consumer_arn, shard.shard_id, "LATEST"
                ) as second:
                    await anext(second)
    assert caught.value.code == "ResourceInUseException"
    assert caught.value.operation == "SubscribeToShard"


async def test_an_unknown_consumer_is_resource_not_found(
    kinesis: KinesisClient, consumer: StreamConsumer
) -> None:
    unknown = kinesis.subscribe_to_shard(
        f"{consumer.stream_arn}/consumer/nobody:{int(time.time())}", "shardId-000000000000", "LATEST"
    )
    with pytest.raises(ResourceNotFound):  # an HTTP error or an exception frame: either is fine
        await read_first(unknown)


# -- HTTP/2 over TLS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_emulator() -> Iterator[KinesisEmulator]:
    """A second emulator, for its TLS port (the session fixture yields only the plain URL)."""
    with KinesisEmulator() as emulator:
        yield emulator


async def test_http2_over_tls_by_alpn(tls_emulator: KinesisEmulator) -> None:
    async with KinesisClient(
        endpoint_url=tls_emulator.endpoint_url, region="us-east-1", credentials=CREDENTIALS
    ) as admin:
        stream = f"kb-{uuid.uuid4().hex[:12]}"
        await admin.create_stream(stream, 1)
        summary = await admin.wait_for_active(stream, timeout=DEADLINE)
        consumer = await admin.ensure_stream_consumer(summary.stream_arn, "tls", timeout=DEADLINE)
        (shard,) = await admin.list_shards(stream)
        await put_to(admin, stream, shard, [b"over h2"])
        # The emulator's certificate names no host: trust it blindly, as one does a local emulator.
        options = StreamingOptions(verify_tls=False)
        tls_url = f"https://127.0.0.1:{tls_emulator.tls_port}"
        async with KinesisClient(
            endpoint_url=tls_url, region="us-east-1", credentials=CREDENTIALS, streaming_options=options
        ) as tls:
            subscription = tls.subscribe_to_shard(consumer.consumer_arn, shard.shard_id, "TRIM_HORIZON")
            async with asyncio.timeout(DEADLINE), subscription:
                assert subscription.protocol == "h2"
                event = await anext(subscription)
    assert [r.data for r in event.records] == [b"over h2"]

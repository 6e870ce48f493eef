"""KinesisClient's enhanced fan-out operations against the fake fan-out server: consumers, every
starting position, shard end, and every scripted failure, over HTTP/2 (TLS), h2c and HTTP/1.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import msgspec
import pytest

from kinesis_butler.aws import AwsCredentials, KinesisClient
from kinesis_butler.aws.eventstream import encode_message
from kinesis_butler.aws.kinesis import ShardSubscription, SubscribeToShardEvent
from kinesis_butler.aws.streaming import StreamingOptions, StreamingResponse
from kinesis_butler.errors import (
    AccessDenied,
    AwsError,
    ClosedError,
    ConfigError,
    ConnectionLost,
    EventStreamError,
    ResourceInUse,
    ResourceNotFound,
    ServiceUnavailable,
    Throttled,
)
from kinesis_butler.models import Record
from kinesis_butler.testing.fanout_server import FakeFanOutServer, Fault, Script

STREAM = "orders"
SHARD = "shardId-000000000000"
DEADLINE = 10.0
CREDENTIALS = AwsCredentials("test", "test")
PROTOCOLS = ["h2", "h2c", "http/1.1"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server() -> AsyncIterator[FakeFanOutServer]:
    async with FakeFanOutServer() as fake:
        fake.add_stream(STREAM, shards=4)
        fake.clock = Clock()
        yield fake


@pytest.fixture
async def admin(server: FakeFanOutServer) -> AsyncIterator[KinesisClient]:
    """The JSON operations go over plain HTTP/1.1 (aiohttp cannot trust the fake's certificate)."""
    async with KinesisClient(
        endpoint_url=server.http_url, region="us-east-1", credentials=CREDENTIALS
    ) as client:
        yield client


def subscriber_for(server: FakeFanOutServer, protocol: str, **options: float) -> KinesisClient:
    if protocol == "h2":
        streaming = StreamingOptions(ca_data=server.ca_pem, **options)  # type: ignore[arg-type]
        return KinesisClient(
            endpoint_url=server.https_url,
            region="us-east-1",
            credentials=CREDENTIALS,
            streaming_options=streaming,
        )
    streaming = StreamingOptions(h2c=protocol == "h2c", **options)  # type: ignore[arg-type]
    return KinesisClient(
        endpoint_url=server.http_url, region="us-east-1", credentials=CREDENTIALS, streaming_options=streaming
    )


@pytest.fixture(params=PROTOCOLS)
async def kinesis(request: pytest.FixtureRequest, server: FakeFanOutServer) -> AsyncIterator[KinesisClient]:
    async with subscriber_for(server, request.param) as client:
        yield client


@pytest.fixture
async def consumer_arn(admin: KinesisClient, server: FakeFanOutServer) -> str:
    consumer = await admin.ensure_stream_consumer(server.stream_arn(STREAM), "app")
    return consumer.consumer_arn


async def collect(subscription: ShardSubscription, records: int) -> list[SubscribeToShardEvent]:
    """Events until ``records`` records arrived (or the subscription ended)."""
    events: list[SubscribeToShardEvent] = []
    async with asyncio.timeout(DEADLINE):
        async for event in subscription:
            events.append(event)
            if sum(len(e.records) for e in events) >= records:
                break
    return events


def data_of(events: list[SubscribeToShardEvent]) -> list[bytes]:
    return [r.data for e in events for r in e.records]


# -- consumers -----------------------------------------------------------------------------------


async def test_the_consumer_lifecycle(admin: KinesisClient, server: FakeFanOutServer) -> None:
    stream_arn = server.stream_arn(STREAM)
    server.activate_after = 3
    registered = await admin.register_stream_consumer(stream_arn, "app")
    assert (registered.consumer_name, registered.consumer_status, registered.stream_arn) == (
        "app",
        "CREATING",
        stream_arn,
    )
    active = await admin.wait_for_consumer_active(stream_arn=stream_arn, name="app", timeout=DEADLINE)
    assert active.consumer_status == "ACTIVE"
    assert active.consumer_arn == registered.consumer_arn
    assert await admin.describe_stream_consumer(consumer_arn=registered.consumer_arn) == active
    with pytest.raises(ResourceInUse):
        await admin.register_stream_consumer(stream_arn, "app")
    assert (await admin.ensure_stream_consumer(stream_arn, "app")).consumer_arn == registered.consumer_arn

    for name in ("b", "c"):
        await admin.register_stream_consumer(stream_arn, name)
    listed = await admin.list_stream_consumers(stream_arn, max_results=1)  # three pages
    assert [c.consumer_name for c in listed] == ["app", "b", "c"]
    assert {c.stream_arn for c in listed} == {stream_arn}

    await admin.deregister_stream_consumer(consumer_arn=registered.consumer_arn)
    await admin.deregister_stream_consumer(stream_arn=stream_arn, name="b")
    assert [c.consumer_name for c in await admin.list_stream_consumers(stream_arn)] == ["c"]
    with pytest.raises(ResourceNotFound):
        await admin.describe_stream_consumer(stream_arn=stream_arn, name="app")
    with pytest.raises(ResourceNotFound):
        await admin.list_stream_consumers(server.stream_arn("missing"))


async def test_a_consumer_must_be_named_one_way_or_the_other(admin: KinesisClient) -> None:
    with pytest.raises(ConfigError, match="consumer_arn, or by stream_arn and name"):
        await admin.describe_stream_consumer(name="app")
    with pytest.raises(ConfigError):
        await admin.deregister_stream_consumer(stream_arn="arn")
    with pytest.raises(ConfigError):
        await admin.wait_for_consumer_active()


# -- subscriptions -------------------------------------------------------------------------------


async def test_records_arrive_and_the_initial_response_is_skipped(
    kinesis: KinesisClient, server: FakeFanOutServer, consumer_arn: str
) -> None:
    sequences = [server.put(STREAM, SHARD, f"r{i}".encode(), f"key-{i}") for i in range(5)]
    async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "TRIM_HORIZON") as subscription:
        events = await collect(subscription, 5)
        assert subscription.protocol == (
            "http/1.1" if server.subscriptions[0].protocol == "http/1.1" else "h2"
        )
        assert subscription.request_id
    records = [r for e in events for r in e.records]
    assert all(isinstance(r, Record) for r in records)
    assert [r.data for r in records] == [f"r{i}".encode() for i in range(5)]
    assert [r.partition_key for r in records] == [f"key-{i}" for i in range(5)]
    assert [r.sequence_number for r in records] == sequences
    assert events[-1].continuation_sequence_number == sequences[-1]
    assert not events[-1].at_shard_end
    assert events[-1].child_shards == []


async def test_a_missing_initial_response_is_fine(
    kinesis: KinesisClient, server: FakeFanOutServer, consumer_arn: str
) -> None:
    server.send_initial_response = False
    server.put(STREAM, SHARD, b"x")
    async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "TRIM_HORIZON") as subscription:
        assert data_of(await collect(subscription, 1)) == [b"x"]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("TRIM_HORIZON", [0, 1, 2, 3]),
        ("AT_SEQUENCE_NUMBER", [2, 3]),
        ("AFTER_SEQUENCE_NUMBER", [3]),
        ("AT_TIMESTAMP", [1, 2, 3]),
        ("LATEST", [4]),
    ],
)
async def test_starting_positions(
    admin: KinesisClient, server: FakeFanOutServer, consumer_arn: str, kind: str, expected: list[int]
) -> None:
    sequences = [server.put(STREAM, SHARD, bytes([i])) for i in range(4)]
    arrival = server._shard(STREAM, SHARD).records[1].approximate_arrival_timestamp
    sequence = sequences[2] if "SEQUENCE" in kind else None
    timestamp = arrival if kind == "AT_TIMESTAMP" else None
    async with subscriber_for(server, "h2") as kinesis:
        subscription = kinesis.subscribe_to_shard(
            consumer_arn, SHARD, kind, sequence_number=sequence, timestamp=timestamp
        )
        async with subscription:
            if kind == "LATEST":
                await collect(subscription, 0)  # subscribed: later records count
                server.put(STREAM, SHARD, bytes([4]))
            events = await collect(subscription, len(expected))
    assert data_of(events) == [bytes([i]) for i in expected]


async def test_a_shard_that_ends_during_the_subscription(
    kinesis: KinesisClient, server: FakeFanOutServer, consumer_arn: str
) -> None:
    server.put(STREAM, SHARD, b"before")
    async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "TRIM_HORIZON") as subscription:
        events = await collect(subscription, 1)
        server.put(STREAM, SHARD, b"last")
        server.close_shard(STREAM, SHARD, ["shardId-000000000004", "shardId-000000000005"])
        async with asyncio.timeout(DEADLINE):
            events += [event async for event in subscription]  # ends by itself
    assert data_of(events) == [b"before", b"last"]
    final = events[-1]
    assert final.at_shard_end and final.continuation_sequence_number is None
    assert [c.shard_id for c in final.child_shards] == ["shardId-000000000004", "shardId-000000000005"]
    assert final.child_shards[0].parent_shards == [SHARD]
    assert not any(e.at_shard_end for e in events[:-1])


async def test_resubscribing_within_5_s_is_refused_and_later_takes_over(
    kinesis: KinesisClient, server: FakeFanOutServer, consumer_arn: str
) -> None:
    clock = server.clock
    assert isinstance(clock, Clock)
    async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "LATEST") as first:
        await collect(first, 0)
        with pytest.raises(ResourceInUse, match="another subscription"):
            async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "LATEST"):
                pass
        clock.now += 5
        async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "LATEST") as second:
            await collect(second, 0)
            with pytest.raises(ResourceInUse, match="took over"):
                await collect(first, 1)


async def test_throttling_is_retriable(
    kinesis: KinesisClient, server: FakeFanOutServer, consumer_arn: str
) -> None:
    server.throttle_next = 1
    with pytest.raises(Throttled) as caught:
        async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "LATEST"):
            pass
    assert caught.value.retriable
    assert caught.value.code == "LimitExceededException"


async def test_refusals_at_subscribe_time(
    kinesis: KinesisClient, server: FakeFanOutServer, admin: KinesisClient
) -> None:
    with pytest.raises(ResourceNotFound):
        async with kinesis.subscribe_to_shard("arn:nope", SHARD, "LATEST"):
            pass
    server.activate_after = 100
    creating = await admin.register_stream_consumer(server.stream_arn(STREAM), "new")
    with pytest.raises(ResourceInUse, match="not ACTIVE"):
        async with kinesis.subscribe_to_shard(creating.consumer_arn, SHARD, "LATEST"):
            pass


@pytest.mark.parametrize(
    ("exception_type", "error", "retriable"),
    [
        ("InternalFailureException", ServiceUnavailable, True),
        ("KMSThrottlingException", Throttled, True),
        ("ResourceNotFoundException", ResourceNotFound, False),
        ("ResourceInUseException", ResourceInUse, False),
        ("AccessDeniedException", AccessDenied, False),
        ("KMSAccessDeniedException", AwsError, False),
    ],
)
async def test_exception_frames_map_to_typed_errors(
    kinesis: KinesisClient,
    server: FakeFanOutServer,
    consumer_arn: str,
    exception_type: str,
    error: type[AwsError],
    retriable: bool,
) -> None:
    server.put(STREAM, SHARD, b"x")
    server.faults.append(Script(Fault.EXCEPTION, after_events=1, exception_type=exception_type))
    async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "TRIM_HORIZON") as subscription:
        assert data_of(await collect(subscription, 1)) == [b"x"]
        with pytest.raises(error) as caught:
            await collect(subscription, 1)
        assert type(caught.value) is error
        assert (caught.value.code, caught.value.operation) == (exception_type, "SubscribeToShard")
        assert caught.value.retriable is retriable
        assert caught.value.message == "scripted failure"
        with pytest.raises(StopAsyncIteration):  # the subscription is over
            await anext(subscription)


@pytest.mark.parametrize("fault", [Fault.TRUNCATE, Fault.CORRUPT])
async def test_broken_event_streams_raise_event_stream_error(
    kinesis: KinesisClient, server: FakeFanOutServer, consumer_arn: str, fault: Fault
) -> None:
    server.faults.append(Script(fault, after_events=2))
    async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "LATEST") as subscription:
        with pytest.raises(EventStreamError) as caught:
            await collect(subscription, 1)
    assert caught.value.retriable and caught.value.operation == "SubscribeToShard"


@pytest.mark.parametrize("fault", [Fault.RESET, Fault.GOAWAY, Fault.KILL])
async def test_broken_connections_raise_connection_lost(
    kinesis: KinesisClient, server: FakeFanOutServer, consumer_arn: str, fault: Fault
) -> None:
    server.faults.append(Script(fault, after_events=1))
    async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "LATEST") as subscription:
        with pytest.raises(ConnectionLost):
            await collect(subscription, 1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_stalled_subscription_times_out(
    server: FakeFanOutServer, consumer_arn: str, protocol: str
) -> None:
    server.faults.append(Script(Fault.STALL, after_events=1))
    async with (
        subscriber_for(server, protocol, read_timeout=0.2) as kinesis,
        kinesis.subscribe_to_shard(consumer_arn, SHARD, "LATEST") as subscription,
    ):
        with pytest.raises(ConnectionLost, match="sent nothing"):
            await collect(subscription, 1)


async def test_resubscribing_from_the_continuation_loses_and_repeats_nothing(
    kinesis: KinesisClient, server: FakeFanOutServer, consumer_arn: str
) -> None:
    server.resubscribe_interval = 0
    server.batch_size = 3
    for i in range(10):
        server.put(STREAM, SHARD, bytes([i]))
    server.faults.extend([Script(Fault.END, after_events=2), Script(Fault.RESET, after_events=1)])
    received: list[bytes] = []
    kind, continuation = "TRIM_HORIZON", None
    async with asyncio.timeout(DEADLINE):
        while len(received) < 10:
            with contextlib.suppress(ConnectionLost):
                async with kinesis.subscribe_to_shard(
                    consumer_arn, SHARD, kind, sequence_number=continuation
                ) as sub:
                    async for event in sub:
                        received += [r.data for r in event.records]
                        kind, continuation = "AFTER_SEQUENCE_NUMBER", event.continuation_sequence_number
                        if len(received) == 10:
                            break
    assert received == [bytes([i]) for i in range(10)]
    assert len(server.subscriptions) == 3


async def test_a_subscription_ends_when_its_lifetime_is_over(
    kinesis: KinesisClient, server: FakeFanOutServer, consumer_arn: str
) -> None:
    server.lifetime = 0.2
    async with kinesis.subscribe_to_shard(consumer_arn, SHARD, "LATEST") as subscription:
        async with asyncio.timeout(DEADLINE):
            events = [event async for event in subscription]
    assert events and not events[-1].at_shard_end


# -- misuse --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "sequence", "timestamp"),
    [
        ("BEGINNING", None, None),
        ("AT_SEQUENCE_NUMBER", None, None),
        ("LATEST", "123", None),
        ("AT_TIMESTAMP", None, None),
        ("TRIM_HORIZON", None, 1.0),
    ],
)
def test_bad_starting_positions_are_refused_at_once(
    kind: str, sequence: str | None, timestamp: float | None
) -> None:
    kinesis = KinesisClient(endpoint_url="http://127.0.0.1:1", region="us-east-1", credentials=CREDENTIALS)
    with pytest.raises(ConfigError):
        kinesis.subscribe_to_shard("arn", SHARD, kind, sequence_number=sequence, timestamp=timestamp)


async def test_a_subscription_is_entered_once_and_only_iterated_inside(
    kinesis: KinesisClient, consumer_arn: str
) -> None:
    subscription = kinesis.subscribe_to_shard(consumer_arn, SHARD, "LATEST")
    with pytest.raises(ClosedError, match="async with"):
        await anext(subscription)
    async with subscription:
        pass
    with pytest.raises(ClosedError, match="only once"):
        async with subscription:
            pass


async def test_a_transport_that_cannot_sign_cannot_subscribe() -> None:
    class Unsigned:
        endpoint_url = "http://127.0.0.1:1"
        region = "us-east-1"

        async def call(self, operation: str, body: bytes, *, max_attempts: int | None = None) -> bytes:
            return b"{}"

        async def aclose(self) -> None:
            pass

    async with KinesisClient(transport=Unsigned()) as kinesis:
        with pytest.raises(ConfigError, match="signed_headers"):
            kinesis.subscribe_to_shard("arn", SHARD, "LATEST")


# -- the event-stream messages themselves (scripted bytes, no server) ------------------------------


class ScriptedResponse(StreamingResponse):
    protocol = "test"

    def __init__(self, chunks: list[bytes], status: int = 200) -> None:
        super().__init__()
        self.status = status
        self.headers = {
            "x-amzn-requestid": "req-1",
            "x-amzn-errortype": "ThrottlingException:http://internal",
        }
        self._chunks = chunks

    async def read_chunk(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


def scripted(
    chunks: list[bytes], status: int = 200
) -> Callable[[], AbstractAsyncContextManager[StreamingResponse]]:
    @contextlib.asynccontextmanager
    async def opener() -> AsyncIterator[StreamingResponse]:
        yield ScriptedResponse(chunks, status)

    return opener


def event(event_type: str, payload: object) -> bytes:
    headers = {":message-type": "event", ":event-type": event_type, ":content-type": "application/json"}
    return encode_message(headers, msgspec.json.encode(payload))


EMPTY_EVENT = {"Records": [], "ContinuationSequenceNumber": "7", "MillisBehindLatest": 0}


async def run(chunks: list[bytes], status: int = 200) -> list[SubscribeToShardEvent]:
    async with ShardSubscription(
        scripted(chunks, status), consumer_arn="arn", shard_id=SHARD
    ) as subscription:
        return [e async for e in subscription]


async def test_unknown_event_types_are_skipped_and_records_decode() -> None:
    record = {"Data": "aGk=", "PartitionKey": "k", "SequenceNumber": "5", "ApproximateArrivalTimestamp": 1.5}
    wire = event("SomethingNew", {}) + event("SubscribeToShardEvent", {**EMPTY_EVENT, "Records": [record]})
    (only,) = await run([wire[:7], wire[7:]])
    assert only.records == [Record(b"hi", "k", "5", 1.5)]
    assert only.continuation_sequence_number == "7"


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (event("SubscribeToShardEvent", {"Records": "nope"}), "malformed SubscribeToShardEvent"),
        (
            encode_message({":message-type": "event", ":event-type": "SubscribeToShardEvent"}, b"{"),
            "malformed",
        ),
        (encode_message({":event-type": "x"}, b"{}"), ":message-type None"),
    ],
)
async def test_malformed_events_raise_event_stream_error(message: bytes, match: str) -> None:
    with pytest.raises(EventStreamError, match=match) as caught:
        await run([event("SubscribeToShardEvent", EMPTY_EVENT), message])
    assert caught.value.request_id == "req-1"


async def test_generic_error_messages_are_typed() -> None:
    error = encode_message(
        {":message-type": "error", ":error-code": "InternalFailure", ":error-message": "boom"}, b""
    )
    with pytest.raises(ServiceUnavailable, match="boom"):
        await run([error])


async def test_an_http_error_uses_the_error_type_header() -> None:
    with pytest.raises(Throttled) as caught:
        await run([b"not json"], status=400)
    assert caught.value.status == 400 and caught.value.request_id == "req-1"

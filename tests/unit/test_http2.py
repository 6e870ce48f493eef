"""The streaming HTTP client against the fake fan-out server: HTTP/2 over TLS (ALPN), many streams
on few connections, flow control, RST_STREAM, GOAWAY, a killed server, and the HTTP/1.1 paths.

Requests are built by hand (the fake server does not check signatures), so only the transport is
under test here; tests/unit/test_subscribe_to_shard.py covers the Kinesis layer on top.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import msgspec
import pytest

from kinesis_butler.aws.eventstream import EventStreamDecoder, Message
from kinesis_butler.aws.streaming import StreamingHttpClient, StreamingOptions, StreamingResponse
from kinesis_butler.errors import ClosedError, ConfigError, ConnectionLost, EndpointUnreachable
from kinesis_butler.testing._process import free_port
from kinesis_butler.testing.fanout_server import FakeFanOutServer, Fault, Script
from tests.helpers import wait_until

STREAM = "stream"
SHARDS = [f"shardId-{i:012d}" for i in range(6)]
DEADLINE = 10.0


@pytest.fixture
async def server() -> AsyncIterator[FakeFanOutServer]:
    async with FakeFanOutServer(max_concurrent_streams=2) as fake:
        fake.add_stream(STREAM, shards=len(SHARDS))
        fake.resubscribe_interval = 0
        yield fake


@pytest.fixture
async def client(server: FakeFanOutServer) -> AsyncIterator[StreamingHttpClient]:
    async with StreamingHttpClient(StreamingOptions(ca_data=server.ca_pem, read_timeout=5)) as streaming:
        yield streaming


def headers(operation: str) -> dict[str, str]:
    return {
        "Host": "kinesis.test",
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": f"Kinesis_20131202.{operation}",
        "Authorization": "not checked by the fake",
    }


async def call(client: StreamingHttpClient, url: str, operation: str, payload: dict[str, object]) -> object:
    async with client.post(url, headers(operation), msgspec.json.encode(payload)) as response:
        body = await response.read_all()
        assert response.status == 200, body
        return json.loads(body)


async def active_consumer(client: StreamingHttpClient, server: FakeFanOutServer, url: str) -> str:
    stream_arn = server.stream_arn(STREAM)
    reply = await call(client, url, "RegisterStreamConsumer", {"StreamARN": stream_arn, "ConsumerName": "c"})
    assert isinstance(reply, dict)
    arn = str(reply["Consumer"]["ConsumerARN"])
    await call(client, url, "DescribeStreamConsumer", {"ConsumerARN": arn})  # activates it
    return arn


def subscribe_body(consumer_arn: str, shard_id: str) -> bytes:
    return msgspec.json.encode(
        {"ConsumerARN": consumer_arn, "ShardId": shard_id, "StartingPosition": {"Type": "TRIM_HORIZON"}}
    )


async def read_events(response: StreamingResponse, count: int) -> list[Message]:
    """Reads until ``count`` SubscribeToShardEvent messages arrived."""
    decoder, events = EventStreamDecoder(), []
    async with asyncio.timeout(DEADLINE):
        while len(events) < count:
            chunk = await response.read_chunk()
            assert chunk, f"the body ended after {len(events)} events"
            events += [m for m in decoder.feed(chunk) if m.event_type == "SubscribeToShardEvent"]
    return events


def records_of(events: list[Message]) -> list[dict[str, object]]:
    return [r for e in events for r in json.loads(e.payload)["Records"]]


# -- HTTP/2 over TLS -----------------------------------------------------------------------------


async def test_h2_is_negotiated_by_alpn_and_records_stream(
    server: FakeFanOutServer, client: StreamingHttpClient
) -> None:
    consumer = await active_consumer(client, server, server.https_url)
    server.put(STREAM, SHARDS[0], b"hello")
    async with client.post(
        server.https_url, headers("SubscribeToShard"), subscribe_body(consumer, SHARDS[0])
    ) as r:
        assert (r.protocol, r.status) == ("h2", 200)
        assert r.headers["content-type"] == "application/vnd.amazon.eventstream"
        (event,) = await read_events(r, 1)
    assert [rec["Data"] for rec in records_of([event])] == ["aGVsbG8="]
    assert client.protocol_for(server.https_url) == "h2"
    assert server.h2_connections == 1  # the JSON calls and the subscription shared one connection
    assert server.subscriptions[0].protocol == "h2"


async def test_an_untrusted_certificate_is_refused(server: FakeFanOutServer) -> None:
    async with StreamingHttpClient() as untrusting:
        with pytest.raises(EndpointUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await call(untrusting, server.https_url, "ListStreamConsumers", {"StreamARN": "x"})


async def test_streams_share_connections_up_to_max_concurrent_streams(
    server: FakeFanOutServer, client: StreamingHttpClient
) -> None:
    consumer = await active_consumer(client, server, server.https_url)
    for shard in SHARDS[:5]:
        server.put(STREAM, shard, shard.encode())

    async def subscribe(shard: str, opened: asyncio.Event, release: asyncio.Event) -> list[Message]:
        async with client.post(
            server.https_url, headers("SubscribeToShard"), subscribe_body(consumer, shard)
        ) as r:
            events = await read_events(r, 1)
            opened.set()
            await release.wait()  # hold the stream open until all five are
            return events

    release = asyncio.Event()
    opened = [asyncio.Event() for _ in range(5)]
    tasks = [asyncio.create_task(subscribe(s, o, release)) for s, o in zip(SHARDS, opened, strict=False)]
    await wait_until(lambda: all(o.is_set() for o in opened), what="five open subscriptions")
    # The server allows 2 streams per connection: 5 concurrent streams need 3 connections.
    assert client.connection_count(server.https_url) == 3
    assert server.h2_connections == 3
    release.set()
    results = await asyncio.gather(*tasks)
    assert [records_of(events)[0]["Data"] for events in results] == [
        msgspec.json.encode(s.encode()).decode().strip('"') for s in SHARDS[:5]
    ]


async def test_flow_control_moves_megabytes_through_a_small_window(server: FakeFanOutServer) -> None:
    options = StreamingOptions(ca_data=server.ca_pem, stream_window=65_535, read_timeout=5)
    payloads = [bytes([i]) * 100_000 for i in range(30)]  # 3 MB, 4 MB as base64 JSON
    for payload in payloads:
        server.put(STREAM, SHARDS[0], payload)
    server.batch_size = 10
    async with StreamingHttpClient(options) as client:
        consumer = await active_consumer(client, server, server.https_url)
        body = subscribe_body(consumer, SHARDS[0])
        async with client.post(server.https_url, headers("SubscribeToShard"), body) as r:
            events = await read_events(r, 3)
    assert [rec["Data"] for rec in records_of(events)] == [
        msgspec.json.encode(p).decode().strip('"') for p in payloads
    ]


async def test_a_reader_that_does_not_read_blocks_only_its_own_stream(
    server: FakeFanOutServer, client: StreamingHttpClient
) -> None:
    consumer = await active_consumer(client, server, server.https_url)
    for i in range(20):
        server.put(STREAM, SHARDS[0], bytes([i]) * 100_000)  # 2 MB, far more than a stream window
    server.put(STREAM, SHARDS[1], b"small")
    url = server.https_url
    async with (
        client.post(url, headers("SubscribeToShard"), subscribe_body(consumer, SHARDS[0])) as stalled,
        client.post(url, headers("SubscribeToShard"), subscribe_body(consumer, SHARDS[1])) as flowing,
    ):
        assert client.connection_count(url) == 1  # both streams on one connection
        (event,) = await read_events(flowing, 1)
        assert records_of([event])[0]["Data"] == "c21hbGw="
        assert len(await read_events(stalled, 1)) == 1  # and the stalled one still works


async def test_rst_stream_fails_the_stream_and_keeps_the_connection(
    server: FakeFanOutServer, client: StreamingHttpClient
) -> None:
    consumer = await active_consumer(client, server, server.https_url)
    server.faults.append(Script(Fault.RESET, after_events=1))
    body = subscribe_body(consumer, SHARDS[0])
    async with client.post(server.https_url, headers("SubscribeToShard"), body) as r:
        await read_events(r, 1)
        with pytest.raises(ConnectionLost, match="reset the stream"):
            await read_events(r, 1)
    assert ConnectionLost.retriable
    async with client.post(server.https_url, headers("SubscribeToShard"), body) as again:
        await read_events(again, 1)
    assert server.h2_connections == 1


async def test_goaway_fails_the_streams_and_the_next_request_opens_a_new_connection(
    server: FakeFanOutServer, client: StreamingHttpClient
) -> None:
    consumer = await active_consumer(client, server, server.https_url)
    server.faults.append(Script(Fault.GOAWAY, after_events=2))
    body = subscribe_body(consumer, SHARDS[0])
    async with client.post(server.https_url, headers("SubscribeToShard"), body) as r:
        with pytest.raises(ConnectionLost, match=r"GOAWAY|lost"):
            await read_events(r, 3)
    await wait_until(lambda: client.connection_count(server.https_url) == 0, what="the connection to close")
    async with client.post(server.https_url, headers("SubscribeToShard"), body) as again:
        await read_events(again, 1)
    assert server.h2_connections == 2


@pytest.mark.parametrize("how", ["fault", "server stops"])
async def test_a_killed_connection_fails_open_streams(
    server: FakeFanOutServer, client: StreamingHttpClient, how: str
) -> None:
    consumer = await active_consumer(client, server, server.https_url)
    if how == "fault":
        server.faults.append(Script(Fault.KILL, after_events=1))
    async with client.post(
        server.https_url, headers("SubscribeToShard"), subscribe_body(consumer, SHARDS[0])
    ) as r:
        await read_events(r, 1)
        if how == "server stops":
            await server.aclose()
        with pytest.raises(ConnectionLost, match="lost"):
            await read_events(r, 100)


async def test_a_silent_stream_times_out(server: FakeFanOutServer) -> None:
    async with StreamingHttpClient(StreamingOptions(ca_data=server.ca_pem, read_timeout=0.2)) as client:
        consumer = await active_consumer(client, server, server.https_url)
        server.faults.append(Script(Fault.STALL, after_events=1))
        body = subscribe_body(consumer, SHARDS[0])
        async with client.post(server.https_url, headers("SubscribeToShard"), body) as r:
            await read_events(r, 1)
            with pytest.raises(ConnectionLost, match=r"sent nothing for 0\.2 s"):
                await read_events(r, 1)


async def test_leaving_early_resets_the_stream_and_the_server_stops_sending(
    server: FakeFanOutServer, client: StreamingHttpClient
) -> None:
    consumer = await active_consumer(client, server, server.https_url)
    body = subscribe_body(consumer, SHARDS[0])
    async with client.post(server.https_url, headers("SubscribeToShard"), body) as r:
        await read_events(r, 1)
    sent = server.subscriptions[0].events_sent
    async with client.post(server.https_url, headers("SubscribeToShard"), body) as again:
        await read_events(again, 3)
    assert server.subscriptions[0].events_sent <= sent + 1  # the first subscription was cancelled
    assert server.h2_connections == 1


async def test_closing_the_client_fails_open_streams_and_later_requests(
    server: FakeFanOutServer, client: StreamingHttpClient
) -> None:
    consumer = await active_consumer(client, server, server.https_url)
    async with client.post(
        server.https_url, headers("SubscribeToShard"), subscribe_body(consumer, SHARDS[0])
    ) as r:
        await read_events(r, 1)
        await client.aclose()
        with pytest.raises(ClosedError):
            await read_events(r, 100)
    with pytest.raises(ClosedError):
        await call(client, server.https_url, "ListStreamConsumers", {"StreamARN": "x"})
    await client.aclose()  # idempotent


async def test_error_answers_are_read_whole(server: FakeFanOutServer, client: StreamingHttpClient) -> None:
    body = msgspec.json.encode(
        {"ConsumerARN": "nope", "ShardId": SHARDS[0], "StartingPosition": {"Type": "LATEST"}}
    )
    async with client.post(server.https_url, headers("SubscribeToShard"), body) as r:
        assert r.status == 400
        assert json.loads(await r.read_all())["__type"] == "ResourceNotFoundException"
        assert await r.read_chunk() == b""


# -- HTTP/1.1 ------------------------------------------------------------------------------------


async def test_tls_servers_without_h2_are_spoken_to_in_http1() -> None:
    async with FakeFanOutServer(offer_h2=False) as server:
        server.add_stream(STREAM, shards=1)
        server.put(STREAM, SHARDS[0], b"over http/1.1")
        async with StreamingHttpClient(StreamingOptions(ca_data=server.ca_pem)) as client:
            consumer = await active_consumer(client, server, server.https_url)
            body = subscribe_body(consumer, SHARDS[0])
            async with client.post(server.https_url, headers("SubscribeToShard"), body) as r:
                assert r.protocol == "http/1.1"
                events = await read_events(r, 1)
            assert client.protocol_for(server.https_url) == "http/1.1"
    assert records_of(events)[0]["Data"] == "b3ZlciBodHRwLzEuMQ=="


async def test_plain_http_uses_http1_and_its_failures_are_typed(
    server: FakeFanOutServer, client: StreamingHttpClient
) -> None:
    consumer = await active_consumer(client, server, server.http_url)
    assert client.protocol_for(server.http_url) == "http/1.1"
    server.faults.append(Script(Fault.KILL, after_events=1))
    async with client.post(
        server.http_url, headers("SubscribeToShard"), subscribe_body(consumer, SHARDS[0])
    ) as r:
        assert r.protocol == "http/1.1"
        await read_events(r, 1)
        with pytest.raises(ConnectionLost):
            await read_events(r, 100)


async def test_h2c_speaks_http2_to_plain_http_endpoints(server: FakeFanOutServer) -> None:
    async with StreamingHttpClient(StreamingOptions(h2c=True)) as client:
        consumer = await active_consumer(client, server, server.http_url)
        body = subscribe_body(consumer, SHARDS[0])
        async with client.post(server.http_url, headers("SubscribeToShard"), body) as r:
            assert r.protocol == "h2"
            await read_events(r, 1)
        assert client.protocol_for(server.http_url) == "h2"
    assert server.h2_connections == 1


async def test_h2c_to_a_server_without_http2_is_unreachable() -> None:
    async def http1_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    async with await asyncio.start_server(http1_only, "127.0.0.1", 0) as raw:
        port = raw.sockets[0].getsockname()[1]
        async with StreamingHttpClient(StreamingOptions(h2c=True)) as client:
            with pytest.raises(EndpointUnreachable, match="HTTP/2"):
                await call(client, f"http://127.0.0.1:{port}", "ListStreamConsumers", {})


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_refused_connection_is_unreachable(scheme: str) -> None:
    async with StreamingHttpClient() as client:
        with pytest.raises(EndpointUnreachable) as caught:
            await call(client, f"{scheme}://127.0.0.1:{free_port()}", "ListStreamConsumers", {})
    assert not isinstance(caught.value, ConnectionLost)


async def test_a_request_h2_refuses_fails_without_looping(
    server: FakeFanOutServer, client: StreamingHttpClient
) -> None:
    refused = {**headers("ListStreamConsumers"), "TE": "gzip"}  # forbidden in HTTP/2
    with pytest.raises(ConnectionLost, match="could not open an HTTP/2 stream"):
        async with client.post(server.https_url, refused, b"{}"):
            pass
    assert server.h2_connections <= 3


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="read_timeout"):
        StreamingOptions(read_timeout=0)
    with pytest.raises(ConfigError, match="stream_window"):
        StreamingOptions(stream_window=1000)
    with pytest.raises(ConfigError, match="max_streams_per_connection"):
        StreamingOptions(max_streams_per_connection=0)


async def test_urls_are_validated() -> None:
    async with StreamingHttpClient() as client:
        with pytest.raises(ConfigError, match="invalid URL"):
            await call(client, "ftp://example.com", "X", {})

"""The JSON transport against a scripted local aiohttp server: retries, backoff, error mapping."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import socket
from collections.abc import AsyncIterator, Callable
from unittest import mock

import msgspec
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kinesis_butler.aws import (
    AwsCredentials,
    CredentialsProvider,
    JsonTransport,
    KinesisClient,
    TransportOptions,
)
from kinesis_butler.aws.transport import _ReadBuffers
from kinesis_butler.errors import (
    AccessDenied,
    AwsError,
    ClosedError,
    ConditionalCheckFailed,
    ConfigError,
    CredentialsError,
    EndpointUnreachable,
    ExpiredIterator,
    InvalidArgument,
    ResourceInUse,
    ResourceNotFound,
    ServiceUnavailable,
    Throttled,
)

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzzSECRETzz"
TOKEN = "FwoGZXIvYXdzSESSIONTOKENzz"
CREDS = AwsCredentials("AKIDEXAMPLE", SECRET, TOKEN)


@dataclasses.dataclass
class Reply:
    """One scripted answer. ``hang`` holds the request open until the test ends; ``chunks``
    streams the body in that many pieces (chunked encoding, ``pause`` seconds apart); ``cut``
    closes the connection halfway through a body announced at full length."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    hang: bool = False
    chunks: int = 0
    pause: float = 0.0
    cut: bool = False


def error(
    status: int, type_: str, message: str = "boom", request_id: str = "req-1", key: str = "message"
) -> Reply:
    body = msgspec.json.encode({"__type": type_, key: message})
    return Reply(status, body, {"x-amzn-RequestId": request_id})


@dataclasses.dataclass
class Seen:
    headers: dict[str, str]
    body: bytes
    peer_port: int


class ScriptedServer:
    """Answers each POST with the next scripted reply (``200 {}`` once the script runs out)."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.seen: list[Seen] = []
        self.release = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(Seen(dict(request.headers), body, peer[1] if peer else 0))
        reply = self.script.pop(0) if self.script else Reply()
        if reply.hang:
            await self.release.wait()
        if reply.cut:
            response = web.StreamResponse(status=reply.status, headers=reply.headers)
            response.content_length = len(reply.body)
            await response.prepare(request)
            await response.write(reply.body[: len(reply.body) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        if reply.chunks:
            response = web.StreamResponse(status=reply.status, headers=reply.headers)
            response.enable_chunked_encoding()
            await response.prepare(request)
            size = -(-len(reply.body) // reply.chunks)
            for start in range(0, len(reply.body), size):
                await response.write(reply.body[start : start + size])
                await asyncio.sleep(reply.pause)
            await response.write_eof()
            return response
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    app = web.Application()
    app.router.add_post("/", scripted.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    scripted.port = runner.addresses[0][1]
    yield scripted
    scripted.release.set()
    await runner.cleanup()


class NoSleep:
    """Records backoff delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture(params=["builtin", "aiohttp"])
async def make_transport(
    server: ScriptedServer, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., JsonTransport]]:
    """Transports on either HTTP client: every test here holds for both."""
    made: list[JsonTransport] = []

    def factory(
        *,
        endpoint_url: str | None = None,
        options: TransportOptions | None = None,
        rand: Callable[[], float] = lambda: 0.5,
        sleep: NoSleep | None = None,
        credentials: CredentialsProvider | None = None,
    ) -> JsonTransport:
        transport = JsonTransport(
            service="kinesis",
            target_prefix="Kinesis_20131202",
            credentials=credentials
            or CredentialsProvider.static(*dataclasses.astuple(CREDS), region="us-east-1"),
            endpoint_url=endpoint_url or server.url,
            options=dataclasses.replace(options or TransportOptions(), http_client=request.param),
            sleep=sleep or NoSleep(),
            rand=rand,
        )
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        await transport.aclose()


# -- retries and backoff --------------------------------------------------------------------------


async def test_throttling_is_retried_with_full_jitter_then_succeeds(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    sleep = NoSleep()
    transport = make_transport(sleep=sleep, rand=lambda: 0.5)
    server.script = [
        error(400, "ProvisionedThroughputExceededException"),
        error(400, "ThrottlingException"),
        Reply(200, b'{"ok":true}'),
    ]
    assert await transport.call("GetRecords", b"{}") == b'{"ok":true}'
    assert len(server.seen) == 3
    assert sleep.delays == pytest.approx([0.5 * 0.1, 0.5 * 0.2])


async def test_backoff_doubles_up_to_the_cap_and_max_attempts_is_honored(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    sleep = NoSleep()
    transport = make_transport(
        sleep=sleep,
        rand=lambda: 1.0,
        options=TransportOptions(max_attempts=9, backoff_base=0.1, backoff_cap=5.0),
    )
    server.script = [Reply(500, b"")] * 20
    with pytest.raises(ServiceUnavailable) as info:
        await transport.call("ListShards", b"{}")
    assert len(server.seen) == 9
    assert sleep.delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert info.value.status == 500


async def test_jitter_draws_below_the_ceiling(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    draws = iter([0.0, 0.25, 0.999])
    sleep = NoSleep()
    transport = make_transport(
        sleep=sleep, rand=lambda: next(draws), options=TransportOptions(max_attempts=4)
    )
    server.script = [Reply(503, b"")] * 3
    await transport.call("ListShards", b"{}")
    assert sleep.delays == pytest.approx([0.0, 0.25 * 0.2, 0.999 * 0.4])


async def test_a_burst_of_5xx_is_retried_until_success(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    server.script = [
        Reply(500, b'{"__type":"InternalFailure"}'),
        Reply(503, b""),
        Reply(502, b"<html>Bad Gateway</html>", {"Content-Type": "text/html"}),
        error(500, "ServiceUnavailableException"),
        Reply(200, b'{"n":1}'),
    ]
    assert await transport.call("PutRecords", b"{}") == b'{"n":1}'
    assert len(server.seen) == 5


async def test_per_call_max_attempts_overrides_the_default(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport(options=TransportOptions(max_attempts=8))
    server.script = [error(400, "LimitExceededException")] * 10
    with pytest.raises(Throttled):
        await transport.call("GetRecords", b"{}", max_attempts=3)
    assert len(server.seen) == 3

    server.seen.clear()
    with pytest.raises(Throttled):
        await transport.call("GetRecords", b"{}", max_attempts=1)
    assert len(server.seen) == 1


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (error(400, "ExpiredIteratorException"), ExpiredIterator),
        (error(400, "AccessDeniedException"), AccessDenied),
        (error(400, "ResourceNotFoundException"), ResourceNotFound),
        (error(400, "ValidationException"), InvalidArgument),
    ],
)
async def test_non_retried_errors_are_raised_on_the_first_attempt(
    server: ScriptedServer,
    make_transport: Callable[..., JsonTransport],
    reply: Reply,
    expected: type[AwsError],
) -> None:
    sleep = NoSleep()
    transport = make_transport(sleep=sleep)
    server.script = [reply, Reply()]
    with pytest.raises(expected):
        await transport.call("GetRecords", b"{}")
    assert len(server.seen) == 1
    assert sleep.delays == []


async def test_expired_iterator_is_retriable_for_the_caller_but_not_retried_here(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    server.script = [error(400, "ExpiredIteratorException", "Iterator expired")]
    with pytest.raises(ExpiredIterator) as info:
        await transport.call("GetRecords", b"{}", max_attempts=8)
    assert info.value.retriable
    assert len(server.seen) == 1


# -- connection failures --------------------------------------------------------------------------


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_refused_becomes_endpoint_unreachable_after_retries(
    make_transport: Callable[..., JsonTransport],
) -> None:
    sleep = NoSleep()
    url = f"http://127.0.0.1:{unused_port()}"
    transport = make_transport(endpoint_url=url, sleep=sleep, options=TransportOptions(max_attempts=4))
    with pytest.raises(EndpointUnreachable) as info:
        await transport.call("ListShards", b"{}")
    message = str(info.value)
    assert url in message
    assert "--endpoint-url" in message
    assert "after 4 attempts" in message
    assert info.value.retriable
    assert len(sleep.delays) == 3


async def test_a_timeout_becomes_endpoint_unreachable(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport(options=TransportOptions(max_attempts=2, total_timeout=0.2))
    server.script = [Reply(hang=True), Reply(hang=True)]
    with pytest.raises(EndpointUnreachable, match="timed out"):
        await transport.call("GetRecords", b"{}")
    assert len(server.seen) == 2


async def test_a_timeout_then_an_answer_succeeds(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    server.script = [Reply(hang=True), Reply(200, b'{"late":false}')]
    assert await transport.call("GetRecords", b"{}", attempt_timeout=0.2) == b'{"late":false}'


# -- error mapping --------------------------------------------------------------------------------

MAPPING = [
    ("ResourceNotFoundException", ResourceNotFound),
    ("ResourceInUseException", ResourceInUse),
    ("InvalidArgumentException", InvalidArgument),
    ("ValidationException", InvalidArgument),
    ("SerializationException", InvalidArgument),
    ("AccessDeniedException", AccessDenied),
    ("UnrecognizedClientException", AccessDenied),
    ("InvalidSignatureException", AccessDenied),
    ("ExpiredTokenException", AccessDenied),
    ("IncompleteSignature", AccessDenied),
    ("ExpiredIteratorException", ExpiredIterator),
    ("ProvisionedThroughputExceededException", Throttled),
    ("LimitExceededException", Throttled),
    ("ThrottlingException", Throttled),
    ("KMSThrottlingException", Throttled),
    ("RequestLimitExceeded", Throttled),
    ("ConditionalCheckFailedException", ConditionalCheckFailed),
    ("SomethingNewException", AwsError),
]


@pytest.mark.parametrize(("code", "expected"), MAPPING)
@pytest.mark.parametrize("prefix", ["", "com.amazonaws.kinesis.v20131202#"])
async def test_error_type_maps_to_typed_error(
    server: ScriptedServer,
    make_transport: Callable[..., JsonTransport],
    code: str,
    expected: type[AwsError],
    prefix: str,
) -> None:
    transport = make_transport(options=TransportOptions(max_attempts=1))
    server.script = [error(400, prefix + code, f"detail of {code}", request_id="rid-42")]
    with pytest.raises(AwsError) as info:
        await transport.call("DescribeStreamSummary", b"{}")
    err = info.value
    assert type(err) is expected
    assert err.code == code
    assert err.operation == "DescribeStreamSummary"
    assert err.request_id == "rid-42"
    assert err.status == 400
    assert err.message == f"detail of {code}"
    assert "rid-42" in str(err)


async def test_capitalised_message_key_is_read(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    server.script = [error(400, "ResourceNotFoundException", "Stream x not found", key="Message")]
    with pytest.raises(ResourceNotFound, match="Stream x not found"):
        await transport.call("ListShards", b"{}")


async def test_error_type_header_is_used_when_the_body_has_none(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    server.script = [
        Reply(400, b'{"message":"nope"}', {"x-amzn-ErrorType": "AccessDeniedException:http://internal/"})
    ]
    with pytest.raises(AccessDenied, match="nope"):
        await transport.call("ListShards", b"{}")


async def test_unknown_5xx_type_is_service_unavailable(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport(options=TransportOptions(max_attempts=1))
    server.script = [error(500, "InternalFailure", "try later", request_id="r5")]
    with pytest.raises(ServiceUnavailable) as info:
        await transport.call("GetRecords", b"{}")
    assert info.value.code == "InternalFailure"
    assert info.value.request_id == "r5"


async def test_malformed_error_body_is_a_clear_aws_error_not_a_crash(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    server.script = [Reply(400, b"<html><body>Request blocked</body></html>", {"x-amzn-RequestId": "r-html"})]
    with pytest.raises(AwsError) as info:
        await transport.call("GetRecords", b"{}")
    err = info.value
    assert type(err) is AwsError
    assert err.status == 400
    assert err.request_id == "r-html"
    assert "non-JSON" in err.message
    assert "Request blocked" in err.message


async def test_malformed_success_body_is_a_clear_aws_error(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    client = KinesisClient(transport=make_transport())
    server.script = [Reply(200, b'{"Records": [ {"Data": "not base64!!"')]
    with pytest.raises(AwsError) as info:
        await client.get_records("it")
    assert info.value.code == "MalformedResponse"
    assert info.value.operation == "GetRecords"


# -- the requests on the wire ---------------------------------------------------------------------


async def test_requests_are_signed_so_that_botocore_verifies_them(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    await transport.call("ListShards", b'{"StreamName":"s"}')
    seen = server.seen[0]
    assert seen.headers["Host"] == f"127.0.0.1:{server.port}"
    assert seen.headers["X-Amz-Target"] == "Kinesis_20131202.ListShards"
    assert seen.headers["Content-Type"] == "application/x-amz-json-1.1"
    assert seen.headers["X-Amz-Security-Token"] == TOKEN

    # Re-sign the received request with botocore at the received date: same Authorization.
    request = AWSRequest(
        method="POST",
        url=server.url + "/",
        data=seen.body,
        headers={"Content-Type": seen.headers["Content-Type"], "X-Amz-Target": seen.headers["X-Amz-Target"]},
    )
    moment = dt.datetime.strptime(seen.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    with mock.patch("botocore.auth.get_current_datetime", return_value=moment):
        SigV4Auth(Credentials(CREDS.access_key_id, SECRET, TOKEN), "kinesis", "us-east-1").add_auth(request)
    assert request.headers["Authorization"] == seen.headers["Authorization"]


async def test_connections_are_kept_alive_across_calls(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    for _ in range(5):
        await transport.call("GetRecords", b"{}")
    assert len({seen.peer_port for seen in server.seen}) == 1


async def test_concurrent_calls_share_one_session(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    results = await asyncio.gather(*(transport.call("GetRecords", b"{}") for _ in range(20)))
    assert results == [b"{}"] * 20
    assert len(server.seen) == 20


def test_endpoint_is_derived_from_service_and_region() -> None:
    transport = JsonTransport(
        service="kinesis",
        target_prefix="Kinesis_20131202",
        credentials=CredentialsProvider.static("a", "b", region="eu-central-1"),
    )
    assert transport.endpoint_url == "https://kinesis.eu-central-1.amazonaws.com"
    assert transport.region == "eu-central-1"


@pytest.mark.parametrize("url", ["127.0.0.1:4567", "ftp://host", "http://", "localhost"])
def test_invalid_endpoint_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="--endpoint-url"):
        KinesisClient(endpoint_url=url, credentials=CREDS, region="us-east-1")


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"connect_timeout": 0},
        {"total_timeout": -1},
        {"backoff_base": -0.1},
        {"pool_limit": 0},
    ],
)
def test_invalid_options_are_config_errors(options: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        TransportOptions(**options)  # type: ignore[arg-type]


# -- lifecycle ------------------------------------------------------------------------------------


async def test_close_is_idempotent_and_use_after_close_raises(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    await transport.call("ListShards", b"{}")
    await transport.aclose()
    await transport.aclose()
    assert transport.closed
    with pytest.raises(ClosedError):
        await transport.call("ListShards", b"{}")


async def test_close_before_first_use_is_fine(make_transport: Callable[..., JsonTransport]) -> None:
    transport = make_transport()
    await transport.aclose()
    with pytest.raises(ClosedError):
        await transport.call("ListShards", b"{}")


async def test_client_context_manager_closes(server: ScriptedServer) -> None:
    async with KinesisClient(endpoint_url=server.url, credentials=CREDS, region="us-east-1") as client:
        server.script = [Reply(200, b'{"ShardIterator":"it-1"}')]
        assert await client.get_shard_iterator("s", "shardId-0", "LATEST") == "it-1"
    with pytest.raises(ClosedError):
        await client.get_shard_iterator("s", "shardId-0", "LATEST")


# -- secrets --------------------------------------------------------------------------------------


async def test_no_secret_in_errors_or_logs(
    server: ScriptedServer,
    make_transport: Callable[..., JsonTransport],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kinesis_butler")
    transport = make_transport()
    server.script = [Reply(503, b"")] * 2 + [error(400, "InvalidSignatureException", "bad signature")]
    with pytest.raises(AccessDenied) as denied:
        await transport.call("GetRecords", b"{}")
    refused = make_transport(
        endpoint_url=f"http://127.0.0.1:{unused_port()}", options=TransportOptions(max_attempts=2)
    )
    with pytest.raises(EndpointUnreachable) as unreachable:
        await refused.call("GetRecords", b"{}")
    texts = [
        str(denied.value),
        repr(denied.value),
        str(unreachable.value),
        repr(unreachable.value),
        caplog.text,
    ]
    texts += [repr(transport), repr(refused)]
    assert "retrying" in caplog.text  # the retries were logged ...
    for text in texts:
        assert SECRET not in text  # ... without the secret
        assert TOKEN not in text


async def test_missing_credentials_fail_fast_without_retries(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    class NoCredentials(CredentialsProvider):
        async def aget(self) -> AwsCredentials:
            raise CredentialsError("no AWS credentials found")

    transport = make_transport(credentials=NoCredentials(region="us-east-1"))
    with pytest.raises(CredentialsError):
        await transport.call("ListShards", b"{}")
    assert server.seen == []


# -- answers read into reused buffers -------------------------------------------------------------


def big_body(fill: int, size: int = 300_000) -> bytes:
    """A JSON string answer of about ``size`` bytes: several reads on the socket."""
    return b'"' + bytes([fill]) * size + b'"'


async def test_answers_are_decoded_from_a_view_of_one_reused_buffer(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    seen: list[tuple[type, object, bytes]] = []

    def decode(view: memoryview) -> bytes:
        seen.append((type(view), view.obj, bytes(view)))
        return bytes(view)

    large, small = big_body(ord("a")), b'{"Records":[]}'
    server.script = [Reply(body=large), Reply(body=small)]
    assert await transport.call_decoded("GetRecords", b"{}", decode) == large
    # The second answer is shorter than the buffer: the view holds it and nothing after it.
    assert await transport.call_decoded("GetRecords", b"{}", decode) == small
    assert [kind for kind, _, _ in seen] == [memoryview, memoryview]
    assert seen[0][1] is seen[1][1]  # the same buffer, already grown to the large answer
    assert len(seen[0][1]) >= len(large)  # type: ignore[arg-type]


async def test_chunked_answers_are_read_whole(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    body = big_body(ord("c"))
    server.script = [Reply(body=body, chunks=7)]
    assert await transport.call("GetRecords", b"{}") == body


async def test_concurrent_answers_read_into_different_buffers(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    bodies = [big_body(ord("a") + i, 100_000) for i in range(6)]
    # Streamed slowly in pieces, the six answers arrive interleaved.
    server.script = [Reply(body=body, chunks=5, pause=0.002) for body in bodies]
    results = await asyncio.gather(*(transport.call("GetRecords", b"{}") for _ in bodies))
    assert sorted(results) == sorted(bodies)


async def test_a_failed_decode_propagates_unretried_and_the_buffer_is_reused(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()

    def broken(view: memoryview) -> None:
        raise ValueError("cannot decode")

    with pytest.raises(ValueError, match="cannot decode"):
        await transport.call_decoded("GetRecords", b"{}", broken)
    assert len(server.seen) == 1
    server.script = [Reply(body=b'{"ok":1}')]
    assert await transport.call("GetRecords", b"{}") == b'{"ok":1}'
    assert len(transport._buffers._free) == 1


async def test_a_connection_cut_mid_answer_is_retried(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    transport = make_transport()
    body = big_body(ord("d"))
    server.script = [Reply(body=body, cut=True), Reply(body=body)]
    assert await transport.call("GetRecords", b"{}") == body
    assert len(server.seen) == 2
    assert len(transport._buffers._free) == 1  # the half-filled buffer went back and was reused


async def test_get_records_decodes_from_the_buffer(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    client = KinesisClient(transport=make_transport())
    body = msgspec.json.encode(
        {
            "Records": [
                {"SequenceNumber": str(10**55 + i), "Data": "aGVsbG8=", "PartitionKey": f"k{i}"}
                for i in range(2000)
            ],
            "NextShardIterator": "next",
            "MillisBehindLatest": 7,
        }
    )
    server.script = [Reply(body=body, chunks=4), Reply(body=b'{"Records":[],"NextShardIterator":"n2"}')]
    first = await client.get_records("it")
    second = await client.get_records("next")  # reuses, and overwrites, the first answer's buffer
    assert [r.partition_key for r in first.records] == [f"k{i}" for i in range(2000)]
    assert {r.data for r in first.records} == {b"hello"}
    assert (first.next_shard_iterator, first.millis_behind_latest) == ("next", 7)
    assert (second.records, second.next_shard_iterator) == ([], "n2")


def test_read_buffers_keep_a_bounded_few() -> None:
    buffers = _ReadBuffers(keep=2, largest=1000)
    taken = [buffers.take() for _ in range(3)]
    assert len({id(buffer) for buffer in taken}) == 3
    taken[0].extend(b"x" * 1001)
    for buffer in taken:
        buffers.give(buffer)
    assert buffers._free == [taken[1], taken[2]]  # the oversized one was dropped
    assert buffers.take() is taken[2]  # the most recently used first


async def test_no_accept_or_accept_encoding_is_sent(
    server: ScriptedServer, make_transport: Callable[..., JsonTransport]
) -> None:
    await make_transport().call("ListShards", b"{}")
    headers = {name.lower() for name in server.seen[0].headers}
    assert "accept-encoding" not in headers  # identity answers, as botocore asks for
    assert "accept" not in headers

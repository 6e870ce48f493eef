"""The built-in HTTP/1.1 client against raw local asyncio servers that script every byte."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from kinesis_butler.aws import CredentialsProvider, JsonTransport, TransportOptions
from kinesis_butler.aws._http1 import (
    BodyTooLarge,
    HeadersTooLarge,
    Http1Client,
    IncompleteResponse,
    MalformedResponse,
)
from kinesis_butler.errors import EndpointUnreachable
from kinesis_butler.testing._h2_server import tls_server_context


@dataclasses.dataclass
class Request:
    head: bytes
    body: bytes
    connection: int  # which accepted connection, in order


#: Writes the answer to one request; returns whether to keep the connection open.
Handler = Callable[[asyncio.StreamWriter, Request], Awaitable[bool]]


def answer(body: bytes = b"{}", status: str = "200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status.encode() + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


async def ok(writer: asyncio.StreamWriter, request: Request) -> bool:
    writer.write(answer(b'{"echo":' + request.body + b"}"))
    return True


class RawServer:
    """Reads requests (head and ``Content-Length`` body) and lets ``handler`` answer each."""

    def __init__(self, handler: Handler = ok) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.connections = 0
        self.release = asyncio.Event()  # handlers that hang wait for this
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}"

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.release.set()
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number, self.connections = self.connections, self.connections + 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                found = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
                body = await reader.readexactly(int(found.group(1))) if found else b""
                request = Request(head, body, number)
                self.requests.append(request)
                keep = await self.handler(writer, request)
                await writer.drain()
                if not keep:
                    break
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler = ok, ssl_context: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(handler)
        await server.start(ssl_context)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Http1Client]]:
    made: list[Http1Client] = []

    def make(url: str, **options: object) -> Http1Client:
        client = Http1Client(url, **options)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


async def post(client: Http1Client, body: bytes = b"1", timeout: float = 5.0) -> tuple[int, bytes]:
    buffer = bytearray()
    response = await client.post("/", {"Content-Type": "application/json"}, body, buffer, timeout=timeout)
    return response.status, bytes(buffer[: response.size])


# -- keep-alive -----------------------------------------------------------------------------------


async def test_requests_reuse_one_kept_alive_connection(serve, clients) -> None:  # type: ignore[no-untyped-def]
    server = await serve()
    client = clients(server.url())
    for n in range(5):
        assert await post(client, b"%d" % n) == (200, b'{"echo":%d}' % n)
    assert server.connections == 1
    assert client.idle_connections == 1
    head = server.requests[0].head.decode()
    assert head.startswith("POST / HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n" in head
    assert "\r\nContent-Length: 1\r\n" in head
    assert "accept" not in head.lower()


async def test_answer_lands_in_the_given_buffer_and_headers_are_case_insensitive(serve, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        writer.write(answer(b"abc", extra=b"X-Amzn-RequestId: rid-1\r\ncontent-type: application/json\r\n"))
        return True

    client = clients((await serve(handler)).url())
    buffer = bytearray(b"z" * 100)
    response = await client.post("/", {}, b"", buffer, timeout=5)
    assert (response.status, response.reason, response.size) == (200, "OK", 3)
    assert buffer[:3] == b"abc"
    assert len(buffer) == 100  # large enough already: not reallocated
    assert response.headers.get("x-amzn-requestid") == "rid-1"
    assert response.headers["Content-Type"] == "application/json"
    assert "CONTENT-LENGTH" in response.headers
    assert response.headers.get("missing") is None


async def test_a_connection_the_server_closed_after_answering_is_replaced(serve, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        writer.write(answer())
        return False  # closes after the answer, without announcing it

    server = await serve(handler)
    client = clients(server.url())
    for _ in range(3):  # whether or not the client saw the close yet, each call succeeds
        assert await post(client) == (200, b"{}")
    assert server.connections == 3


async def test_the_keep_alive_race_is_retried_once_on_a_fresh_connection(serve, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        if request.body == b"2" and request.connection == 0:
            return False  # closed as the request arrived: no byte of an answer
        writer.write(answer(request.body))
        return True

    server = await serve(handler)
    client = clients(server.url())
    assert await post(client, b"1") == (200, b"1")
    assert await post(client, b"2") == (200, b"2")
    assert [(r.body, r.connection) for r in server.requests] == [(b"1", 0), (b"2", 0), (b"2", 1)]


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried(serve, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        return False

    server = await serve(handler)
    with pytest.raises(IncompleteResponse, match="without answering"):
        await post(clients(server.url()))
    assert len(server.requests) == 1


async def test_connection_close_and_http_1_0_answers_are_not_reused(serve, clients) -> None:  # type: ignore[no-untyped-def]
    replies = [
        answer(b"a", extra=b"Connection: close\r\n"),
        b"HTTP/1.0 200 OK\r\n\r\nuntil-eof",  # no length: the body ends with the connection
        answer(b"c"),
    ]

    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        writer.write(replies.pop(0))
        return bool(replies) and len(replies) != 1

    server = await serve(handler)
    client = clients(server.url())
    assert [await post(client) for _ in range(3)] == [(200, b"a"), (200, b"until-eof"), (200, b"c")]
    assert server.connections == 3


async def test_concurrent_calls_use_separate_connections(serve, clients) -> None:  # type: ignore[no-untyped-def]
    arrived = asyncio.Event()

    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        if len(server.requests) == 4:
            arrived.set()
        await arrived.wait()  # all four are in flight at once
        writer.write(answer(request.body))
        return True

    server = await serve(handler)
    client = clients(server.url())
    results = await asyncio.gather(*(post(client, b"%d" % n) for n in range(4)))
    assert results == [(200, b"%d" % n) for n in range(4)]
    assert server.connections == 4
    assert client.idle_connections == 4


async def test_the_pool_limit_caps_open_connections(serve, clients) -> None:  # type: ignore[no-untyped-def]
    server = await serve()
    client = clients(server.url(), pool_limit=2)
    results = await asyncio.gather(*(post(client, b"%d" % n) for n in range(6)))
    assert len(results) == 6
    assert server.connections <= 2


# -- bodies ---------------------------------------------------------------------------------------


def chunked(body: bytes, size: int) -> list[bytes]:
    parts = [
        b"%x;ext=1\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", *parts, b"0\r\nX-Trailer: t\r\n\r\n"]


@pytest.mark.parametrize(("size", "piece"), [(10, 3), (300_000, 70_001), (200_000, 1)])
async def test_chunked_answers_are_read_whole(serve, clients, size: int, piece: int) -> None:  # type: ignore[no-untyped-def]
    body = bytes(range(256)) * (size // 256) + b"end"

    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        wire = b"".join(chunked(body, piece if piece > 1 else 50_000))
        step = 7 if piece == 1 else len(wire) // 3 + 1  # odd boundaries, or three writes
        for start in range(0, len(wire), step):
            writer.write(wire[start : start + step])
            if piece != 1:
                await writer.drain()
        return True

    server = await serve(handler)
    client = clients(server.url())
    assert await post(client) == (200, body)
    assert await post(client) == (200, body)  # and the connection is reusable after the trailers
    assert server.connections == 1


async def test_a_large_body_and_a_small_one_reuse_the_buffer(serve, clients) -> None:  # type: ignore[no-untyped-def]
    bodies = [b"x" * 1_000_000, b"small"]

    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        writer.write(answer(bodies.pop(0)))
        return True

    client = clients((await serve(handler)).url())
    buffer = bytearray()
    first = await client.post("/", {}, b"", buffer, timeout=5)
    assert (first.size, bytes(buffer[: first.size])) == (1_000_000, b"x" * 1_000_000)
    second = await client.post("/", {}, b"", buffer, timeout=5)
    assert bytes(buffer[: second.size]) == b"small"
    assert len(buffer) == 1_000_000


async def test_a_truncated_body_is_an_incomplete_response(serve, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
        return False

    server = await serve(handler)
    with pytest.raises(IncompleteResponse, match="mid-answer"):
        await post(clients(server.url()))
    assert len(server.requests) == 1  # bytes of the answer arrived: never resent by the client


async def test_the_transport_retries_a_truncated_body(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        if len(server.requests) == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
            return False
        writer.write(answer(b'{"ok":1}'))
        return True

    server = await serve(handler)
    delays: list[float] = []

    async def no_sleep(delay: float) -> None:
        delays.append(delay)

    async with JsonTransport(
        service="kinesis",
        target_prefix="Kinesis_20131202",
        credentials=CredentialsProvider.static("AKID", "secret", region="us-east-1"),
        endpoint_url=server.url(),
        options=TransportOptions(http_client="builtin"),
        sleep=no_sleep,
    ) as transport:
        assert await transport.call("GetRecords", b"{}") == b'{"ok":1}'
    assert len(server.requests) == 2
    assert len(delays) == 1


# -- limits and malformed answers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 5000 + b"\r\nContent-Length: 0\r\n\r\n", HeadersTooLarge),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 5000, HeadersTooLarge),  # and no end in sight
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2001\r\n\r\n", BodyTooLarge),
        (b"".join(chunked(b"y" * 3000, 1000)), BodyTooLarge),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", MalformedResponse),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", MalformedResponse),
        (b"HTTP/2 200\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", MalformedResponse),
    ],
)
async def test_oversize_and_malformed_answers_are_rejected(  # type: ignore[no-untyped-def]
    serve, clients, reply: bytes, error: type[Exception]
) -> None:
    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        writer.write(reply)
        await server.release.wait()  # keeps the connection open: the client must give up by itself
        return False

    server = await serve(handler)
    client = clients(server.url(), max_header_size=4096, max_body_size=2000)
    with pytest.raises(error):
        await post(client)
    assert client.idle_connections == 0


async def test_bytes_after_an_answer_drop_the_connection(serve, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        writer.write(answer(b"one") + b"HTTP/1.1 200 OK\r\n")
        return True

    server = await serve(handler)
    client = clients(server.url())
    assert await post(client) == (200, b"one")
    assert await post(client) == (200, b"one")
    assert server.connections == 2


async def test_an_interim_100_continue_is_skipped(serve, clients) -> None:  # type: ignore[no-untyped-def]
    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"final", "404 Not Found"))
        return True

    assert await post(clients((await serve(handler)).url())) == (404, b"final")


# -- timeouts and closing -------------------------------------------------------------------------


async def hang(writer: asyncio.StreamWriter, request: Request) -> bool:
    await asyncio.Event().wait()  # cancelled at teardown
    return False


async def test_a_slow_server_times_out_and_the_connection_is_dropped(serve, clients) -> None:  # type: ignore[no-untyped-def]
    server = await serve(hang)
    client = clients(server.url())
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await post(client, timeout=0.1)
    assert 0.09 <= loop.time() - started < 2
    assert client.idle_connections == 0


async def test_a_tls_handshake_that_never_completes_hits_the_connect_timeout(serve, clients) -> None:  # type: ignore[no-untyped-def]
    server = await serve(hang)  # plain TCP: it never answers the ClientHello
    client = clients(server.url("https"), connect_timeout=0.1)
    with pytest.raises(TimeoutError):
        await post(client, timeout=5)


async def test_closing_the_client_fails_requests_in_flight(serve, clients) -> None:  # type: ignore[no-untyped-def]
    arrived = asyncio.Event()

    async def handler(writer: asyncio.StreamWriter, request: Request) -> bool:
        arrived.set()
        return await hang(writer, request)

    server = await serve(handler)
    client = clients(server.url())
    call = asyncio.ensure_future(post(client))
    await arrived.wait()
    await client.aclose()
    with pytest.raises(IncompleteResponse):
        await call


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, str]:
    return tls_server_context(["http/1.1"])


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_tls_verifies_a_trusted_certificate(serve, clients, tls, host: str) -> None:  # type: ignore[no-untyped-def]
    context, ca = tls
    server = await serve(ssl_context=context)
    client = clients(server.url("https", host), ssl_context=ssl.create_default_context(cadata=ca))
    assert await post(client) == (200, b'{"echo":1}')
    assert await post(client) == (200, b'{"echo":1}')
    assert server.connections == 1


async def test_tls_rejects_an_untrusted_certificate_unless_verification_is_off(serve, clients, tls) -> None:  # type: ignore[no-untyped-def]
    server = await serve(ssl_context=tls[0])
    with pytest.raises(ssl.SSLCertVerificationError):
        await post(clients(server.url("https", "localhost")))
    assert await post(clients(server.url("https", "localhost"), verify=False)) == (200, b'{"echo":1}')


async def test_the_transport_reports_an_unreachable_tls_endpoint(serve, tls) -> None:  # type: ignore[no-untyped-def]
    server = await serve(ssl_context=tls[0])

    async def no_sleep(delay: float) -> None:
        pass

    async with JsonTransport(
        service="kinesis",
        target_prefix="Kinesis_20131202",
        credentials=CredentialsProvider.static("AKID", "secret", region="us-east-1"),
        endpoint_url=server.url("https", "localhost"),
        options=TransportOptions(max_attempts=2),
        sleep=no_sleep,
    ) as transport:
        with pytest.raises(EndpointUnreachable, match="SSLCertVerificationError"):
            await transport.call("ListShards", b"{}")

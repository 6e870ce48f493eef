"""A minimal asyncio HTTP/1.1 client: exactly what :class:`~kinesis_butler.aws.transport.JsonTransport`
needs, at a fraction of aiohttp's CPU per call.

One :class:`Http1Client` POSTs small bodies to one ``http(s)://host[:port]`` endpoint over a
pool of keep-alive connections (reused most-recent-first, capped; one that the server closed is
dropped). A connection is an :class:`asyncio.BufferedProtocol` that parses the answer in its
read callbacks: ``Content-Length`` bodies (and chunk data when it can) are received straight
into the caller's ``bytearray``, so the answer is never copied or joined. A reused connection
that fails before the first byte of the answer (the server closed it while it sat idle: the
keep-alive race) is replaced once by a fresh one.

Failures are :class:`TimeoutError` (connect or answer past the deadline), :class:`OSError`
(refused, reset, TLS) or :class:`Http1Error` (a broken or oversized answer); the connection is
dropped after any of them.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

from kinesis_butler.aws._http1_connection import (
    BodyTooLarge,
    Connection,
    Headers,
    HeadersTooLarge,
    Http1Error,
    IncompleteResponse,
    MalformedResponse,
    Response,
    StaleConnection,
)

__all__ = [
    "BodyTooLarge",
    "Headers",
    "HeadersTooLarge",
    "Http1Client",
    "Http1Error",
    "IncompleteResponse",
    "MalformedResponse",
    "Response",
]


class Http1Client:
    """Keep-alive HTTP/1.1 POSTs to one endpoint. One client belongs to one event loop."""

    def __init__(
        self,
        url: str,
        *,
        pool_limit: int = 256,
        keepalive_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_header_size: int = 64 << 10,
        max_body_size: int = 64 << 20,
        ssl_context: ssl.SSLContext | None = None,
        verify: bool = True,
        user_agent: str = "kinesis-butler/0.1",
    ) -> None:
        """Create a client; connections open on demand.

        Args:
            url: ``http(s)://host[:port]``; a path is ignored (each request names its own).
            pool_limit: most connections open at once; more concurrent requests wait.
            keepalive_timeout: seconds an idle connection stays pooled.
            connect_timeout: seconds to open a connection (TCP and TLS).
            max_header_size: the largest status line and headers accepted.
            max_body_size: the largest body accepted.
            ssl_context: for https; defaults to :func:`ssl.create_default_context`.
            verify: with the default context, False skips certificate and hostname checks.
            user_agent: the ``User-Agent`` header.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s)://host[:port] URL, got {url!r}")
        https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if https else 80)
        authority = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None and parts.port != (443 if https else 80):
            authority = f"{authority}:{parts.port}"
        self._authority = authority
        self._ssl: ssl.SSLContext | None = None
        if https:
            self._ssl = ssl_context or ssl.create_default_context()
            if ssl_context is None and not verify:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        self._user_agent = user_agent
        self._keepalive = keepalive_timeout
        self._connect_timeout = connect_timeout
        self._max_header = max_header_size
        self._max_body = max_body_size
        self._limit = pool_limit
        self._busy = 0  # connections lent to requests (or being opened for one)
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle: list[Connection] = []  # most recently used last
        self._open: set[Connection] = set()
        self._closed = False

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def post(
        self,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        into: bytearray,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> Response:
        """POST ``body`` and receive the answer's body into ``into`` (grown as needed).

        Args:
            path: the request target, e.g. ``/``.
            headers: request headers; ``Host`` (unless given), ``User-Agent`` and
                ``Content-Length`` are added.
            body: the request body.
            into: receives the body; the answer's bytes are ``into[:response.size]``.
            timeout: seconds for the whole request, connecting included.

        Raises:
            TimeoutError: no complete answer in time.
            OSError: the connection could not be opened or broke while sending.
            Http1Error: the answer was cut short, malformed or too large.
        """
        head = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if "Host" not in headers and "host" not in headers:
            head += f"Host: {self._authority}\r\n"
        request = (
            f"POST {path} HTTP/1.1\r\n{head}User-Agent: {self._user_agent}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._closed:
            raise Http1Error("the client is closed")
        if self._busy >= self._limit:
            await self._wait_for_slot(loop, deadline)
        self._busy += 1
        try:
            return await self._exchange(loop, request, into, deadline)
        finally:
            self._release()

    async def _exchange(
        self, loop: asyncio.AbstractEventLoop, request: bytes, into: bytearray, deadline: float
    ) -> Response:
        connection: Connection | None = None
        timer: asyncio.TimerHandle | None = None
        try:
            connection, reused = self._pooled(loop.time() - self._keepalive)
            if connection is None:
                connection = await self._connect(loop, deadline)
            timer = loop.call_at(deadline, connection.fail, TimeoutError())
            try:
                response = await connection.start(request, into)
            except StaleConnection:
                if not reused:
                    raise
                timer.cancel()
                self._drop(connection)  # the keep-alive race: the server closed it as we sent
                connection = await self._connect(loop, deadline)
                timer = loop.call_at(deadline, connection.fail, TimeoutError())
                response = await connection.start(request, into)
        except BaseException:
            if connection is not None:
                connection.fail(IncompleteResponse("the request was abandoned"))
                self._open.discard(connection)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if connection is not None:
                connection.done()
        if connection.closed or self._closed:
            self._drop(connection)
        else:
            connection.idle_since = loop.time()
            self._idle.append(connection)
        return response

    def _pooled(self, expired: float) -> tuple[Connection | None, bool]:
        """The most recently used live pooled connection, and True; or (None, False)."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > expired:
                while idle and idle[0].idle_since <= expired:  # the oldest ones are past due
                    self._drop(idle.pop(0))
                return connection, True
            self._drop(connection)
        return None, False

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        while self._busy >= self._limit:
            slot: asyncio.Future[None] = loop.create_future()
            self._waiting.append(slot)
            try:
                async with asyncio.timeout_at(deadline):
                    await slot
            finally:
                if slot in self._waiting:
                    self._waiting.remove(slot)
            if self._closed:
                raise Http1Error("the client is closed")

    def _release(self) -> None:
        self._busy -= 1
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                break

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Connection:
        async with asyncio.timeout(min(self._connect_timeout, deadline - loop.time())):
            _, connection = await loop.create_connection(
                lambda: Connection(loop, self._max_header, self._max_body),
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self._ssl is not None else None,
            )
        if self._closed:
            connection.close()
            raise Http1Error("the client is closed")
        self._open.add(connection)
        return connection

    def _drop(self, connection: Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def aclose(self) -> None:
        """Close every connection; requests in flight fail. Idempotent."""
        self._closed = True
        self._idle.clear()
        connections, self._open = self._open, set()
        for connection in connections:
            connection.fail(IncompleteResponse("the client was closed"))
        await asyncio.sleep(0)  # let the transports report connection_lost

"""A small asyncio HTTP/2 client on the sans-IO ``h2`` library, for SubscribeToShard.

AWS serves SubscribeToShard only over HTTP/2 and aiohttp has none. One connection per endpoint
carries many concurrent streams (one per shard subscription); when the server's
MAX_CONCURRENT_STREAMS (or our own cap) is reached, :class:`H2Pool` opens a further connection.
Response bodies stream: each chunk is acknowledged to the flow-control windows only once the
reader took it, so a slow reader holds back its own stream and nothing else; the connection
window is opened wide so no stream starves another.

A stream reset, a GOAWAY (h2 cannot read frames after one, so every stream of that connection
ends), a lost connection or a silent stream raise the retriable
:class:`~kinesis_butler.errors.ConnectionLost`; failing to connect raises ``EndpointUnreachable``.
Nothing here retries. :mod:`kinesis_butler.aws.streaming` chooses between this and HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, NamedTuple, Protocol
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from kinesis_butler.errors import ClosedError, ConfigError, ConnectionLost, EndpointUnreachable

__all__ = ["H2Options", "H2Pool", "NotH2", "Origin", "StreamingResponse"]

logger = logging.getLogger(__name__)

#: The largest flow-control window HTTP/2 allows.
MAX_WINDOW: Final = 2**31 - 1


class H2Options(Protocol):
    """What the HTTP/2 connections need to know (``StreamingOptions`` provides it)."""

    @property
    def connect_timeout(self) -> float: ...
    @property
    def read_timeout(self) -> float: ...
    @property
    def stream_window(self) -> int: ...
    @property
    def max_streams_per_connection(self) -> int: ...


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> tuple[Origin, str]:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigError(f"invalid URL {url!r}: expected http(s)://host[:port][/path]")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port), parts.path or "/"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


class StreamingResponse:
    """A response whose body is read chunk by chunk while it arrives.

    Attributes:
        status: the HTTP status.
        headers: response headers, names in lower case.
        protocol: ``h2`` or ``http/1.1``.
    """

    protocol: str = ""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrived; ``b""`` once the body is complete.

        Raises:
            ConnectionLost: the stream was reset, the connection broke, or nothing arrived for
                ``read_timeout`` seconds.
            ClosedError: the client was closed.
        """
        raise NotImplementedError

    async def read_all(self, limit: int = 1 << 20) -> bytes:
        """The rest of the body, at most ``limit`` bytes (for error answers)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (chunk := await self.read_chunk()):
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk


# -- HTTP/2 -----------------------------------------------------------------------------------


class NotH2(Exception):
    """The TLS server did not select ``h2`` by ALPN (``args[0]`` is what it selected)."""


class _H2Response(StreamingResponse):
    protocol = "h2"

    def __init__(self, connection: _H2Connection, stream_id: int, read_timeout: float) -> None:
        super().__init__()
        self.stream_id = stream_id
        self._connection = connection
        self._read_timeout = read_timeout
        self._chunks: deque[tuple[bytes, int]] = deque()  # data, flow-controlled length
        self._wakeup = asyncio.Event()
        self._has_headers = False
        self._ended = False
        self._error: BaseException | None = None
        self._released = False

    # Called by the connection, synchronously in the event loop.
    def on_headers(self, headers: list[tuple[str, str]]) -> None:
        self.headers = {name: value for name, value in headers if not name.startswith(":")}
        self.status = int(dict(headers).get(":status", "0"))
        self._has_headers = True
        self._wakeup.set()

    def on_data(self, data: bytes, flow_length: int) -> None:
        self._chunks.append((data, flow_length))
        self._wakeup.set()

    def on_end(self) -> None:
        self._ended = True
        self._wakeup.set()

    def on_error(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wakeup.set()

    async def _wait(self) -> None:
        self._wakeup.clear()
        await self._wakeup.wait()

    async def wait_headers(self, timeout: float) -> None:  # noqa: ASYNC109 - a deadline for a wait loop
        try:
            async with asyncio.timeout(timeout):
                while not self._has_headers:
                    if self._error is not None:
                        raise self._error
                    if self._ended:
                        raise ConnectionLost(f"{self._connection.origin} ended a stream without a response")
                    await self._wait()
        except TimeoutError:
            raise ConnectionLost(f"{self._connection.origin} sent no response within {timeout:g} s") from None

    async def read_chunk(self) -> bytes:
        while True:
            if self._chunks:
                data, flow_length = self._chunks.popleft()
                self._connection.acknowledge(self.stream_id, flow_length)
                if data:
                    return data
                continue
            if self._error is not None:
                raise self._error
            if self._ended or self._released:
                return b""
            try:
                async with asyncio.timeout(self._read_timeout):
                    await self._wait()
            except TimeoutError:
                raise ConnectionLost(
                    f"{self._connection.origin} sent nothing for {self._read_timeout:g} s"
                ) from None

    def release(self) -> None:
        """Forget the stream; reset it if it is still open. Idempotent."""
        if self._released:
            return
        self._released = True
        unread = sum(flow for _, flow in self._chunks)
        self._chunks.clear()
        self._connection.release(self, unread, reset=not self._ended and self._error is None)


class _H2Connection(asyncio.Protocol):
    """One HTTP/2 connection: the h2 state machine fed by an asyncio transport."""

    def __init__(self, origin: Origin, options: H2Options) -> None:
        self.origin = origin
        self._options = options
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _H2Response] = {}
        self._settings = asyncio.Event()
        self._window = asyncio.Event()
        self._closed = asyncio.Event()
        self.alive = True  # the transport is up
        self.accepting = True  # may take new streams (False once draining)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - stream transports only
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._flush()
            self._fail(ConnectionLost(f"HTTP/2 protocol error from {self.origin}: {exc}"))
            return
        for event in events:
            self._dispatch(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(ConnectionLost(f"the connection to {self.origin} was lost{reason}"))
        self._closed.set()

    # -- events -----------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.on_headers([(str(k), str(v)) for k, v in event.headers or ()])
        elif isinstance(event, h2.events.DataReceived):
            flow = event.flow_controlled_length or 0
            if stream is not None:
                stream.on_data(event.data or b"", flow)
            elif flow and event.stream_id:
                self.acknowledge(event.stream_id, flow)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.on_end()
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            code = _error_name(event.error_code)
            stream.on_error(ConnectionLost(f"{self.origin} reset the stream ({code})"))
        elif isinstance(event, h2.events.ConnectionTerminated):
            code, last = _error_name(event.error_code), event.last_stream_id
            self._fail(ConnectionLost(f"{self.origin} sent GOAWAY ({code}, last stream {last})"))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings.set()
            self._window.set()
        elif isinstance(event, h2.events.WindowUpdated):
            self._window.set()

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _fail(self, error: BaseException) -> None:
        self.alive = self.accepting = False
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.on_error(error)
        self._window.set()
        self._settings.set()  # wakes start() if the handshake failed
        if self._transport is not None:
            self._transport.close()

    # -- used by the pool and the responses --------------------------------------------------

    async def start(self, timeout: float) -> None:  # noqa: ASYNC109 - a deadline for the handshake
        self._h2.initiate_connection()
        # Applied when the server acknowledges them, which it does before answering any request.
        self._h2.update_settings(
            {
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._options.stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 17,
            }
        )
        self._h2.increment_flow_control_window(MAX_WINDOW - 65_535)
        self._flush()
        try:
            async with asyncio.timeout(timeout):
                await self._settings.wait()
        except TimeoutError:
            self.close()
            raise EndpointUnreachable(f"{self.origin} sent no HTTP/2 settings within {timeout:g} s") from None
        if not self.alive:
            raise EndpointUnreachable(f"{self.origin} closed the connection during the HTTP/2 handshake")

    def has_capacity(self) -> bool:
        limit = min(self._h2.remote_settings.max_concurrent_streams, self._options.max_streams_per_connection)
        return self.accepting and max(len(self._streams), self._h2.open_outbound_streams) < limit

    def drain(self) -> None:
        """Take no new streams; close once the open ones are released."""
        self.accepting = False
        if not self._streams:
            self.close()

    def open_stream(self, headers: list[tuple[str, str]], end_stream: bool) -> _H2Response:
        """Send request headers on a new stream (synchronously: no other task runs meanwhile)."""
        stream_id = self._h2.get_next_available_stream_id()
        self._h2.send_headers(stream_id, headers, end_stream=end_stream)
        response = _H2Response(self, stream_id, self._options.read_timeout)
        self._streams[stream_id] = response
        self._flush()
        return response

    async def send_body(self, stream_id: int, body: bytes) -> None:
        view = memoryview(body)
        try:
            while view:
                if not self.alive or stream_id not in self._streams:
                    return  # the stream failed; its reader sees why
                size = min(
                    len(view), self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size
                )
                if size <= 0:
                    self._window.clear()
                    await self._window.wait()
                    continue
                self._h2.send_data(stream_id, view[:size].tobytes(), end_stream=size == len(view))
                view = view[size:]
                self._flush()
        except h2.exceptions.H2Error as exc:
            raise ConnectionLost(f"sending to {self.origin} failed: {exc}") from exc

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        """Hand ``flow_length`` bytes of window back to the server (stream and connection)."""
        if flow_length and self.alive:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.acknowledge_received_data(flow_length, stream_id)
                self._flush()

    def release(self, stream: _H2Response, unread: int, *, reset: bool) -> None:
        if self._streams.pop(stream.stream_id, None) is None or not self.alive:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            if reset:
                self._h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            if unread:
                self._h2.acknowledge_received_data(unread, stream.stream_id)
        self._flush()
        if not self.accepting and not self._streams:
            self.close()

    def close(self) -> None:
        """Send GOAWAY and close; open streams fail with ``ClosedError``."""
        if self.alive:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.close_connection()
            self._flush()
        self._fail(ClosedError(f"the streaming client for {self.origin} was closed"))

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109 - a bounded wait
        try:
            async with asyncio.timeout(timeout):
                await self._closed.wait()
        except TimeoutError:
            if self._transport is not None:
                self._transport.abort()


def _error_name(code: int | None) -> str:
    try:
        return h2.errors.ErrorCodes(code or 0).name
    except ValueError:
        return f"error {code}"


class H2Pool:
    """The HTTP/2 connections to one origin; :meth:`request` opens a stream on one with room."""

    def __init__(self, origin: Origin, options: H2Options, ssl_context: ssl.SSLContext | None) -> None:
        self.origin = origin
        self._options = options
        self._ssl = ssl_context
        self.connections: list[_H2Connection] = []
        self._lock = asyncio.Lock()

    def _pick(self) -> _H2Connection | None:
        self.connections = [c for c in self.connections if c.alive]
        return next((c for c in self.connections if c.has_capacity()), None)

    async def _connect(self) -> _H2Connection:
        loop = asyncio.get_running_loop()
        origin, timeout = self.origin, self._options.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                transport, connection = await loop.create_connection(
                    lambda: _H2Connection(origin, self._options),
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl else None,
                )
        except TimeoutError:
            raise EndpointUnreachable(f"connecting to {origin} timed out after {timeout:g} s") from None
        except OSError as exc:
            raise EndpointUnreachable(f"could not connect to {origin} ({type(exc).__name__}: {exc})") from exc
        if self._ssl is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if alpn != "h2":
                transport.close()
                raise NotH2(alpn)
        await connection.start(timeout)
        return connection

    async def request(self, path: str, headers: list[tuple[str, str]], body: bytes) -> _H2Response:
        request_headers = [(":method", "POST"), (":scheme", self.origin.scheme), (":path", path), *headers]
        for _ in range(3):  # a request h2 refuses on fresh connections too is refused for itself
            connection = self._pick()
            if connection is None:
                async with self._lock:
                    connection = self._pick()
                    if connection is None:
                        connection = await self._connect()
                        self.connections.append(connection)
            try:
                response = connection.open_stream(request_headers, end_stream=not body)
            except h2.exceptions.H2Error as exc:
                # Out of stream ids, or the server lowered its stream limit: retire the connection.
                logger.debug("HTTP/2 connection to %s takes no new streams (%s)", self.origin, exc)
                connection.drain()
                error = exc
                continue
            if body:
                try:
                    await connection.send_body(response.stream_id, body)
                except BaseException:
                    response.release()
                    raise
            return response
        raise ConnectionLost(f"could not open an HTTP/2 stream to {self.origin}: {error}")

    async def aclose(self) -> None:
        connections, self.connections = self.connections, []
        for connection in connections:
            connection.close()
        for connection in connections:
            await connection.wait_closed(self._options.connect_timeout)

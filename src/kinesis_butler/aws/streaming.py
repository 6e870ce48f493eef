"""Streaming HTTP requests for SubscribeToShard: HTTP/2 where the endpoint speaks it, else HTTP/1.1.

Protocol choice per endpoint: ``https`` negotiates ``h2`` by ALPN (:mod:`kinesis_butler.aws.http2`)
and falls back to HTTP/1.1 through aiohttp when the server offers only that; ``http`` uses
HTTP/1.1 unless ``h2c`` asks for HTTP/2 with prior knowledge. AWS always negotiates ``h2``;
kinesis-local speaks both (h2 by ALPN on its TLS port, h2c or HTTP/1.1 on its plain port).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Final

import aiohttp

from kinesis_butler.aws.http2 import MAX_WINDOW, H2Pool, NotH2, Origin, StreamingResponse
from kinesis_butler.errors import ClosedError, ConfigError, ConnectionLost, EndpointUnreachable

__all__ = ["StreamingHttpClient", "StreamingOptions", "StreamingResponse"]

logger = logging.getLogger(__name__)

_USER_AGENT: Final = "kinesis-butler/0.1"
_HOP_BY_HOP: Final = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamingOptions:
    """How streaming requests connect and read.

    Attributes:
        connect_timeout: seconds to open a connection (TCP, TLS and the HTTP/2 settings exchange).
        response_timeout: seconds from sending a request to its response headers.
        read_timeout: the longest silence while a body streams before ``ConnectionLost``
            (AWS sends a SubscribeToShardEvent every few seconds even when the shard is idle).
        h2c: speak HTTP/2 with prior knowledge to ``http://`` endpoints (kinesis-local can).
        verify_tls: check the server certificate and host name (off only for local emulators).
        ca_data: PEM certificates to trust besides the system's (private CAs, test servers).
        stream_window: the receive window of each stream in bytes (the KCL uses 512 KiB).
        max_streams_per_connection: our cap on concurrent streams per connection, on top of
            the server's MAX_CONCURRENT_STREAMS.
    """

    connect_timeout: float = 5.0
    response_timeout: float = 10.0
    read_timeout: float = 35.0
    h2c: bool = False
    verify_tls: bool = True
    ca_data: str | None = None
    stream_window: int = 512 * 1024
    max_streams_per_connection: int = 100

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "response_timeout", "read_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 65_535 <= self.stream_window <= MAX_WINDOW:
            raise ConfigError(f"stream_window must be 65535..{MAX_WINDOW}, got {self.stream_window}")
        if self.max_streams_per_connection < 1:
            raise ConfigError("max_streams_per_connection must be at least 1")

    def ssl_context(self, alpn: list[str]) -> ssl.SSLContext:
        """A client TLS context offering ``alpn``, trusting the system CAs and ``ca_data``."""
        context = ssl.create_default_context(cadata=self.ca_data)
        if not self.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(alpn)
        return context


# -- HTTP/1.1 ---------------------------------------------------------------------------------


class _Http1Response(StreamingResponse):
    protocol = "http/1.1"

    def __init__(self, response: aiohttp.ClientResponse, origin: Origin, read_timeout: float) -> None:
        super().__init__()
        self.status = response.status
        self.headers = {name.lower(): value for name, value in response.headers.items()}
        self._response = response
        self._origin = origin
        self._read_timeout = read_timeout

    async def read_chunk(self) -> bytes:
        try:
            async with asyncio.timeout(self._read_timeout):
                return await self._response.content.readany()
        except TimeoutError:
            raise ConnectionLost(f"{self._origin} sent nothing for {self._read_timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionLost(f"reading from {self._origin} failed ({type(exc).__name__}: {exc})") from exc


# -- the client -------------------------------------------------------------------------------


class StreamingHttpClient:
    """Sends POST requests whose responses stream, over HTTP/2 or HTTP/1.1 (see the module doc).

    Create and use it inside one event loop; :meth:`aclose` closes every connection.

    Example:
        >>> async with StreamingHttpClient() as client:
        ...     async with client.post(url, headers, body) as response:
        ...         async for chunk in response:
        ...             ...
    """

    def __init__(self, options: StreamingOptions | None = None) -> None:
        self.options = options or StreamingOptions()
        self._pools: dict[Origin, H2Pool] = {}
        self._http1_origins: set[Origin] = set()
        self._session: aiohttp.ClientSession | None = None
        self._http1_ssl: ssl.SSLContext | None = None
        self._closed = False

    async def __aenter__(self) -> StreamingHttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def protocol_for(self, url: str) -> str | None:
        """``h2`` or ``http/1.1`` once known for the URL's origin; ``None`` before the first request."""
        origin, _ = Origin.parse(url)
        if origin in self._http1_origins or (origin.scheme == "http" and not self.options.h2c):
            return "http/1.1"
        return "h2" if origin in self._pools else None

    def connection_count(self, url: str) -> int:
        """Open HTTP/2 connections to the URL's origin."""
        pool = self._pools.get(Origin.parse(url)[0])
        return sum(c.alive for c in pool.connections) if pool else 0

    @contextlib.asynccontextmanager
    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes
    ) -> AsyncIterator[StreamingResponse]:
        """Send ``body`` and yield the response once its headers arrived; its body streams.

        Leaving the block early resets the stream (HTTP/2) or drops the connection (HTTP/1.1).

        Raises:
            EndpointUnreachable: no connection could be made.
            ConnectionLost: the connection or stream broke before the response headers.
            ClosedError: the client was closed.
        """
        if self._closed:
            raise ClosedError("this streaming client was closed; create a new one")
        origin, path = Origin.parse(url)
        if (origin.scheme == "https" or self.options.h2c) and origin not in self._http1_origins:
            pool = self._pools.get(origin)
            if pool is None:
                tls = self.options.ssl_context(["h2", "http/1.1"]) if origin.scheme == "https" else None
                pool = self._pools[origin] = H2Pool(origin, self.options, tls)
            authority = next((v for k, v in headers.items() if k.lower() == "host"), None)
            h2_headers = [
                (":authority", authority or _authority(origin)),
                *((k.lower(), v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP),
                ("content-length", str(len(body))),
            ]
            if not any(k.lower() == "user-agent" for k in headers):
                h2_headers.append(("user-agent", _USER_AGENT))
            try:
                response = await pool.request(path, h2_headers, body)
            except NotH2 as exc:
                logger.info("%s does not offer HTTP/2 (ALPN %s); using HTTP/1.1", origin, exc.args[0])
                self._http1_origins.add(origin)
            else:
                try:
                    await response.wait_headers(self.options.response_timeout)
                    yield response
                finally:
                    response.release()
                return
        async with self._http1_post(origin, url, headers, body) as http1_response:
            yield http1_response

    @contextlib.asynccontextmanager
    async def _http1_post(
        self, origin: Origin, url: str, headers: Mapping[str, str], body: bytes
    ) -> AsyncIterator[StreamingResponse]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                headers={"User-Agent": _USER_AGENT},
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                read_bufsize=1 << 18,
            )
            self._http1_ssl = self.options.ssl_context(["http/1.1"])
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.options.connect_timeout, sock_read=self.options.response_timeout
        )
        ssl_context: ssl.SSLContext | bool = False
        if origin.scheme == "https" and self._http1_ssl is not None:
            ssl_context = self._http1_ssl
        try:
            response = await self._session.post(
                url, data=body, headers=dict(headers), timeout=timeout, ssl=ssl_context
            )
        except TimeoutError:
            raise ConnectionLost(
                f"{origin} sent no response within {self.options.response_timeout:g} s"
            ) from None
        except (aiohttp.ClientConnectorError, aiohttp.ClientSSLError) as exc:
            raise EndpointUnreachable(f"could not connect to {origin} ({type(exc).__name__}: {exc})") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionLost(f"the request to {origin} failed ({type(exc).__name__}: {exc})") from exc
        try:
            yield _Http1Response(response, origin, self.options.read_timeout)
        finally:
            if response.content.at_eof():
                response.release()
            else:
                response.close()  # a connection with unread body cannot be reused

    async def aclose(self) -> None:
        """Close every connection (open streams fail with ``ClosedError``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _authority(origin: Origin) -> str:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    default = 443 if origin.scheme == "https" else 80
    return host if origin.port == default else f"{host}:{origin.port}"

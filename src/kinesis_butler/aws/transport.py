"""The JSON transport: signs, sends and retries AWS JSON-protocol calls over keep-alive HTTP/1.1.

One call is ``POST /`` with an ``X-Amz-Target`` header and a JSON body. The transport returns the
raw response bytes of a 2xx answer so each operation decodes them with its own cached msgspec
decoder (the GetRecords hot path never builds Python dicts). Error answers become the typed
errors of :mod:`kinesis_butler.errors`.

The wire is :mod:`kinesis_butler.aws._http1` by default (``TransportOptions.http_client``), a
small HTTP/1.1 client that costs about a third of aiohttp's CPU per call, or an aiohttp session.

2xx answers are read into a few reused buffers (:class:`_ReadBuffers`), and
:meth:`JsonTransport.call_decoded` decodes straight from one: a GetRecords answer is megabytes,
and allocating it afresh per call (aiohttp's ``read()`` joins the chunks into a new ``bytes``)
cost up to as much CPU in page faults as the msgspec decode itself (docs/performance.md).

Retries use full-jitter exponential backoff (``sleep = random() * min(cap, base * 2**attempt)``)
for retriable errors, 5xx answers and connection failures. ``ExpiredIterator`` is retriable for
the *caller* (with a new iterator) but retrying the same request cannot succeed, so it is raised
at once. Each call may lower or raise its attempt budget.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp

from kinesis_butler.aws._http1 import Http1Client, Http1Error
from kinesis_butler.aws._responses import ERROR_CODES, error_from_response
from kinesis_butler.aws.credentials import CredentialsProvider
from kinesis_butler.aws.signer import SigV4Signer, canonical_host, canonical_path
from kinesis_butler.errors import (
    AwsError,
    ClosedError,
    ConfigError,
    EndpointUnreachable,
    ExpiredIterator,
)

__all__ = ["ERROR_CODES", "JsonTransport", "Transport", "TransportOptions", "error_from_response"]

logger = logging.getLogger(__name__)

_USER_AGENT: Final = "kinesis-butler/0.1"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """Timeouts, retry budget and connection pool of a transport.

    Attributes:
        connect_timeout: seconds to open a TCP (and TLS) connection.
        total_timeout: seconds for one attempt, from sending to the last byte of the answer.
        max_attempts: attempts per call, the first included (1 disables retries).
        backoff_base: the first backoff ceiling, in seconds; it doubles per retry.
        backoff_cap: the largest backoff ceiling, in seconds.
        pool_limit: simultaneous connections (a consumer of N shards needs about N).
        keepalive_timeout: seconds an idle connection stays pooled.
        http_client: ``builtin`` (:mod:`kinesis_butler.aws._http1`, the default) or ``aiohttp``.
    """

    connect_timeout: float = 5.0
    total_timeout: float = 30.0
    max_attempts: int = 8
    backoff_base: float = 0.1
    backoff_cap: float = 5.0
    pool_limit: int = 256
    keepalive_timeout: float = 30.0
    http_client: Literal["builtin", "aiohttp"] = "builtin"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("connect_timeout", "total_timeout", "keepalive_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.backoff_base < 0 or self.backoff_cap < 0:
            raise ConfigError("backoff_base and backoff_cap must not be negative")
        if self.pool_limit < 1:
            raise ConfigError(f"pool_limit must be at least 1, got {self.pool_limit}")
        if self.http_client not in ("builtin", "aiohttp"):
            raise ConfigError(f"http_client must be 'builtin' or 'aiohttp', got {self.http_client!r}")


class Transport(Protocol):
    """The seam between typed operations and the wire: send one operation, get its 2xx body.

    :class:`JsonTransport` is the real one; tests and fakes implement this to answer
    operations without a network.
    """

    @property
    def endpoint_url(self) -> str:
        """The endpoint calls go to."""
        ...

    @property
    def region(self) -> str:
        """The region calls are signed for."""
        ...

    async def call(self, operation: str, body: bytes, *, max_attempts: int | None = None) -> bytes:
        """Send ``operation`` with the JSON ``body``; return the body of the 2xx answer."""
        ...

    async def aclose(self) -> None:
        """Release connections; idempotent."""
        ...


class _State(enum.Enum):
    UNOPENED = "unopened"  # no client yet; the first call creates it in the running loop
    OPENED = "opened"  # a client exists and serves calls
    CLOSED = "closed"  # aclose() ran; every later call raises ClosedError


class _Unreachable(Exception):
    """One attempt got no answer; ``call`` retries or turns it into ``EndpointUnreachable``."""

    retriable = True

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _full_jitter(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    return rand() * min(cap, base * (1 << attempt))


class _ReadBuffers:
    """Answer buffers reused across calls, so a multi-megabyte answer lands in memory that is
    already mapped instead of a fresh allocation (page faults) per call.

    A call borrows one buffer for as long as it reads and decodes its answer; concurrent calls
    borrow different ones. At most ``keep`` buffers, none larger than ``largest`` bytes, are
    kept between calls; a buffer grows to the largest answer it held and never shrinks. One
    transport belongs to one event loop, so no lock is needed.
    """

    __slots__ = ("_free", "keep", "largest")

    def __init__(self, keep: int = 4, largest: int = 16 << 20) -> None:
        self._free: list[bytearray] = []
        self.keep = keep
        self.largest = largest  # a 10 MiB GetRecords answer is about 14 MB of JSON and base64

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray()

    def give(self, buffer: bytearray) -> None:
        if len(self._free) < self.keep and len(buffer) <= self.largest:
            self._free.append(buffer)


class JsonTransport:
    """Sends signed AWS JSON-protocol calls to one service endpoint, with retries.

    The HTTP client is created lazily inside the running event loop on the first call and
    closed by :meth:`aclose`. A closed transport cannot be reopened.
    """

    def __init__(
        self,
        *,
        service: str,
        target_prefix: str,
        credentials: CredentialsProvider,
        region: str | None = None,
        endpoint_url: str | None = None,
        content_type: str = "application/x-amz-json-1.1",
        options: TransportOptions | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Create a transport. No connection is made until the first call.

        Args:
            service: the signing name and endpoint prefix (``kinesis``, ``dynamodb``).
            target_prefix: prefix of ``X-Amz-Target`` (``Kinesis_20131202``, ``DynamoDB_20120810``).
            credentials: where credentials come from.
            region: the region; defaults to the credentials provider's region.
            endpoint_url: e.g. ``http://127.0.0.1:4567``; defaults to
                ``https://{service}.{region}.amazonaws.com``.
            content_type: the JSON protocol version's content type.
            options: timeouts, retries and pool size.
            sleep: awaited between retries; injectable so tests do not wait.
            rand: returns a float in [0, 1) for jitter; injectable for tests.
            clock: epoch-seconds clock for signing; injectable for tests.

        Raises:
            ConfigError: no region is configured, or the endpoint URL is not http(s)://host.
        """
        self.options = options or TransportOptions()
        self.region = region or credentials.region
        self.service = service
        self.endpoint_url = endpoint_url or f"https://{service}.{self.region}.amazonaws.com"
        parts = urlsplit(self.endpoint_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigError(
                f"invalid endpoint URL {self.endpoint_url!r}: expected http(s)://host[:port], "
                "e.g. --endpoint-url http://127.0.0.1:4567"
            )
        self._credentials = credentials
        self._target_prefix = target_prefix
        self._content_type = content_type
        self._host = canonical_host(self.endpoint_url)
        self._path = canonical_path(self.endpoint_url)
        self._signer = (
            SigV4Signer(service, self.region)
            if clock is None
            else SigV4Signer(service, self.region, clock=clock)
        )
        self._sleep = sleep
        self._rand = rand
        self._timeout = aiohttp.ClientTimeout(
            total=self.options.total_timeout, sock_connect=self.options.connect_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._http1: Http1Client | None = None
        self._buffers = _ReadBuffers()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = _State.UNOPENED

    def __repr__(self) -> str:
        return f"JsonTransport(endpoint_url={self.endpoint_url!r}, state={self._state.value})"

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran."""
        return self._state is _State.CLOSED

    def _open(self) -> None:
        if self._state is _State.CLOSED:
            raise ClosedError(f"this client for {self.endpoint_url} was closed; create a new one")
        loop = asyncio.get_running_loop()
        if self._state is _State.UNOPENED and self.options.http_client == "builtin":
            self._http1 = Http1Client(
                self.endpoint_url,
                pool_limit=self.options.pool_limit,
                keepalive_timeout=self.options.keepalive_timeout,
                connect_timeout=self.options.connect_timeout,
                user_agent=_USER_AGENT,
            )
            self._loop = loop
            self._state = _State.OPENED
        elif self._state is _State.UNOPENED:
            connector = aiohttp.TCPConnector(
                limit=self.options.pool_limit,
                keepalive_timeout=self.options.keepalive_timeout,
                ttl_dns_cache=60,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={"User-Agent": _USER_AGENT},
                # The body is read as bytes and decoded by msgspec; cookies are never used.
                cookie_jar=aiohttp.DummyCookieJar(),
                # Like botocore: no Accept header, and identity bodies (no decompression cost).
                skip_auto_headers=("Accept", "Accept-Encoding"),
                raise_for_status=False,
                # GetRecords answers reach 10 MiB; a 64 KiB high-water mark pauses and resumes
                # the socket dozens of times per answer.
                read_bufsize=1 << 20,
            )
            self._loop = loop
            self._state = _State.OPENED
        elif self._loop is not loop:
            raise ConfigError(
                "this client was first used in another event loop; create one client per event loop"
            )

    async def aclose(self) -> None:
        """Close the client and its connections. Safe to call more than once."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        session, self._session = self._session, None
        http1, self._http1 = self._http1, None
        if session is not None:
            await session.close()
        if http1 is not None:
            await http1.aclose()

    async def __aenter__(self) -> JsonTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def call(
        self,
        operation: str,
        body: bytes,
        *,
        max_attempts: int | None = None,
        attempt_timeout: float | None = None,
    ) -> bytes:
        """Send one operation and return the raw body of its 2xx answer.

        Args:
            operation: the API operation, e.g. ``GetRecords``.
            body: the JSON request body.
            max_attempts: this call's attempt budget (defaults to the options'); 1 disables retries.
            attempt_timeout: this call's per-attempt total timeout in seconds (defaults to the options').

        Returns:
            The response body bytes.

        Raises:
            AwsError: the service answered with an error (a typed subclass where known).
            EndpointUnreachable: no answer after every attempt (refused, DNS, timeout).
            ClosedError: the transport was closed.
        """
        return await self.call_decoded(
            operation, body, bytes, max_attempts=max_attempts, attempt_timeout=attempt_timeout
        )

    async def call_decoded(
        self,
        operation: str,
        body: bytes,
        decode: Callable[[memoryview], _T],
        *,
        max_attempts: int | None = None,
        attempt_timeout: float | None = None,
    ) -> _T:
        """Send one operation and return ``decode`` of its 2xx answer, read into a reused buffer.

        The answer is never copied into a ``bytes`` of its own: ``decode`` (e.g. a msgspec
        decoder's ``decode``) gets a ``memoryview`` of a buffer that the next call reuses, so it
        must copy what it keeps (msgspec does; a ``msgspec.Raw`` field would not) and must not
        keep the view. Its exceptions propagate unchanged; a failed decode is not retried.

        Args:
            operation: the API operation, e.g. ``GetRecords``.
            body: the JSON request body.
            decode: turns the answer's bytes into the result.
            max_attempts: this call's attempt budget (defaults to the options'); 1 disables retries.
            attempt_timeout: this call's per-attempt total timeout in seconds (defaults to the options').

        Returns:
            What ``decode`` returned.

        Raises:
            AwsError: the service answered with an error (a typed subclass where known).
            EndpointUnreachable: no answer after every attempt (refused, DNS, timeout).
            ClosedError: the transport was closed.
        """
        buffer, size = await self._send(operation, body, max_attempts, attempt_timeout)
        try:
            with memoryview(buffer) as whole, whole[:size] as answer:
                return decode(answer)
        finally:
            self._buffers.give(buffer)

    async def _send(
        self, operation: str, body: bytes, max_attempts: int | None, attempt_timeout: float | None
    ) -> tuple[bytearray, int]:
        """The retry loop: (a borrowed buffer, the answer's length in it) of the first 2xx."""
        self._open()
        attempts = self.options.max_attempts if max_attempts is None else max(1, max_attempts)
        target = f"{self._target_prefix}.{operation}"
        attempt = 0
        while True:
            try:
                if self._http1 is not None:
                    seconds = self.options.total_timeout if attempt_timeout is None else attempt_timeout
                    return await self._attempt_builtin(self._http1, operation, target, body, seconds)
                assert self._session is not None  # noqa: S101 - _open() made one of the two
                return await self._attempt(self._session, operation, target, body, attempt_timeout)
            except ExpiredIterator:
                raise  # retrying the same iterator cannot succeed; the caller needs a new one
            except (AwsError, _Unreachable) as exc:
                attempt += 1
                if not exc.retriable or attempt >= attempts:
                    if isinstance(exc, _Unreachable):
                        raise self._unreachable(operation, exc.reason, attempt) from exc.__cause__
                    raise
                if self._state is _State.CLOSED:
                    raise ClosedError(f"this client for {self.endpoint_url} was closed") from exc
                delay = _full_jitter(
                    attempt - 1, self.options.backoff_base, self.options.backoff_cap, self._rand
                )
                logger.debug(
                    "%s attempt %d/%d failed (%s); retrying in %.3f s",
                    operation,
                    attempt,
                    attempts,
                    exc,
                    delay,
                )
                await self._sleep(delay)

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        operation: str,
        target: str,
        body: bytes,
        attempt_timeout: float | None,
    ) -> tuple[bytearray, int]:
        client_timeout = (
            self._timeout
            if attempt_timeout is None
            else aiohttp.ClientTimeout(total=attempt_timeout, sock_connect=self.options.connect_timeout)
        )
        headers = await self._signed(target, body)
        try:
            async with session.post(
                self.endpoint_url, data=body, headers=headers, timeout=client_timeout
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    return await self._read_into_buffer(resp)
                payload = await resp.read()
                resp_headers = resp.headers
                raise error_from_response(
                    operation,
                    status,
                    payload,
                    resp_headers.get("x-amzn-RequestId") or resp_headers.get("x-amz-request-id"),
                    resp_headers.get("x-amzn-ErrorType"),
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if self._state is _State.CLOSED:
                raise ClosedError(f"this client for {self.endpoint_url} was closed") from exc
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise _Unreachable(reason) from exc

    async def _attempt_builtin(
        self, client: Http1Client, operation: str, target: str, body: bytes, seconds: float
    ) -> tuple[bytearray, int]:
        headers = await self._signed(target, body)
        buffer = self._buffers.take()
        try:
            response = await client.post(self._path, headers, body, buffer, timeout=seconds)
        except (TimeoutError, OSError, Http1Error) as exc:
            self._buffers.give(buffer)
            if self._state is _State.CLOSED:
                raise ClosedError(f"this client for {self.endpoint_url} was closed") from exc
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise _Unreachable(reason) from exc
        except BaseException:
            self._buffers.give(buffer)
            raise
        status = response.status
        if 200 <= status < 300:
            return buffer, response.size
        payload = bytes(buffer[: response.size])
        self._buffers.give(buffer)
        resp_headers = response.headers
        raise error_from_response(
            operation,
            status,
            payload,
            resp_headers.get("x-amzn-RequestId") or resp_headers.get("x-amz-request-id"),
            resp_headers.get("x-amzn-ErrorType"),
        )

    async def _signed(self, target: str, body: bytes) -> dict[str, str]:
        credentials = await self._credentials.aget()
        return self._signer.sign(
            credentials,
            host=self._host,
            target=target,
            body=body,
            content_type=self._content_type,
            path=self._path,
        )

    async def _read_into_buffer(self, resp: aiohttp.ClientResponse) -> tuple[bytearray, int]:
        """Copy the answer's chunks, as they arrive, into a borrowed buffer: (buffer, length).

        ``resp.read()`` would keep every chunk until the end and join them into a new ``bytes``.
        """
        buffer = self._buffers.take()
        size = 0
        try:
            async for chunk, _ in resp.content.iter_chunks():
                end = size + len(chunk)
                buffer[size:end] = chunk  # in place; grows the buffer when it is too short
                size = end
        except BaseException:
            self._buffers.give(buffer)
            resp.close()  # as resp.read() does: a half-read connection is not reused
            raise
        return buffer, size

    async def signed_headers(self, operation: str, body: bytes) -> dict[str, str]:
        """The signed headers of one ``operation`` request, for calls sent by another client
        (SubscribeToShard streams over :mod:`kinesis_butler.aws.streaming`)."""
        return await self._signed(f"{self._target_prefix}.{operation}", body)

    def _unreachable(self, operation: str, reason: str, attempts: int) -> EndpointUnreachable:
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        return EndpointUnreachable(
            f"{operation} could not reach {self.endpoint_url} after {tries} ({reason}); "
            "check --endpoint-url and that the service is running and reachable"
        )

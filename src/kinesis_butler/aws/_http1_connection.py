"""The connection half of the minimal HTTP/1.1 client (see :mod:`kinesis_butler.aws._http1`):
one keep-alive connection as an :class:`asyncio.BufferedProtocol` that parses an answer in its
read callbacks, receiving ``Content-Length`` bodies and chunk data straight into the caller's
``bytearray``; the typed errors; the answer's headers and status.
"""

from __future__ import annotations

import asyncio
from typing import Final, cast

__all__ = [
    "BodyTooLarge",
    "Connection",
    "Headers",
    "HeadersTooLarge",
    "Http1Error",
    "IncompleteResponse",
    "MalformedResponse",
    "Response",
    "StaleConnection",
]

_RECV_SIZE: Final = 1 << 16  # the read buffer of a connection (heads, chunk framing)
_MAX_LINE: Final = 4096  # a chunk-size or trailer line
_NO_TARGET: Final = bytearray()  # a connection's target between requests (never written)
# Parser states.
_IDLE, _HEAD, _LENGTH, _UNTIL_EOF, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS = range(8)


class Http1Error(Exception):
    """The answer broke HTTP/1.1 or a limit, or the connection closed mid-answer."""


class IncompleteResponse(Http1Error):
    """The connection closed before the whole answer arrived."""


class StaleConnection(IncompleteResponse):
    """The connection closed before the first byte of the answer."""


class MalformedResponse(Http1Error):
    """The answer is not valid HTTP/1.1 (or uses a transfer coding other than chunked)."""


class HeadersTooLarge(MalformedResponse):
    """The status line and headers exceed the client's ``max_header_size``."""


class BodyTooLarge(Http1Error):
    """The body exceeds the client's ``max_body_size``."""


class Headers:
    """Response headers; names are case-insensitive, repeated ones joined with ``, ``. Parsed
    on first access: the hot path reads only the framing headers, straight from the text."""

    __slots__ = ("_fields", "_text")

    def __init__(self, text: str) -> None:
        self._text = text  # the header lines, without the status line
        self._fields: dict[str, str] | None = None

    def _parse(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        for line in self._text.split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:  # _Connection rejected folded lines; a line without a colon is skipped
                key, value = name.lower(), value.strip()
                fields[key] = f"{fields[key]}, {value}" if key in fields else value
        self._fields = fields
        return fields

    def get(self, name: str, default: str | None = None) -> str | None:
        return (self._fields or self._parse()).get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return (self._fields or self._parse())[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in (self._fields or self._parse())

    def __repr__(self) -> str:
        return f"Headers({self._fields or self._parse()!r})"


class Response:
    """An answer whose body is the first ``size`` bytes of the buffer the request was given."""

    __slots__ = ("headers", "reason", "size", "status")

    def __init__(self, status: int, reason: str, headers: Headers, size: int) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.size = size


def _field(lower: str, name: str) -> str | None:
    """The value of header ``name`` in ``lower`` (CRLF + the lowercased header lines)."""
    at = lower.find(f"\r\n{name}:")
    if at < 0:
        return None
    start = at + len(name) + 3
    end = lower.find("\r\n", start)
    value = lower[start:] if end < 0 else lower[start:end]
    if end >= 0 and lower.find(f"\r\n{name}:", end) >= 0:
        raise MalformedResponse(f"repeated {name} header")
    return value.strip()


class Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_header: int, max_body: int) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False  # set once it cannot serve another request
        self.idle_since = 0.0
        self._max_header = max_header
        self._max_body = max_body
        self._recv = bytearray(_RECV_SIZE)
        self._pos = 0  # parsed up to here in _recv
        self._end = 0  # received up to here in _recv
        self._state = _IDLE
        self._direct = False  # the last get_buffer() was a view of the target, not of _recv
        self._target = _NO_TARGET
        self._filled = 0  # body bytes in the target
        self._remaining = 0  # of the body (or of the current chunk)
        self._got_bytes = False
        self._waiter: asyncio.Future[Response] | None = None
        self._status = 0
        self._reason = ""
        self._headers = Headers("")
        self._keep_alive = False

    # -- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._closed_by_peer(exc)

    def eof_received(self) -> bool:
        self.closed = True
        self._closed_by_peer(None)
        return False  # close the transport

    def get_buffer(self, sizehint: int) -> memoryview:
        # Buffers are resized only here: during buffer_updated() the view is still exported.
        if self._state == _LENGTH or (self._state == _CHUNK_DATA and self._pos == self._end):
            self._direct = True
            start = self._filled
            return memoryview(self._target)[start : start + self._remaining]
        self._direct = False
        recv = self._recv
        if self._end == len(recv):
            if self._pos:  # move the unparsed tail to the front
                tail = self._end - self._pos
                recv[:tail] = recv[self._pos : self._end]
                self._pos, self._end = 0, tail
            else:  # a head longer than the buffer; buffer_updated() enforces max_header
                recv.extend(bytes(len(recv)))
        return memoryview(recv)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._got_bytes = True
        if self._direct:
            self._filled += nbytes
            self._remaining -= nbytes
            if not self._remaining:
                if self._state == _LENGTH:
                    self._finish()
                else:
                    self._state = _CHUNK_END
            return
        self._end += nbytes
        try:
            self._parse()
        except Http1Error as exc:
            self.fail(exc)

    # -- parsing -------------------------------------------------------------------------------

    def _parse(self) -> None:  # noqa: PLR0912 - one branch per state reads best
        recv = self._recv
        while self._pos < self._end:
            pos, end, state = self._pos, self._end, self._state
            if state == _HEAD:
                at = recv.find(b"\r\n\r\n", pos, end)
                if at < 0 or at - pos > self._max_header:
                    if end - pos > self._max_header:
                        raise HeadersTooLarge(f"the answer's headers exceed {self._max_header} bytes")
                    return
                self._pos = at + 4
                self._head(recv[pos:at].decode("latin-1"))
            elif state in (_LENGTH, _CHUNK_DATA, _UNTIL_EOF):
                take = end - pos if state == _UNTIL_EOF else min(self._remaining, end - pos)
                if self._filled + take > self._max_body:
                    raise BodyTooLarge(f"the answer's body exceeds {self._max_body} bytes")
                self._target[self._filled : self._filled + take] = memoryview(recv)[pos : pos + take]
                self._filled += take
                self._pos += take
                if state != _UNTIL_EOF:
                    self._remaining -= take
                    if not self._remaining:
                        if state == _LENGTH:
                            self._finish()
                        else:
                            self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if end - pos < 2:
                    return
                if recv[pos : pos + 2] != b"\r\n":
                    raise MalformedResponse("a chunk does not end with CRLF")
                self._pos += 2
                self._state = _CHUNK_SIZE
            elif state in (_CHUNK_SIZE, _TRAILERS):
                at = recv.find(b"\r\n", pos, end)
                if at < 0:
                    if end - pos > _MAX_LINE:
                        raise MalformedResponse("a chunk-size or trailer line is too long")
                    return
                self._pos = at + 2
                if state == _CHUNK_SIZE:
                    self._chunk(bytes(recv[pos:at]))
                elif at == pos:  # the empty line after the trailers
                    self._finish()
            else:
                raise MalformedResponse("the server sent bytes that answer no request")
        self._pos = self._end = 0

    def _head(self, head: str) -> None:
        status_line, _, text = head.partition("\r\n")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise MalformedResponse(f"bad status line {status_line[:100]!r}")
        if "\r\n " in head or "\r\n\t" in head or head.startswith((" ", "\t")):
            raise MalformedResponse("folded header lines are not allowed")
        status = int(code)
        if status < 200:
            if status == 101:
                raise MalformedResponse("the server switched protocols")
            return  # an interim answer (100 Continue): the real one follows
        self._status, self._reason, self._headers = status, reason, Headers(text)
        lower = "\r\n" + text.lower()
        connection = _field(lower, "connection") or ""
        self._keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        self._frame(status, lower)

    def _frame(self, status: int, lower: str) -> None:
        """Set up reading the body as the headers describe it."""
        coding = _field(lower, "transfer-encoding")
        length = _field(lower, "content-length")
        if coding is not None:
            if coding != "chunked":
                raise MalformedResponse(f"unsupported Transfer-Encoding {coding!r}")
            self._state = _CHUNK_SIZE
        elif length is not None:
            if not length.isdigit() or not length.isascii():
                raise MalformedResponse(f"bad Content-Length {length[:40]!r}")
            size = int(length)
            if size > self._max_body:
                raise BodyTooLarge(f"the answer's body of {size} bytes exceeds {self._max_body} bytes")
            if len(self._target) < size:
                self._target.extend(bytes(size - len(self._target)))
            self._remaining = size
            self._state = _LENGTH
            if not size:
                self._finish()
        elif status in (204, 304):
            self._finish()
        else:
            self._keep_alive = False
            self._state = _UNTIL_EOF

    def _chunk(self, line: bytes) -> None:
        digits = line.split(b";", 1)[0].strip()
        try:
            size = int(digits, 16)
        except ValueError:
            raise MalformedResponse(f"bad chunk size {line[:40]!r}") from None
        if size < 0 or digits[:1] in (b"-", b"+"):
            raise MalformedResponse(f"bad chunk size {line[:40]!r}")
        if not size:
            self._state = _TRAILERS
            return
        if self._filled + size > self._max_body:
            raise BodyTooLarge(f"the answer's body exceeds {self._max_body} bytes")
        if len(self._target) < self._filled + size:  # so get_buffer() can receive into it
            self._target.extend(bytes(self._filled + size - len(self._target)))
        self._remaining = size
        self._state = _CHUNK_DATA

    def _finish(self) -> None:
        self._state = _IDLE
        if not self._keep_alive:
            self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self._status, self._reason, self._headers, self._filled))

    def _closed_by_peer(self, exc: Exception | None) -> None:
        if self._state == _UNTIL_EOF:
            self._finish()
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        error: IncompleteResponse
        if not self._got_bytes:
            error = StaleConnection("the server closed the connection without answering")
        else:
            error = IncompleteResponse(f"the server closed the connection mid-answer ({self._filled} bytes)")
        error.__cause__ = exc
        waiter.set_exception(error)

    # -- requests ------------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        """Fail the request in flight, if any, and drop the connection."""
        self.closed = True
        self._state = _IDLE
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def start(self, request: bytes, target: bytearray) -> asyncio.Future[Response]:
        """Send ``request``; the future gets the answer, its body received into ``target``."""
        waiter: asyncio.Future[Response] = self.loop.create_future()
        self._waiter = waiter
        self._target, self._filled, self._remaining = target, 0, 0
        self._got_bytes = False
        self._state = _HEAD
        cast(asyncio.Transport, self.transport).write(request)  # set by connection_made
        return waiter

    def done(self) -> None:
        self._waiter = None
        self._target = _NO_TARGET

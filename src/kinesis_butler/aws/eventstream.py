"""The AWS event-stream binary framing (``application/vnd.amazon.eventstream``).

SubscribeToShard answers with a stream of messages, each framed as::

    prelude   total length u32 | headers length u32 | CRC32 of those 8 bytes
    headers   repeated: name length u8 | name | type u8 | value
    payload   total - headers - 16 bytes
    CRC32     of everything before it

Header value types: 0 true, 1 false, 2 byte, 3 short, 4 int, 5 long (all signed, big-endian),
6 bytes and 7 string (u16 length first), 8 timestamp (i64 milliseconds), 9 UUID (16 bytes).

:class:`EventStreamDecoder` is incremental: feed it bytes as they arrive, split anywhere, and it
returns the complete messages. Anything malformed (a bad CRC, an absurd length, an unknown header
type, bytes left over at the end) raises :class:`~kinesis_butler.errors.EventStreamError` and
nothing else; after an error the decoder refuses further input. :func:`encode_message` is the
inverse (tests and the fake fan-out server use it).
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Final

from kinesis_butler.errors import EventStreamError

__all__ = [
    "MAX_HEADERS_LENGTH",
    "MAX_MESSAGE_LENGTH",
    "EventStreamDecoder",
    "HeaderValue",
    "Message",
    "decode_message",
    "encode_message",
]

#: The largest message accepted (the event-stream specification's limit): 16 MiB.
MAX_MESSAGE_LENGTH: Final = 16 * 1024 * 1024
#: The largest headers section accepted: 128 KiB.
MAX_HEADERS_LENGTH: Final = 128 * 1024

_PRELUDE: Final = struct.Struct(">III")  # total length, headers length, prelude CRC
_PRELUDE_LENGTH: Final = 12
_OVERHEAD: Final = 16  # prelude plus the trailing message CRC
_CRC: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")
_INTS: Final = {
    2: struct.Struct(">b"),
    3: struct.Struct(">h"),
    4: struct.Struct(">i"),
    5: struct.Struct(">q"),
}
_I32: Final = _INTS[4]
_I64: Final = _INTS[5]
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND: Final = timedelta(milliseconds=1)
_CODE = "MalformedEventStream"

#: A header value: booleans, integers (byte/short/int/long on the wire), bytes, strings,
#: timestamps (millisecond precision, UTC) and UUIDs.
HeaderValue = bool | int | bytes | str | datetime | uuid.UUID


def _error(message: str) -> EventStreamError:
    return EventStreamError(message, code=_CODE)


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One event-stream message.

    Attributes:
        headers: header names to values, in wire order.
        payload: the payload bytes (JSON for Kinesis events and exceptions).
    """

    headers: Mapping[str, HeaderValue]
    payload: bytes = b""

    def _str_header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return value if isinstance(value, str) else None

    @property
    def message_type(self) -> str | None:
        """``:message-type``: ``event``, ``exception`` or ``error``."""
        return self._str_header(":message-type")

    @property
    def event_type(self) -> str | None:
        """``:event-type`` of an event (``SubscribeToShardEvent``, ``initial-response``)."""
        return self._str_header(":event-type")

    @property
    def exception_type(self) -> str | None:
        """``:exception-type`` of a modeled exception (``ResourceInUseException``)."""
        return self._str_header(":exception-type")


# -- encoding ---------------------------------------------------------------------------------


def _encode_value(value: HeaderValue) -> bytes:
    if isinstance(value, bool):  # before int: bool is an int
        return b"\x00" if value else b"\x01"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"\x04" + _I32.pack(value)
        if -(2**63) <= value < 2**63:
            return b"\x05" + _I64.pack(value)
        raise _error(f"header integer {value} does not fit in 64 bits")
    if isinstance(value, bytes | str):
        raw = value if isinstance(value, bytes) else value.encode()
        if len(raw) > 0xFFFF:
            raise _error(f"header value of {len(raw)} bytes is longer than 65535")
        return (b"\x06" if isinstance(value, bytes) else b"\x07") + _U16.pack(len(raw)) + raw
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return b"\x08" + _I64.pack((moment - _EPOCH) // _MILLISECOND)
    if isinstance(value, uuid.UUID):
        return b"\x09" + value.bytes
    raise _error(f"unsupported header value type {type(value).__name__}")


def encode_message(headers: Mapping[str, HeaderValue], payload: bytes = b"") -> bytes:
    """Frame one message.

    Args:
        headers: names (1-255 UTF-8 bytes) to values; ``int`` is sent as int32 when it fits,
            else int64; naive datetimes are taken as UTC.
        payload: the payload.

    Returns:
        The framed message, CRCs included.

    Raises:
        EventStreamError: a name or value does not fit the format, or the message is too large.
    """
    parts: list[bytes] = []
    for name, value in headers.items():
        raw_name = name.encode()
        if not 1 <= len(raw_name) <= 255:
            raise _error(f"header name {name!r} must be 1-255 bytes")
        parts += (bytes((len(raw_name),)), raw_name, _encode_value(value))
    encoded_headers = b"".join(parts)
    total = _OVERHEAD + len(encoded_headers) + len(payload)
    if len(encoded_headers) > MAX_HEADERS_LENGTH or total > MAX_MESSAGE_LENGTH:
        raise _error(f"message of {total} bytes ({len(encoded_headers)} of headers) is too large")
    prelude = struct.pack(">II", total, len(encoded_headers))
    head = prelude + _CRC.pack(zlib.crc32(prelude))
    body = head + encoded_headers + payload
    return body + _CRC.pack(zlib.crc32(body))


# -- decoding ---------------------------------------------------------------------------------


def _decode_value(raw: memoryview, kind: int, pos: int) -> tuple[HeaderValue, int]:
    """The value of header type ``kind`` starting at ``pos``, and the position after it."""
    if kind <= 1:
        return kind == 0, pos
    fmt = _INTS.get(kind)
    if fmt is not None:
        return fmt.unpack_from(raw, pos)[0], pos + fmt.size
    if kind in (6, 7):
        (length,) = _U16.unpack_from(raw, pos)
        end = pos + 2 + length
        if end > len(raw):
            raise _error("a header value runs past the headers section")
        data = bytes(raw[pos + 2 : end])
        return (data if kind == 6 else data.decode()), end
    if kind == 8:
        (millis,) = _I64.unpack_from(raw, pos)
        return _EPOCH + timedelta(milliseconds=millis), pos + 8
    if kind == 9:
        if pos + 16 > len(raw):
            raise _error("a UUID header runs past the headers section")
        return uuid.UUID(bytes=bytes(raw[pos : pos + 16])), pos + 16
    raise _error(f"unknown header value type {kind}")


def _decode_headers(raw: memoryview) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {}
    pos, end = 0, len(raw)
    try:
        while pos < end:
            name_length = raw[pos]
            name = bytes(raw[pos + 1 : pos + 1 + name_length]).decode()
            pos += 1 + name_length
            if not name_length or pos >= end:
                raise _error("a header name is empty or runs past the headers section")
            value, pos = _decode_value(raw, raw[pos], pos + 1)
            headers[name] = value
    except (IndexError, struct.error) as exc:
        raise _error("a header runs past the headers section") from exc
    except UnicodeDecodeError as exc:
        raise _error(f"a header name or string is not UTF-8: {exc}") from exc
    except OverflowError as exc:
        raise _error(f"a timestamp header is out of range: {exc}") from exc
    return headers


class EventStreamDecoder:
    """Turns a byte stream split anywhere into :class:`Message` values.

    Example:
        >>> decoder = EventStreamDecoder()
        >>> for chunk in chunks:
        ...     for message in decoder.feed(chunk):
        ...         handle(message)
        >>> decoder.close()  # raises if the stream stopped mid-message
    """

    __slots__ = ("_buffer", "_failed", "max_message_length")

    def __init__(self, *, max_message_length: int = MAX_MESSAGE_LENGTH) -> None:
        """Create a decoder.

        Args:
            max_message_length: reject messages announcing a larger total length.
        """
        self._buffer = bytearray()
        self._failed = False
        self.max_message_length = max_message_length

    @property
    def buffered(self) -> int:
        """Bytes received that do not form a complete message yet."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add bytes; return every message they complete, in order (often none).

        Raises:
            EventStreamError: the stream is malformed; the decoder is unusable afterwards.
        """
        if self._failed:
            raise _error("the event stream already failed to decode")
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        pos = 0
        try:
            while len(buffer) - pos >= _PRELUDE_LENGTH:
                total, headers_length, prelude_crc = _PRELUDE.unpack_from(buffer, pos)
                view = memoryview(buffer)
                try:
                    if zlib.crc32(view[pos : pos + 8]) != prelude_crc:
                        raise _error("prelude CRC mismatch")
                    if not _OVERHEAD <= total <= self.max_message_length:
                        raise _error(f"message length {total} is outside 16..{self.max_message_length}")
                    if headers_length > MAX_HEADERS_LENGTH or headers_length > total - _OVERHEAD:
                        raise _error(f"headers length {headers_length} does not fit message length {total}")
                    if len(buffer) - pos < total:
                        break
                    end = pos + total
                    (message_crc,) = _CRC.unpack_from(buffer, end - 4)
                    if zlib.crc32(view[pos : end - 4]) != message_crc:
                        raise _error("message CRC mismatch")
                    headers_end = pos + _PRELUDE_LENGTH + headers_length
                    headers = _decode_headers(view[pos + _PRELUDE_LENGTH : headers_end])
                    messages.append(Message(headers, bytes(view[headers_end : end - 4])))
                    pos = end
                finally:
                    view.release()
        except EventStreamError:
            # A new buffer, not clear(): the traceback may still hold a view of the old one.
            self._failed = True
            self._buffer = bytearray()
            raise
        del buffer[:pos]
        return messages

    def close(self) -> None:
        """Declare the stream finished.

        Raises:
            EventStreamError: bytes of an incomplete message are left over (a truncated stream).
        """
        if self._buffer and not self._failed:
            left = len(self._buffer)
            self._failed = True
            self._buffer = bytearray()
            raise _error(f"the event stream ended inside a message ({left} bytes left over)")


def decode_message(data: bytes) -> Message:
    """Decode exactly one framed message.

    Raises:
        EventStreamError: ``data`` is not exactly one well-formed message.
    """
    decoder = EventStreamDecoder()
    messages = decoder.feed(data)
    decoder.close()
    if len(messages) != 1:
        raise _error(f"expected one message, found {len(messages)}")
    return messages[0]

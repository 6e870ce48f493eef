"""The event-stream codec: round trips, splits at every byte, corruption, limits; checked against
botocore's independent parser."""

from __future__ import annotations

import itertools
import struct
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import botocore.eventstream
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kinesis_butler.aws.eventstream import (
    MAX_HEADERS_LENGTH,
    MAX_MESSAGE_LENGTH,
    EventStreamDecoder,
    HeaderValue,
    Message,
    decode_message,
    encode_message,
)
from kinesis_butler.errors import AwsError, EventStreamError
from tests.fuzz import run_harness

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]

names = st.text(min_size=1, max_size=40).filter(lambda n: len(n.encode()) <= 255)
values: st.SearchStrategy[HeaderValue] = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=300),
    st.text(max_size=300),
    st.integers(min_value=-(10**13), max_value=10**14).map(lambda ms: EPOCH + timedelta(milliseconds=ms)),
    st.uuids(),
)
messages = st.builds(Message, st.dictionaries(names, values, max_size=8), st.binary(max_size=2000))


def prelude(total: int, headers_length: int) -> bytes:
    head = struct.pack(">II", total, headers_length)
    return head + struct.pack(">I", zlib.crc32(head))


def feed_all(pieces: list[bytes]) -> list[Message]:
    decoder = EventStreamDecoder()
    out: list[Message] = []
    for piece in pieces:
        out += decoder.feed(piece)
    decoder.close()
    return out


# -- round trips --------------------------------------------------------------------------------


@given(messages)
def test_a_message_round_trips(message: Message) -> None:
    assert decode_message(encode_message(message.headers, message.payload)) == message


@given(st.lists(messages, max_size=5), st.lists(st.integers(min_value=0, max_value=20_000), max_size=20))
def test_a_stream_split_anywhere_decodes_to_the_same_messages(batch: list[Message], cuts: list[int]) -> None:
    wire = b"".join(encode_message(m.headers, m.payload) for m in batch)
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    pieces = [wire[a:b] for a, b in itertools.pairwise(points)]
    assert feed_all(pieces) == batch


def test_byte_by_byte_feeding_yields_each_message_when_its_last_byte_arrives() -> None:
    first, second = encode_message({"n": 1}, b"one"), encode_message({"n": 2}, b"two")
    decoder = EventStreamDecoder()
    seen = [len(decoder.feed(bytes([b]))) for b in first + second]
    assert seen.count(1) == 2
    assert seen[len(first) - 1] == 1 and seen[-1] == 1
    assert decoder.buffered == 0


@given(messages)
@settings(max_examples=200)
def test_botocore_reads_what_we_write(message: Message) -> None:
    buffer = botocore.eventstream.EventStreamBuffer()
    buffer.add_data(encode_message(message.headers, message.payload))
    (parsed,) = list(buffer)
    assert parsed.payload == message.payload
    expected: dict[str, object] = {}
    for name, value in message.headers.items():
        if isinstance(value, datetime):
            expected[name] = (value - EPOCH) // timedelta(milliseconds=1)
        elif isinstance(value, uuid.UUID):
            expected[name] = value.bytes
        else:
            expected[name] = value
    assert parsed.headers == expected


def test_every_wire_type_decodes_including_byte_and_short() -> None:
    # Our encoder never writes types 2 (byte) and 3 (short); AWS may.
    raw_headers = (
        b"\x01b\x02\xff"  # byte -1
        b"\x01s\x03\x80\x00"  # short -32768
        b"\x01i\x04\x00\x00\x00\x07"
        b"\x01l\x05" + struct.pack(">q", -(2**40)) + b"\x01t\x00\x01f\x01"
        b"\x01y\x06\x00\x02hi"
        b"\x01z\x07\x00\x03\xc3\xa9!"
        b"\x01d\x08" + struct.pack(">q", 1_600_000_000_123) + b"\x01u\x09" + bytes(range(16))
    )
    body = prelude(16 + len(raw_headers) + 3, len(raw_headers)) + raw_headers + b"abc"
    message = decode_message(body + struct.pack(">I", zlib.crc32(body)))
    assert message.headers == {
        "b": -1,
        "s": -32768,
        "i": 7,
        "l": -(2**40),
        "t": True,
        "f": False,
        "y": b"hi",
        "z": "é!",
        "d": datetime(2020, 9, 13, 12, 26, 40, 123000, tzinfo=UTC),
        "u": uuid.UUID(bytes=bytes(range(16))),
    }
    assert message.payload == b"abc"


def test_the_kinesis_header_accessors() -> None:
    event = Message({":message-type": "event", ":event-type": "SubscribeToShardEvent"})
    assert (event.message_type, event.event_type, event.exception_type) == (
        "event",
        "SubscribeToShardEvent",
        None,
    )
    assert Message({":message-type": 3}).message_type is None  # not a string


def test_an_empty_message_is_sixteen_bytes() -> None:
    assert len(encode_message({})) == 16
    assert decode_message(encode_message({})) == Message({}, b"")


# -- malformed input ------------------------------------------------------------------------------


@given(st.binary(max_size=3000), st.lists(st.integers(min_value=1, max_value=64), max_size=30))
@settings(max_examples=500)
def test_garbage_raises_only_event_stream_error(data: bytes, sizes: list[int]) -> None:
    decoder = EventStreamDecoder()
    pos, error = 0, None
    try:
        for size in [*sizes, len(data)]:
            decoder.feed(data[pos : pos + size])
            pos += size
        decoder.close()
    except EventStreamError as exc:
        error = exc
    if error is not None:
        assert error.code == "MalformedEventStream"


@given(messages, st.data())
def test_any_single_corrupted_byte_is_detected(message: Message, data: st.DataObject) -> None:
    wire = bytearray(encode_message(message.headers, message.payload))
    index = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    wire[index] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(EventStreamError):
        feed_all([bytes(wire)])


def test_every_truncation_is_an_error_at_close() -> None:
    wire = encode_message({":message-type": "event"}, b"payload")
    for end in range(1, len(wire)):
        decoder = EventStreamDecoder()
        assert decoder.feed(wire[:end]) == []
        with pytest.raises(EventStreamError, match="ended inside a message"):
            decoder.close()


@pytest.mark.parametrize(
    ("total", "headers_length", "match"),
    [
        (15, 0, "outside"),
        (MAX_MESSAGE_LENGTH + 1, 0, "outside"),
        (2**32 - 1, 0, "outside"),
        (MAX_HEADERS_LENGTH + 100, MAX_HEADERS_LENGTH + 1, "headers length"),
        (100, 85, "headers length"),
    ],
)
def test_absurd_lengths_are_refused_from_the_prelude_alone(
    total: int, headers_length: int, match: str
) -> None:
    decoder = EventStreamDecoder()
    with pytest.raises(EventStreamError, match=match):
        decoder.feed(prelude(total, headers_length))


def test_a_smaller_cap_can_be_configured() -> None:
    decoder = EventStreamDecoder(max_message_length=1024)
    with pytest.raises(EventStreamError):
        decoder.feed(encode_message({}, b"x" * 2000))


@pytest.mark.parametrize(
    ("raw_headers", "match"),
    [
        (b"\x01a\x0a", "unknown header value type 10"),
        (b"\x00\x00", "empty"),
        (b"\x02\xff\xfe\x00", "UTF-8"),
        (b"\x01a\x07\x00\x05ab", "runs past"),
        (b"\x01a\x04\x00\x00", "runs past"),
        (b"\x01a\x09" + b"\x00" * 8, "runs past"),
        (b"\x01a\x08" + struct.pack(">q", 2**62), "out of range"),
        (b"\x05abc", "runs past"),
    ],
)
def test_malformed_headers_are_refused(raw_headers: bytes, match: str) -> None:
    body = prelude(16 + len(raw_headers), len(raw_headers)) + raw_headers
    with pytest.raises(EventStreamError, match=match):
        decode_message(body + struct.pack(">I", zlib.crc32(body)))


def test_a_failed_decoder_refuses_more_input() -> None:
    decoder = EventStreamDecoder()
    with pytest.raises(EventStreamError):
        decoder.feed(b"\x00" * 12)
    with pytest.raises(EventStreamError, match="already failed"):
        decoder.feed(encode_message({}))
    decoder.close()  # no second error: the failure was reported already


def test_decode_message_wants_exactly_one() -> None:
    with pytest.raises(EventStreamError, match="found 2"):
        decode_message(encode_message({}) * 2)
    with pytest.raises(EventStreamError, match="found 0"):
        decode_message(b"")


def test_event_stream_error_is_a_retriable_aws_error() -> None:
    assert issubclass(EventStreamError, AwsError)
    assert EventStreamError.retriable


# -- the encoder's limits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "payload", "match"),
    [
        ({"": "x"}, b"", "1-255 bytes"),
        ({"n" * 256: "x"}, b"", "1-255 bytes"),
        ({"a": "x" * 65536}, b"", "longer than 65535"),
        ({"a": 2**63}, b"", "64 bits"),
        ({"a": 1.5}, b"", "unsupported"),
        ({}, b"x" * MAX_MESSAGE_LENGTH, "too large"),
        ({f"h{i}": "x" * 60000 for i in range(3)}, b"", "too large"),
    ],
)
def test_the_encoder_refuses_what_the_format_cannot_carry(
    headers: dict[str, HeaderValue], payload: bytes, match: str
) -> None:
    with pytest.raises(EventStreamError, match=match):
        encode_message(headers, payload)


def test_naive_datetimes_are_taken_as_utc() -> None:
    naive = datetime(2024, 5, 1, 12, 0, 0, 5000)
    decoded = decode_message(encode_message({"t": naive})).headers["t"]
    assert decoded == naive.replace(tzinfo=UTC)


def test_int32_and_int64_are_chosen_by_size() -> None:
    assert encode_message({"a": 2**31 - 1})[12 + 2] == 4
    assert encode_message({"a": 2**31})[12 + 2] == 5


def test_atheris_harness_runs_clean(tmp_path: Path) -> None:
    run_harness("fuzz_eventstream.py", tmp_path)

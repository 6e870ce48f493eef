"""Coverage-guided fuzzing of the event-stream decoder and the SubscribeToShard event layer with atheris.

Each input is used in one of four shapes chosen by its first byte:

0. raw bytes, fed to :class:`EventStreamDecoder` in fuzzed chunk sizes;
1. fuzzed messages, encoded, maybe with one byte flipped, fed in fuzzed chunks;
2. a frame with correct CRCs around a fuzzed headers section and payload (random bytes almost never
   pass the CRCs, so this is what reaches the header parser);
3. a frame with correct CRCs, a ``:message-type`` / ``:event-type`` / ``:exception-type`` drawn
   from the real ones and a fuzzed JSON-ish payload, read through :class:`ShardSubscription`.

Checked on every run: nothing raises but ``EventStreamError`` (shapes 0-2) or an ``AwsError``
subclass (shape 3); intact messages decode to what was encoded, chunking never matters, a flipped
byte is always detected; whatever we accept, botocore's independent parser reads the same headers
and payload (it may reject more: duplicate names), and it re-encodes to an equal message.

Run: ``python tests/fuzz/fuzz_eventstream.py -max_total_time=120`` (any libFuzzer flags; add a
corpus directory to keep what it finds).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
import uuid
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import atheris
import botocore.eventstream

with atheris.instrument_imports(
    include=["kinesis_butler.aws.eventstream", "kinesis_butler.aws.kinesis_fanout"]
):
    from kinesis_butler.aws.eventstream import EventStreamDecoder, HeaderValue, Message, encode_message
    from kinesis_butler.aws.kinesis_fanout import ShardSubscription
    from kinesis_butler.aws.streaming import StreamingResponse
    from kinesis_butler.errors import AwsError, EventStreamError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MESSAGE_TYPES = ["event", "exception", "error", "other"]
EVENT_TYPES = ["SubscribeToShardEvent", "initial-response", "Unknown"]
EXCEPTION_TYPES = ["ResourceInUseException", "InternalFailureException", "KMSThrottlingException", "X"]
LOOP = asyncio.new_event_loop()


def feed(decoder: EventStreamDecoder, data: bytes, fdp: atheris.FuzzedDataProvider) -> list[Message]:
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        size = fdp.ConsumeIntInRange(1, 64) if fdp.remaining_bytes() else len(data)
        out += decoder.feed(data[pos : pos + size])
        pos += size
    decoder.close()
    return out


def crc_framed(headers: bytes, payload: bytes) -> bytes:
    prelude = struct.pack(">II", 16 + len(headers) + len(payload), len(headers))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def fuzzed_value(fdp: atheris.FuzzedDataProvider) -> HeaderValue:
    kind = fdp.ConsumeIntInRange(0, 5)
    if kind == 0:
        return fdp.ConsumeBool()
    if kind == 1:
        return fdp.ConsumeIntInRange(-(2**63), 2**63 - 1)
    if kind == 2:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 50))
    if kind == 3:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 50))
    if kind == 4:
        return EPOCH + timedelta(milliseconds=fdp.ConsumeIntInRange(-(10**13), 10**14))
    return uuid.UUID(bytes=fdp.ConsumeBytes(16).ljust(16, b"\0"))


def botocore_view(value: HeaderValue) -> object:
    if isinstance(value, datetime):
        return (value - EPOCH) // timedelta(milliseconds=1)
    if isinstance(value, uuid.UUID):
        return value.bytes
    return value


def check_accepted(data: bytes, messages: list[Message]) -> None:
    """What we accepted, botocore reads alike (unless it rejects it), and it re-encodes equal."""
    buffer = botocore.eventstream.EventStreamBuffer()
    buffer.add_data(data)
    try:
        theirs = list(buffer)
    except botocore.eventstream.ParserError:
        theirs = None  # botocore is stricter on duplicate names; that is all
    if theirs is not None:
        assert [(m.headers, m.payload) for m in theirs] == [
            ({k: botocore_view(v) for k, v in m.headers.items()}, m.payload) for m in messages
        ]
    for message in messages:
        again = EventStreamDecoder().feed(encode_message(message.headers, message.payload))
        assert again == [message]


def shape_raw(fdp: atheris.FuzzedDataProvider) -> None:
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    with contextlib.suppress(EventStreamError):
        check_accepted(data, feed(EventStreamDecoder(), data, fdp))


def shape_messages(fdp: atheris.FuzzedDataProvider) -> None:
    originals = []
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        headers = {
            fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(1, 20)) or "h": fuzzed_value(fdp)
            for _ in range(fdp.ConsumeIntInRange(0, 5))
        }
        headers = {k: v for k, v in headers.items() if 1 <= len(k.encode()) <= 255}
        originals.append(Message(headers, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))))
    wire = bytearray(b"".join(encode_message(m.headers, m.payload) for m in originals))
    flip = fdp.ConsumeBool()
    if flip:
        wire[fdp.ConsumeIntInRange(0, len(wire) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
    try:
        decoded = feed(EventStreamDecoder(), bytes(wire), fdp)
    except EventStreamError:
        assert flip, "an intact stream was refused"
        return
    assert not flip, "a flipped byte went unnoticed"
    assert decoded == originals
    check_accepted(bytes(wire), decoded)


def shape_framed(fdp: atheris.FuzzedDataProvider) -> None:
    headers = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
    data = crc_framed(headers, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100)))
    with contextlib.suppress(EventStreamError):
        check_accepted(data, feed(EventStreamDecoder(), data, fdp))


class Scripted(StreamingResponse):
    protocol = "fuzz"

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__()
        self.status = 200
        self._chunks = chunks

    async def read_chunk(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


async def read_subscription(chunks: list[bytes]) -> None:
    @contextlib.asynccontextmanager
    async def opener() -> AsyncIterator[StreamingResponse]:
        yield Scripted(chunks)

    async with ShardSubscription(opener, consumer_arn="arn", shard_id="shardId-000000000000") as subscription:
        async for event in subscription:
            assert isinstance(event.records, list)
            assert event.continuation_sequence_number is None or isinstance(
                event.continuation_sequence_number, str
            )


def shape_subscription(fdp: atheris.FuzzedDataProvider) -> None:
    frames = []
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        headers = {
            ":message-type": fdp.PickValueInList(MESSAGE_TYPES),
            ":event-type": fdp.PickValueInList(EVENT_TYPES),
            ":exception-type": fdp.PickValueInList(EXCEPTION_TYPES),
        }
        if fdp.ConsumeBool():
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        else:  # JSON-shaped, to get past the first byte of msgspec's parser
            record = b'{"Data":"' + fdp.ConsumeBytes(8) + b'","PartitionKey":"k","SequenceNumber":"1"}'
            payload = (
                b'{"Records":[' + record + b'],"ContinuationSequenceNumber":' + fdp.ConsumeBytes(6) + b"}"
            )
        frames.append(encode_message(headers, payload))
    wire = b"".join(frames)
    cut = fdp.ConsumeIntInRange(0, len(wire))
    # Typed errors (EventStreamError, or a mapped exception frame) are exactly what is allowed.
    with contextlib.suppress(AwsError):
        LOOP.run_until_complete(read_subscription([wire[:cut], wire[cut:]]))


def test_one_input(raw: bytes) -> None:
    if not raw:
        return
    fdp = atheris.FuzzedDataProvider(raw[1:])
    (shape_raw, shape_messages, shape_framed, shape_subscription)[raw[0] % 4](fdp)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

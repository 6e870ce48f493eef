"""The Kinesis JSON shapes: msgspec Structs for the requests and answers the client uses.

Field names are snake_case and renamed to the wire's PascalCase; timestamps stay floats and
``Data`` is decoded straight to bytes (msgspec does the base64), which is what makes GetRecords
cheap. ``Record`` itself lives in :mod:`kinesis_butler.models`.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from kinesis_butler.errors import AwsError
from kinesis_butler.models import Record, Shard

__all__ = [
    "ChildShard",
    "GetRecordsResult",
    "HashKeyRange",
    "PutRecordResult",
    "PutRecordsEntry",
    "PutRecordsResult",
    "PutRecordsResultEntry",
    "ShardFilter",
    "StreamConsumer",
    "StreamSummary",
    "SubscribeToShardEvent",
    "decode_response",
]

_T = TypeVar("_T")


def decode_response(decoder: msgspec.json.Decoder[_T], raw: bytes, operation: str) -> _T:
    """Decode a 2xx body; a body we cannot read (a proxy, a truncated answer) raises ``AwsError``."""
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise AwsError(
            f"malformed {operation} response: {exc}", operation=operation, code="MalformedResponse"
        ) from exc


def _wire_name(name: str) -> str:
    # Kinesis names are PascalCase with "ARN" in capitals: stream_arn -> StreamARN.
    return "".join("ARN" if part == "arn" else part.capitalize() for part in name.split("_"))


class _Wire(msgspec.Struct, rename=_wire_name, omit_defaults=True):
    """Base of every shape: wire names, and unset optional fields left out of requests."""


class _FrozenWire(msgspec.Struct, rename=_wire_name, omit_defaults=True, frozen=True):
    """Base of the immutable public shapes."""


# ---------------------------------------------------------------------------------------------
# Public shapes
# ---------------------------------------------------------------------------------------------


class HashKeyRange(_FrozenWire, frozen=True):
    """A shard's hash key range, as the decimal strings Kinesis sends.

    Attributes:
        starting_hash_key: the lowest hash key of the shard (inclusive).
        ending_hash_key: the highest hash key of the shard (inclusive).
    """

    starting_hash_key: str
    ending_hash_key: str


class ChildShard(_FrozenWire, frozen=True):
    """A shard that replaced the one just read to its end (from GetRecords at shard end).

    Attributes:
        shard_id: the child's id.
        parent_shards: its parents: one after a split, two after a merge.
        hash_key_range: its hash key range.
    """

    shard_id: str
    parent_shards: list[str]
    hash_key_range: HashKeyRange

    def to_shard(self) -> Shard:
        """The child as a :class:`Shard` (its starting sequence number is not known yet)."""
        parents = self.parent_shards
        return Shard(
            shard_id=self.shard_id,
            parent_shard_id=parents[0] if parents else None,
            adjacent_parent_shard_id=parents[1] if len(parents) > 1 else None,
            starting_hash_key=int(self.hash_key_range.starting_hash_key),
            ending_hash_key=int(self.hash_key_range.ending_hash_key),
        )


class GetRecordsResult(msgspec.Struct):
    """The answer to GetRecords.

    Attributes:
        records: the records, oldest first, ``data`` already base64-decoded.
        next_shard_iterator: the iterator for the next call; ``None`` once a closed shard is
            read to its end.
        millis_behind_latest: how far the iterator is behind the tip of the shard.
        child_shards: at shard end, the shards that replaced this one.
        response_bytes: the size of the JSON answer (0 when unknown); a cheap upper bound of
            the records' size, for pacing and memory accounting.
    """

    records: list[Record] = []
    next_shard_iterator: str | None = None
    millis_behind_latest: int | None = None
    child_shards: list[ChildShard] = []
    response_bytes: int = 0

    @property
    def at_shard_end(self) -> bool:
        """True when the shard is closed and every record of it was returned."""
        return self.next_shard_iterator is None


class ShardFilter(_FrozenWire, frozen=True):
    """Which shards ListShards returns.

    Attributes:
        type: ``AFTER_SHARD_ID``, ``AT_TRIM_HORIZON``, ``FROM_TRIM_HORIZON``, ``AT_LATEST``,
            ``AT_TIMESTAMP`` or ``FROM_TIMESTAMP``.
        shard_id: with ``AFTER_SHARD_ID``.
        timestamp: epoch seconds, with ``AT_TIMESTAMP`` and ``FROM_TIMESTAMP``.
    """

    type: str
    shard_id: str | None = None
    timestamp: float | None = None


class PutRecordsEntry(_FrozenWire, frozen=True):
    """One record to write with PutRecords.

    Attributes:
        data: the payload (at most 1 MiB with the partition key).
        partition_key: decides the shard (MD5 of it) unless ``explicit_hash_key`` is set.
        explicit_hash_key: a decimal hash key that overrides the partition key's hash.
    """

    data: bytes
    partition_key: str
    explicit_hash_key: str | None = None


class PutRecordsResultEntry(_FrozenWire, frozen=True):
    """The outcome of one PutRecords entry: a sequence number and shard, or an error.

    Attributes:
        sequence_number: set when the record was written.
        shard_id: set when the record was written.
        error_code: ``ProvisionedThroughputExceededException`` or ``InternalFailure`` on failure.
        error_message: the detail of the failure.
    """

    sequence_number: str | None = None
    shard_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None


class PutRecordsResult(_FrozenWire, frozen=True):
    """The answer to PutRecords; entries are in request order.

    Attributes:
        failed_record_count: how many entries failed (retry those only).
        records: one outcome per request entry.
        encryption_type: ``NONE`` or ``KMS``.
    """

    failed_record_count: int = 0
    records: list[PutRecordsResultEntry] = []
    encryption_type: str | None = None


class PutRecordResult(_FrozenWire, frozen=True):
    """The answer to PutRecord.

    Attributes:
        shard_id: the shard the record went to.
        sequence_number: the sequence number it was given.
        encryption_type: ``NONE`` or ``KMS``.
    """

    shard_id: str
    sequence_number: str
    encryption_type: str | None = None


class StreamSummary(msgspec.Struct, frozen=True):
    """A stream's state, from DescribeStreamSummary.

    Attributes:
        stream_name: the name.
        stream_arn: the ARN.
        stream_status: ``CREATING``, ``DELETING``, ``ACTIVE`` or ``UPDATING``.
        open_shard_count: shards currently open.
        retention_period_hours: how long records are kept.
        stream_creation_timestamp: epoch seconds.
        stream_mode: ``PROVISIONED`` or ``ON_DEMAND``.
        consumer_count: registered enhanced fan-out consumers.
        encryption_type: ``NONE`` or ``KMS``, when reported.
    """

    stream_name: str
    stream_arn: str
    stream_status: str
    open_shard_count: int
    retention_period_hours: int
    stream_creation_timestamp: float
    stream_mode: str = "PROVISIONED"
    consumer_count: int = 0
    encryption_type: str | None = None


class StreamConsumer(msgspec.Struct, frozen=True):
    """An enhanced fan-out consumer registered on a stream.

    Attributes:
        consumer_name: the name, unique per stream.
        consumer_arn: the ARN SubscribeToShard takes (it ends with the creation epoch).
        consumer_status: ``CREATING``, ``ACTIVE`` or ``DELETING``; subscribe only when ``ACTIVE``.
        consumer_creation_timestamp: epoch seconds.
        stream_arn: the stream it reads.
    """

    consumer_name: str
    consumer_arn: str
    consumer_status: str
    consumer_creation_timestamp: float
    stream_arn: str


class SubscribeToShardEvent(msgspec.Struct):
    """One event of a SubscribeToShard subscription.

    Attributes:
        records: the records, oldest first, ``data`` already base64-decoded (may be empty:
            the service sends events while the shard is idle too).
        continuation_sequence_number: where to resubscribe (``AFTER_SEQUENCE_NUMBER``) and what
            to checkpoint; ``None`` once the shard is closed and read to its end.
        millis_behind_latest: how far the subscription is behind the tip of the shard.
        child_shards: at shard end, the shards that replaced this one.
    """

    records: list[Record]
    continuation_sequence_number: str | None
    millis_behind_latest: int = 0
    child_shards: list[ChildShard] = []

    @property
    def at_shard_end(self) -> bool:
        """True on the last event of a closed shard: resubscribing to it would return nothing."""
        return self.continuation_sequence_number is None


# ---------------------------------------------------------------------------------------------
# Wire-only shapes
# ---------------------------------------------------------------------------------------------


class _GetRecordsOutput(_Wire):
    records: list[Record] | None = None
    next_shard_iterator: str | None = None
    millis_behind_latest: int | None = None
    # kinesis-local (and older endpoints) send "ChildShards": null on open shards.
    child_shards: list[ChildShard] | None = None


class _StreamModeDetails(_Wire):
    stream_mode: str = "PROVISIONED"


class _StreamDescriptionSummary(_Wire):
    stream_name: str
    stream_arn: str
    stream_status: str
    retention_period_hours: int = 24
    stream_creation_timestamp: float = 0.0
    open_shard_count: int = 0
    stream_mode_details: _StreamModeDetails | None = None
    consumer_count: int | None = None
    encryption_type: str | None = None


class _DescribeStreamSummaryOutput(_Wire):
    stream_description_summary: _StreamDescriptionSummary


class _SequenceNumberRange(_Wire):
    starting_sequence_number: str
    ending_sequence_number: str | None = None


class _WireShard(_Wire):
    shard_id: str
    hash_key_range: HashKeyRange
    sequence_number_range: _SequenceNumberRange
    parent_shard_id: str | None = None
    adjacent_parent_shard_id: str | None = None


class _ListShardsOutput(_Wire):
    shards: list[_WireShard] | None = None
    next_token: str | None = None


class _GetShardIteratorOutput(_Wire):
    shard_iterator: str


class _StreamNameInput(_Wire):
    stream_name: str


class _ListShardsInput(_Wire):
    stream_name: str | None = None
    next_token: str | None = None
    max_results: int | None = None
    shard_filter: ShardFilter | None = None


class _GetShardIteratorInput(_Wire):
    stream_name: str
    shard_id: str
    shard_iterator_type: str
    starting_sequence_number: str | None = None
    timestamp: float | None = None


class _GetRecordsInput(_Wire):
    shard_iterator: str
    limit: int | None = None


class _PutRecordsInput(_Wire):
    stream_name: str
    records: list[PutRecordsEntry]


class _PutRecordInput(_Wire):
    stream_name: str
    data: bytes
    partition_key: str
    explicit_hash_key: str | None = None


class _CreateStreamInput(_Wire):
    stream_name: str
    shard_count: int


class _DeleteStreamInput(_Wire):
    stream_name: str
    enforce_consumer_deletion: bool = False


class _SplitShardInput(_Wire):
    stream_name: str
    shard_to_split: str
    new_starting_hash_key: str


class _MergeShardsInput(_Wire):
    stream_name: str
    shard_to_merge: str
    adjacent_shard_to_merge: str


class _UpdateShardCountInput(_Wire):
    stream_name: str
    target_shard_count: int
    scaling_type: str  # no default: omit_defaults would drop it, and the API requires it


class _WireConsumer(_Wire):
    consumer_name: str
    consumer_arn: str
    consumer_status: str
    consumer_creation_timestamp: float = 0.0
    stream_arn: str | None = None  # only in DescribeStreamConsumer answers

    def to_consumer(self, stream_arn: str) -> StreamConsumer:
        return StreamConsumer(
            consumer_name=self.consumer_name,
            consumer_arn=self.consumer_arn,
            consumer_status=self.consumer_status,
            consumer_creation_timestamp=self.consumer_creation_timestamp,
            stream_arn=self.stream_arn or stream_arn,
        )


class _RegisterStreamConsumerInput(_Wire):
    stream_arn: str
    consumer_name: str


class _RegisterStreamConsumerOutput(_Wire):
    consumer: _WireConsumer


class _ConsumerInput(_Wire):
    """DescribeStreamConsumer and DeregisterStreamConsumer: the ARN, or the stream ARN and name."""

    stream_arn: str | None = None
    consumer_name: str | None = None
    consumer_arn: str | None = None


class _DescribeStreamConsumerOutput(_Wire):
    consumer_description: _WireConsumer


class _ListStreamConsumersInput(_Wire):
    stream_arn: str
    next_token: str | None = None
    max_results: int | None = None


class _ListStreamConsumersOutput(_Wire):
    consumers: list[_WireConsumer] | None = None
    next_token: str | None = None


class _StartingPosition(_Wire):
    type: str
    sequence_number: str | None = None
    timestamp: float | None = None


class _SubscribeToShardInput(_Wire):
    consumer_arn: str
    shard_id: str
    starting_position: _StartingPosition


class _WireSubscribeToShardEvent(_Wire):
    records: list[Record] | None = None
    continuation_sequence_number: str | None = None
    millis_behind_latest: int | None = None
    child_shards: list[ChildShard] | None = None  # kinesis-local sends null

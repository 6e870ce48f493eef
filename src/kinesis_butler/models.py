"""The domain values every layer shares: records, shards, leases, positions.

Kept free of I/O. ``Record`` is a msgspec Struct whose field names map to the Kinesis JSON
names, so the AWS client decodes GetRecords bodies straight into it (no second copy per record).
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, datetime
from functools import total_ordering
from typing import Final

import msgspec

from kinesis_butler.errors import ConfigError

__all__ = [
    "AT_TIMESTAMP",
    "LATEST",
    "SHARD_END",
    "TRIM_HORIZON",
    "ExtendedSequenceNumber",
    "InitialPosition",
    "Lease",
    "Record",
    "Shard",
    "StartPosition",
]


class Record(
    msgspec.Struct,
    rename={
        "data": "Data",
        "partition_key": "PartitionKey",
        "sequence_number": "SequenceNumber",
        "approximate_arrival_timestamp": "ApproximateArrivalTimestamp",
        "encryption_type": "EncryptionType",
        "explicit_hash_key": "ExplicitHashKey",
    },
    omit_defaults=True,
    gc=False,  # only bytes/str/float fields: no cycles possible; ~10% faster GetRecords decode
):
    """One Kinesis record as delivered to a processor.

    Attributes:
        data: the payload, already base64-decoded.
        partition_key: the record's partition key.
        sequence_number: the sequence number Kinesis assigned (a decimal string).
        approximate_arrival_timestamp: seconds since the epoch (float) when Kinesis accepted it.
        sub_sequence_number: position inside a KPL aggregated record; 0 for plain records.
        shard_id: the shard this record was read from.
        stream: the stream name.
        explicit_hash_key: set only for KPL sub-records that carried one.

    Treat records as immutable; the library sets ``shard_id`` and ``stream`` once on delivery.
    """

    data: bytes
    partition_key: str
    sequence_number: str
    approximate_arrival_timestamp: float = 0.0
    encryption_type: str | None = None
    sub_sequence_number: int = 0
    shard_id: str = ""
    stream: str = ""
    explicit_hash_key: str | None = None

    @property
    def extended_sequence_number(self) -> ExtendedSequenceNumber:
        return ExtendedSequenceNumber(self.sequence_number, self.sub_sequence_number)

    @property
    def arrival_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.approximate_arrival_timestamp, tz=UTC)


_SENTINEL_RANK: Final = {"TRIM_HORIZON": -3, "AT_TIMESTAMP": -2, "LATEST": -1, "SHARD_END": 1}


@total_ordering
@dataclasses.dataclass(frozen=True, slots=True)
class ExtendedSequenceNumber:
    """A position in a shard: a sequence number plus a sub-sequence number (KPL).

    ``sequence`` is either a decimal sequence number or one of the sentinels TRIM_HORIZON,
    LATEST, AT_TIMESTAMP, SHARD_END. Ordering: TRIM_HORIZON < AT_TIMESTAMP < LATEST <
    every real sequence number < SHARD_END.
    """

    sequence: str
    sub_sequence: int = 0

    def __post_init__(self) -> None:
        if self.sequence not in _SENTINEL_RANK and not self.sequence.isdigit():
            raise ConfigError(
                f"invalid sequence number {self.sequence!r}: expected digits or one of "
                + ", ".join(sorted(_SENTINEL_RANK))
            )
        if self.sub_sequence < 0:
            raise ConfigError(f"invalid sub-sequence number {self.sub_sequence}: must be >= 0")

    @property
    def is_sentinel(self) -> bool:
        return self.sequence in _SENTINEL_RANK

    @property
    def is_shard_end(self) -> bool:
        return self.sequence == "SHARD_END"

    def _key(self) -> tuple[int, int, int]:
        rank = _SENTINEL_RANK.get(self.sequence)
        if rank is None:
            return (0, int(self.sequence), self.sub_sequence)
        return (rank, 0, self.sub_sequence)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, ExtendedSequenceNumber):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        return self.sequence if self.sub_sequence == 0 else f"{self.sequence}/{self.sub_sequence}"


TRIM_HORIZON: Final = ExtendedSequenceNumber("TRIM_HORIZON")
LATEST: Final = ExtendedSequenceNumber("LATEST")
AT_TIMESTAMP: Final = ExtendedSequenceNumber("AT_TIMESTAMP")
SHARD_END: Final = ExtendedSequenceNumber("SHARD_END")


class InitialPosition(enum.Enum):
    """Where a shard with no checkpoint starts."""

    TRIM_HORIZON = "TRIM_HORIZON"  # the oldest record still retained
    LATEST = "LATEST"  # only records written after the iterator is taken
    AT_TIMESTAMP = "AT_TIMESTAMP"  # the first record at or after a timestamp
    AT_SEQUENCE_NUMBER = "AT_SEQUENCE_NUMBER"  # one shard's record with this sequence number
    AFTER_SEQUENCE_NUMBER = "AFTER_SEQUENCE_NUMBER"  # the record after it


_SEQUENCE_KINDS: Final = (InitialPosition.AT_SEQUENCE_NUMBER, InitialPosition.AFTER_SEQUENCE_NUMBER)


@dataclasses.dataclass(frozen=True, slots=True)
class StartPosition:
    """Where a shard without a checkpoint starts: a kind, with its timestamp or sequence number.

    AT_SEQUENCE_NUMBER and AFTER_SEQUENCE_NUMBER name one shard's record, so they are given per
    shard (``AsyncConsumer(shard_start_at=...)``, ``--start-at-shard``), never for a whole stream.
    """

    kind: InitialPosition = InitialPosition.TRIM_HORIZON
    timestamp: float | None = None
    sequence_number: str | None = None

    def __post_init__(self) -> None:
        if (self.kind is InitialPosition.AT_TIMESTAMP) != (self.timestamp is not None):
            raise ConfigError("a timestamp is required with AT_TIMESTAMP and only with it")
        if (self.kind in _SEQUENCE_KINDS) != (self.sequence_number is not None):
            raise ConfigError(
                "a sequence number is required with AT_SEQUENCE_NUMBER and AFTER_SEQUENCE_NUMBER "
                "and only with them"
            )
        if self.sequence_number is not None and not self.sequence_number.isdigit():
            raise ConfigError(f"invalid sequence number {self.sequence_number!r}: expected digits")

    @property
    def is_sequence(self) -> bool:
        """True for AT_/AFTER_SEQUENCE_NUMBER (per-shard positions)."""
        return self.sequence_number is not None

    @classmethod
    def parse(cls, text: str) -> StartPosition:
        """Parse ``trim_horizon``, ``latest``, ``at_timestamp:ISO8601``,
        ``at_sequence_number:N`` or ``after_sequence_number:N`` (case-insensitive)."""
        raw = text.strip()
        lowered = raw.lower()
        if lowered == "trim_horizon":
            return cls(InitialPosition.TRIM_HORIZON)
        if lowered == "latest":
            return cls(InitialPosition.LATEST)
        if lowered.startswith("at_timestamp:"):
            stamp = raw.split(":", 1)[1]
            try:
                moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            except ValueError:
                raise ConfigError(
                    f"invalid start position {text!r}: {stamp!r} is not an ISO 8601 time "
                    "(example: at_timestamp:2026-11-23T10:00:00Z)"
                ) from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return cls(InitialPosition.AT_TIMESTAMP, moment.timestamp())
        for kind in _SEQUENCE_KINDS:
            prefix = kind.value.lower() + ":"
            if lowered.startswith(prefix):
                number = raw[len(prefix) :].strip()
                if not number.isdigit():
                    raise ConfigError(
                        f"invalid start position {text!r}: {number!r} is not a sequence number (digits)"
                    )
                return cls(kind, sequence_number=number)
        raise ConfigError(
            f"invalid start position {text!r}: use trim_horizon, latest, at_timestamp:ISO8601, "
            "at_sequence_number:N or after_sequence_number:N"
        )

    @property
    def sentinel(self) -> ExtendedSequenceNumber:
        """The checkpoint sentinel a new lease carries for this position (TRIM_HORIZON for a
        per-shard sequence position: the shard's source applies the sequence number itself)."""
        if self.is_sequence:
            return TRIM_HORIZON
        return ExtendedSequenceNumber(self.kind.value)


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """A shard as ListShards describes it."""

    shard_id: str
    parent_shard_id: str | None = None
    adjacent_parent_shard_id: str | None = None
    starting_hash_key: int = 0
    ending_hash_key: int = 2**128 - 1
    starting_sequence_number: str = "0"
    ending_sequence_number: str | None = None

    @property
    def parent_ids(self) -> tuple[str, ...]:
        return tuple(p for p in (self.parent_shard_id, self.adjacent_parent_shard_id) if p)

    @property
    def is_closed(self) -> bool:
        return self.ending_sequence_number is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """One shard's lease, with the KCL lease fields.

    ``lease_counter`` is the fencing token: every write is conditional on the counter the
    writer last saw and increments it. No timestamps are stored; expiry is judged by each
    observer on its own clock.
    """

    lease_key: str
    lease_owner: str | None = None
    lease_counter: int = 0
    checkpoint: ExtendedSequenceNumber = TRIM_HORIZON
    pending_checkpoint: ExtendedSequenceNumber | None = None
    owner_switches_since_checkpoint: int = 0
    parent_shard_ids: frozenset[str] = frozenset()
    child_shard_ids: frozenset[str] = frozenset()
    starting_hash_key: str | None = None
    ending_hash_key: str | None = None
    checkpoint_owner: str | None = None
    stream_name: str | None = None
    shard_id: str | None = None

    @property
    def shard(self) -> str:
        """The shard id (the lease key itself unless the key is multi-stream namespaced)."""
        return self.shard_id or self.lease_key.rsplit(":", 1)[-1]

    def key_for(self, shard_id: str) -> str:
        """The lease key of another shard of the same stream (a parent or a child).

        In multi-stream mode ``stream_name`` holds the KCL stream identifier
        ``account:stream:creationEpoch`` and keys are ``identifier:shardId``."""
        return f"{self.stream_name}:{shard_id}" if self.stream_name else shard_id

    def replace(self, **changes: object) -> Lease:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

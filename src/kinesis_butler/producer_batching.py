"""The producer's pure part: record checks, PutRecords entries, the shard map, batch composition.

No I/O and no clock: :func:`compose` turns the head of the queue into PutRecords entries within
the call's limits, aggregating small records per predicted shard with :class:`kpl.Aggregator`.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import hashlib
import re
from collections import Counter, deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from kinesis_butler.aws.kinesis_shapes import PutRecordsEntry
from kinesis_butler.config import ProducerConfig
from kinesis_butler.errors import RecordRejected
from kinesis_butler.models import Shard
from kinesis_butler.retrieval.kpl import MAX_HASH_KEY, Aggregator, partition_key_hash

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Entry", "Pending", "PutResult", "ShardMap", "compose", "validate_record"]

_md5: Final = hashlib.md5
_HASH_KEY: Final = re.compile(r"0|[1-9][0-9]{0,38}")  # the API's ExplicitHashKey pattern


class PutResult(NamedTuple):
    """Where a record was written.

    Attributes:
        shard_id: the shard it landed on.
        sequence_number: its sequence number (an aggregate's, shared by its records).
        sub_sequence_number: its index inside a KPL aggregate; ``None`` when written on its own.
    """

    shard_id: str
    sequence_number: str
    sub_sequence_number: int | None = None


def validate_record(
    data: object,
    partition_key: object,
    explicit_hash_key: object,
    max_record_bytes: int,
    *,
    hash_partition_key: bool = True,
) -> tuple[bytes, int, int]:
    """Check a record as PutRecords would; returns (data as bytes, its size, its hash key).

    ``hash_partition_key=False`` (no aggregation: nothing predicts shards) skips the partition
    key's MD5: the hash key is then 0 unless an explicit one is given.

    Raises:
        RecordRejected: naming what is wrong.
    """
    # The common case first: bytes, an ASCII key (its length is its size), no explicit hash key.
    if (
        explicit_hash_key is None
        and type(data) is bytes
        and type(partition_key) is str
        and 0 < len(partition_key) <= 256
        and partition_key.isascii()
        and (size := len(data) + len(partition_key)) <= max_record_bytes
    ):
        if not hash_partition_key:
            return data, size, 0
        return data, size, int.from_bytes(_md5(partition_key.encode(), usedforsecurity=False).digest(), "big")
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise RecordRejected(f"data must be bytes, got {type(data).__name__}")
    if not isinstance(partition_key, str) or not 1 <= len(partition_key) <= 256:
        raise RecordRejected(
            f"partition key must be a string of 1 to 256 characters, got {partition_key!r:.300}"
        )
    try:
        key_size = len(partition_key.encode())
    except UnicodeEncodeError:
        raise RecordRejected(f"partition key {partition_key!r} is not valid Unicode text") from None
    if explicit_hash_key is None:
        hash_key = None
    elif not isinstance(explicit_hash_key, str) or not _HASH_KEY.fullmatch(explicit_hash_key):
        raise RecordRejected(
            f"explicit hash key must be a decimal string in [0, 2**128 - 1], got {explicit_hash_key!r:.100}"
        )
    elif (hash_key := int(explicit_hash_key)) > MAX_HASH_KEY:
        raise RecordRejected(f"explicit hash key {explicit_hash_key} is above 2**128 - 1")
    size = len(data) + key_size
    if size > max_record_bytes:
        raise RecordRejected(
            f"record of {size} bytes (data {len(data)} + partition key {key_size}) exceeds "
            f"max_record_bytes ({max_record_bytes}, the stream's maximum record size)"
        )
    if hash_key is None:
        hash_key = partition_key_hash(partition_key) if hash_partition_key else 0
    return data, size, hash_key


@dataclasses.dataclass(slots=True, eq=False)
class Pending:
    """One accepted record. ``size`` is data + UTF-8 partition key, as Kinesis counts it."""

    data: bytes
    partition_key: str
    explicit_hash_key: str | None
    hash_key: int
    size: int
    future: asyncio.Future[Any]
    enqueued: float


@dataclasses.dataclass(slots=True, eq=False)
class Entry:
    """One PutRecords entry: a plain record, or a KPL aggregate of records of one predicted shard.

    ``shard`` is the predicted shard (None without a shard map); ``keys`` the partition keys it
    holds for ordering.
    """

    wire: PutRecordsEntry
    records: list[Pending]
    aggregated: bool
    shard: Shard | None
    keys: frozenset[str]
    attempts: int = 0

    @property
    def size(self) -> int:
        return len(self.wire.data) + len(self.wire.partition_key.encode())


class ShardMap:
    """Open shards by hash key range: which shard a hash key lands on."""

    def __init__(self, shards: Iterable[Shard]) -> None:
        shards = list(shards)
        self.by_id = {shard.shard_id: shard for shard in shards}
        self._open = sorted((s for s in shards if not s.is_closed), key=lambda s: s.starting_hash_key)
        self._starts = [shard.starting_hash_key for shard in self._open]

    def lookup(self, hash_key: int) -> Shard | None:
        index = bisect.bisect_right(self._starts, hash_key) - 1
        if index >= 0 and hash_key <= self._open[index].ending_hash_key:
            return self._open[index]
        return None

    @property
    def open_shards(self) -> Sequence[Shard]:
        return self._open


_BLOCKED: Final = "blocked"
_EMPTY: Final = Aggregator()  # size_with() of a record alone


class _Open:
    """A non-empty aggregate being filled for one shard."""

    __slots__ = ("aggregator", "limit", "records", "shard")

    def __init__(self, shard: Shard, limit: int, first: Pending) -> None:
        self.shard = shard
        self.aggregator = Aggregator()
        self.records: list[Pending] = []
        # The aggregator's own limit: the entry's partition key (its first record's) counts too.
        self.limit = limit - len(first.partition_key.encode())

    def add(self, record: Pending) -> None:
        self.aggregator.add(record.data, record.partition_key, record.explicit_hash_key)
        self.records.append(record)


def _wire_size(aggregator: Aggregator, record: Pending, first: Pending | None) -> int:
    """The aggregate's bytes in the request (+ its partition key) once ``record`` is added."""
    size = aggregator.size_with(record.data, record.partition_key, record.explicit_hash_key)
    return size + len((first or record).partition_key.encode())


def _plain(record: Pending, shard: Shard | None) -> Entry:
    wire = PutRecordsEntry(record.data, record.partition_key, record.explicit_hash_key)
    return Entry(wire, [record], False, shard, frozenset((record.partition_key,)))


def _close(agg: _Open) -> Entry:
    if len(agg.records) == 1:  # a lone record is cheaper, and readable by anyone, as it is
        return _plain(agg.records[0], agg.shard)
    partition_key, hash_key = agg.aggregator.routing_keys()  # the first record's: inside the shard
    wire = PutRecordsEntry(agg.aggregator.encode(), partition_key, hash_key)
    return Entry(wire, agg.records, True, agg.shard, frozenset(r.partition_key for r in agg.records))


def compose(  # noqa: PLR0912, PLR0915 - one pass over the queue, each branch a documented case
    queue: deque[Pending],
    *,
    config: ProducerConfig,
    shards: ShardMap | None,
    holds: Counter[str] | None,
    room: tuple[int, int],
) -> tuple[list[Entry], int]:
    """Take records from the head of ``queue`` into at most ``room`` (entries, bytes) entries.

    Records stay in the queue, in order, when they do not fit, or (``holds`` given: ordered mode)
    when their partition key is held by an entry in flight or by an entry of this batch other
    than the aggregate they would join. ``shards`` enables aggregation per predicted shard.
    Returns the entries and the bytes of the records taken.
    """
    max_entries, max_bytes = room
    limit = config.aggregation_max_bytes
    entries: list[Entry] = []
    aggs: dict[str, _Open] = {}  # shard id -> its open aggregate
    placed: dict[str, object] = {}  # ordered mode: key -> the open aggregate holding it, or _BLOCKED
    skipped: list[Pending] = []
    used = taken = 0

    def skip() -> None:
        skipped.append(queue.popleft())
        placed[record.partition_key] = _BLOCKED

    while queue:
        record = queue[0]
        key = record.partition_key
        where = placed.get(key) if holds is not None else None
        if holds is not None and (holds.get(key) or where is _BLOCKED):
            skip()
            continue
        shard = shards.lookup(record.hash_key) if shards is not None else None
        # A record of ``size`` bytes alone is at most 2 * size + 35 bytes on the wire: exact only if near.
        if shard is None or (record.size * 2 + 40 > limit and _wire_size(_EMPTY, record, None) > limit):
            if where is not None:  # ordered: the key's earlier records are in an open aggregate
                skip()
                continue
            if used + record.size > max_bytes or len(entries) + len(aggs) >= max_entries:
                break
            entries.append(_plain(queue.popleft(), shard))
            placed[key] = _BLOCKED
            used += record.size
            taken += record.size
            continue
        agg = aggs.get(shard.shard_id)
        if agg is not None and record.explicit_hash_key is None and (where is None or where is agg):
            # The hot path: one call checks the aggregate's limit and the request's, and adds.
            growth = agg.aggregator.add_within(record.data, key, agg.limit, max_bytes - used)
            if growth < 0:
                break
            if growth:
                agg.records.append(queue.popleft())
                if holds is not None:
                    placed[key] = agg
                used += growth
                taken += record.size
                continue
        elif agg is not None:
            grown = _wire_size(agg.aggregator, record, agg.records[0])
            if grown <= limit:
                if where is not None and where is not agg:
                    skip()
                    continue
                if (
                    used + grown - agg.aggregator.size - len(agg.records[0].partition_key.encode())
                    > max_bytes
                ):
                    break
                used += grown - agg.aggregator.size - len(agg.records[0].partition_key.encode())
                agg.add(queue.popleft())
                placed[key] = agg
                taken += record.size
                continue
        if where is not None:  # ordered: the key's earlier records are in an entry of this batch
            skip()
            continue
        # A new aggregate for the shard (its previous one, if any, is full and closes).
        alone = _wire_size(_EMPTY, record, None)
        if used + alone > max_bytes or len(entries) + len(aggs) >= max_entries:
            break
        if agg is not None:
            entries.append(closed := _close(agg))
            if holds is not None:
                placed.update(dict.fromkeys(closed.keys, _BLOCKED))
        aggs[shard.shard_id] = fresh = _Open(shard, limit, record)
        fresh.add(queue.popleft())
        placed[key] = fresh
        used += alone
        taken += record.size
    queue.extendleft(reversed(skipped))
    entries += (_close(agg) for agg in aggs.values())
    return entries, taken

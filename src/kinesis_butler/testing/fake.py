"""FakeKinesis: an in-memory stream for fast, deterministic unit tests of consumers.

It implements the calls a consumer makes (DescribeStreamSummary, ListShards,
GetShardIterator, GetRecords) with real shard semantics: MD5 partition-key hashing into hash
ranges, splits and merges that close parents (their last GetRecords has no next iterator and
lists the ChildShards), and injectable failures. It is never the only test of anything: the
integration tests run the same scenarios against the real emulator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections import deque

from kinesis_butler.errors import InvalidArgument, ResourceNotFound, Throttled
from kinesis_butler.models import Record, Shard

__all__ = ["FakeChildShard", "FakeGetRecords", "FakeKinesis", "FakeSummary"]

MAX_HASH = 2**128 - 1


@dataclasses.dataclass
class FakeChildShard:
    shard_id: str
    parent_shards: list[str]
    hash_key_range: FakeHashKeyRange | None = None


@dataclasses.dataclass(frozen=True)
class FakeHashKeyRange:
    starting_hash_key: str
    ending_hash_key: str


@dataclasses.dataclass
class FakeGetRecords:
    records: list[Record]
    next_shard_iterator: str | None
    millis_behind_latest: int | None
    child_shards: list[FakeChildShard]


@dataclasses.dataclass
class FakeSummary:
    stream_name: str
    open_shard_count: int
    stream_status: str = "ACTIVE"

    @property
    def stream_arn(self) -> str:
        return f"arn:aws:kinesis:us-east-1:000000000000:stream/{self.stream_name}"


@dataclasses.dataclass
class _FakeShard:
    shard: Shard
    records: list[Record] = dataclasses.field(default_factory=list)
    closed: bool = False
    children: list[str] = dataclasses.field(default_factory=list)


class FakeKinesis:
    """One or more in-memory streams. Not thread-safe; use from one event loop."""

    def __init__(self, *, enforce_read_quota: bool = False) -> None:
        """With ``enforce_read_quota`` GetRecords raises Throttled as Kinesis would: more than 5
        calls in a second on a shard, or reading a shard faster than 2 MiB/s (a window's bytes
        count for ``bytes / 2 MiB`` seconds). Every call is logged in ``read_log`` either way."""
        self.enforce_read_quota = enforce_read_quota
        self.read_log: list[tuple[float, str, int]] = []  # (loop time, shard id, payload bytes)
        self.throttled = 0
        self._streams: dict[str, dict[str, _FakeShard]] = {}
        self._next_shard = 0
        self._sequence = 49_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000
        self.failures: deque[tuple[str, BaseException]] = deque()
        self.calls: dict[str, int] = {}

    # -- admin ---------------------------------------------------------------------------------
    def create_stream(self, stream: str, shard_count: int) -> None:
        shards: dict[str, _FakeShard] = {}
        width = (MAX_HASH + 1) // shard_count
        for index in range(shard_count):
            start = index * width
            end = MAX_HASH if index == shard_count - 1 else start + width - 1
            shard = self._new_shard(start, end)
            shards[shard.shard_id] = _FakeShard(shard)
        self._streams[stream] = shards

    def delete_stream(self, stream: str) -> None:
        """Delete a stream: every later call on it raises ResourceNotFound."""
        self._stream(stream)
        del self._streams[stream]

    def _new_shard(self, start: int, end: int, parents: tuple[str, ...] = ()) -> Shard:
        shard_id = f"shardId-{self._next_shard:012d}"
        self._next_shard += 1
        return Shard(
            shard_id,
            parent_shard_id=parents[0] if parents else None,
            adjacent_parent_shard_id=parents[1] if len(parents) > 1 else None,
            starting_hash_key=start,
            ending_hash_key=end,
            starting_sequence_number=str(self._sequence),
        )

    def _stream(self, stream: str) -> dict[str, _FakeShard]:
        try:
            return self._streams[stream]
        except KeyError:
            raise ResourceNotFound(
                f"Stream {stream} not found", operation="fake", code="ResourceNotFoundException"
            ) from None

    def put(self, stream: str, data: bytes, partition_key: str) -> Record:
        """Append one record to the open shard its partition key hashes into."""
        hash_key = int(hashlib.md5(partition_key.encode()).hexdigest(), 16)  # noqa: S324 - Kinesis's own hash
        for entry in self._stream(stream).values():
            if not entry.closed and entry.shard.starting_hash_key <= hash_key <= entry.shard.ending_hash_key:
                self._sequence += 1
                record = Record(data, partition_key, str(self._sequence), time.time())
                entry.records.append(record)
                return record
        raise AssertionError("no open shard covers the hash key")  # pragma: no cover

    def _close(self, stream: str, shard_id: str) -> _FakeShard:
        entry = self._stream(stream)[shard_id]
        if entry.closed:
            raise InvalidArgument(f"shard {shard_id} is closed", operation="fake")
        entry.closed = True
        entry.shard = dataclasses.replace(entry.shard, ending_sequence_number=str(self._sequence))
        return entry

    def split(self, stream: str, shard_id: str, at: int | None = None) -> tuple[str, str]:
        parent = self._close(stream, shard_id)
        lo, hi = parent.shard.starting_hash_key, parent.shard.ending_hash_key
        middle = at if at is not None else (lo + hi + 1) // 2
        left = self._new_shard(lo, middle - 1, (shard_id,))
        right = self._new_shard(middle, hi, (shard_id,))
        shards = self._stream(stream)
        for child in (left, right):
            shards[child.shard_id] = _FakeShard(child)
        parent.children = [left.shard_id, right.shard_id]
        return left.shard_id, right.shard_id

    def merge(self, stream: str, shard_id: str, adjacent_shard_id: str) -> str:
        first = self._close(stream, shard_id)
        second = self._close(stream, adjacent_shard_id)
        lo = min(first.shard.starting_hash_key, second.shard.starting_hash_key)
        hi = max(first.shard.ending_hash_key, second.shard.ending_hash_key)
        child = self._new_shard(lo, hi, (shard_id, adjacent_shard_id))
        self._stream(stream)[child.shard_id] = _FakeShard(child)
        first.children = second.children = [child.shard_id]
        return child.shard_id

    def fail_next(self, operation: str, error: BaseException) -> None:
        """Make the next call of ``operation`` (e.g. ``"get_records"``) raise ``error``."""
        self.failures.append((operation, error))

    def _enter(self, operation: str) -> None:
        self.calls[operation] = self.calls.get(operation, 0) + 1
        if self.failures and self.failures[0][0] == operation:
            raise self.failures.popleft()[1]

    # -- the API a consumer uses -----------------------------------------------------------------
    async def describe_stream_summary(self, stream: str) -> FakeSummary:
        self._enter("describe_stream_summary")
        shards = self._stream(stream)
        return FakeSummary(stream, sum(1 for s in shards.values() if not s.closed))

    async def list_shards(self, stream: str) -> list[Shard]:
        self._enter("list_shards")
        return [entry.shard for entry in self._stream(stream).values()]

    async def get_shard_iterator(
        self,
        stream: str,
        shard_id: str,
        iterator_type: str,
        *,
        sequence_number: str | None = None,
        timestamp: float | None = None,
    ) -> str:
        self._enter("get_shard_iterator")
        entry = self._stream(stream).get(shard_id)
        if entry is None:
            raise ResourceNotFound(f"shard {shard_id} not found", operation="GetShardIterator")
        records = entry.records
        if iterator_type == "TRIM_HORIZON":
            index = 0
        elif iterator_type == "LATEST":
            index = len(records)
        elif iterator_type == "AT_TIMESTAMP":
            index = next(
                (i for i, r in enumerate(records) if r.approximate_arrival_timestamp >= (timestamp or 0)),
                len(records),
            )
        elif iterator_type in ("AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"):
            if sequence_number is None:
                raise InvalidArgument(f"{iterator_type} needs a sequence number", operation="fake")
            target = int(sequence_number)
            after = iterator_type == "AFTER_SEQUENCE_NUMBER"
            index = next(
                (
                    i
                    for i, r in enumerate(records)
                    if int(r.sequence_number) > target or (not after and int(r.sequence_number) == target)
                ),
                len(records),
            )
        else:
            raise InvalidArgument(f"bad iterator type {iterator_type}", operation="GetShardIterator")
        return f"{stream}|{shard_id}|{index}"

    def _check_read_quota(self, shard_id: str, now: float) -> None:
        calls = [(at, n) for at, shard, n in self.read_log if shard == shard_id and now - at < 1.0 - 1e-6]
        if len(calls) >= 5:
            self.throttled += 1
            raise Throttled("Rate exceeded for shard (5 calls/s)", operation="GetRecords")
        last = next(((at, n) for at, shard, n in reversed(self.read_log) if shard == shard_id), None)
        if last is not None and now < last[0] + last[1] / (2 * 1024 * 1024) - 1e-9:
            self.throttled += 1
            raise Throttled("Rate exceeded for shard (2 MiB/s)", operation="GetRecords")

    async def get_records(
        self, shard_iterator: str, *, limit: int | None = None, max_attempts: int | None = None
    ) -> FakeGetRecords:
        self._enter("get_records")
        stream, shard_id, raw_index = shard_iterator.split("|")
        entry = self._stream(stream)[shard_id]
        now = asyncio.get_running_loop().time()
        if self.enforce_read_quota:
            self._check_read_quota(shard_id, now)
        index = int(raw_index)
        end = min(len(entry.records), index + (limit or 10_000))
        size = 0
        for position in range(index, end):  # Kinesis answers at most 10 MiB (at least one record)
            size += len(entry.records[position].data)
            if size > 10 * 1024 * 1024 and position > index:
                end = position
                break
        self.read_log.append(
            (now, shard_id, sum(len(r.data) + len(r.partition_key) for r in entry.records[index:end]))
        )
        batch = [
            Record(r.data, r.partition_key, r.sequence_number, r.approximate_arrival_timestamp)
            for r in entry.records[index:end]
        ]
        if entry.closed and end >= len(entry.records):
            children = [
                FakeChildShard(
                    child,
                    list(self._stream(stream)[child].shard.parent_ids),
                    FakeHashKeyRange(
                        str(self._stream(stream)[child].shard.starting_hash_key),
                        str(self._stream(stream)[child].shard.ending_hash_key),
                    ),
                )
                for child in entry.children
            ]
            return FakeGetRecords(batch, None, 0, children)
        behind = 0 if end >= len(entry.records) else 1000
        return FakeGetRecords(batch, f"{stream}|{shard_id}|{end}", behind, [])

    async def aclose(self) -> None:
        return None

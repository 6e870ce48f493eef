"""KinesisClient against the real kinesis-local emulator: every operation, shard ends and lineage."""

from __future__ import annotations

import itertools
import os
import time
import uuid

import pytest

from kinesis_butler.aws import GetRecordsResult, KinesisClient, PutRecordsEntry, ShardFilter
from kinesis_butler.errors import AwsError, ResourceInUse, ResourceNotFound
from kinesis_butler.models import Record, Shard
from tests.helpers import wait_until_async
from tests.integration.conftest import DEADLINE, StreamFactory

pytestmark = pytest.mark.integration

MAX_HASH = 2**128 - 1


async def read_until(
    kinesis: KinesisClient, iterator: str | None, *, count: int | None = None, to_shard_end: bool = False
) -> tuple[list[Record], GetRecordsResult]:
    """Polls GetRecords until ``count`` records arrived or the shard end was reached."""
    records: list[Record] = []
    deadline = time.monotonic() + DEADLINE
    while True:
        assert iterator is not None
        result = await kinesis.get_records(iterator)
        records.extend(result.records)
        if result.next_shard_iterator is None:
            return records, result
        if not to_shard_end and count is not None and len(records) >= count:
            return records, result
        if time.monotonic() > deadline:
            pytest.fail(f"read {len(records)} records, expected {count} (shard end: {to_shard_end})")
        iterator = result.next_shard_iterator


def payloads(n: int, tag: str) -> list[bytes]:
    # Binary, empty-free payloads with every byte value somewhere: the base64 round trip must be exact.
    return [f"{tag}-{i}:".encode() + os.urandom(20) + bytes([i % 256]) for i in range(n)]


async def put_all(kinesis: KinesisClient, stream: str, entries: list[PutRecordsEntry]) -> list[str]:
    result = await kinesis.put_records(stream, entries)
    assert result.failed_record_count == 0
    assert all(r.sequence_number for r in result.records)
    return [r.sequence_number or "" for r in result.records]


async def test_create_wait_and_describe(kinesis: KinesisClient, new_stream: StreamFactory) -> None:
    before = time.time()
    stream = await new_stream(2)
    summary = await kinesis.describe_stream_summary(stream)
    assert summary.stream_name == stream
    assert summary.stream_status == "ACTIVE"
    assert summary.open_shard_count == 2
    assert summary.stream_arn.endswith(f":stream/{stream}")
    assert summary.retention_period_hours == 24
    assert summary.stream_mode == "PROVISIONED"
    assert before - 60 < summary.stream_creation_timestamp < time.time() + 60


async def test_describe_unknown_stream_is_resource_not_found(kinesis: KinesisClient) -> None:
    with pytest.raises(ResourceNotFound) as info:
        await kinesis.describe_stream_summary(f"kb-aws-missing-{uuid.uuid4().hex[:8]}")
    assert info.value.code == "ResourceNotFoundException"
    assert info.value.operation == "DescribeStreamSummary"
    assert info.value.status == 400


async def test_creating_an_existing_stream_is_resource_in_use(
    kinesis: KinesisClient, new_stream: StreamFactory
) -> None:
    stream = await new_stream(1)
    with pytest.raises(ResourceInUse):
        await kinesis.create_stream(stream, 1)


async def test_put_records_and_get_records_round_trip_bytes(
    kinesis: KinesisClient, new_stream: StreamFactory
) -> None:
    stream = await new_stream(2)
    shards = await kinesis.list_shards(stream)
    data = payloads(40, "rt")
    # Explicit hash keys put even records on the first shard and odd ones on the second.
    entries = [
        PutRecordsEntry(d, f"pk-{i}", explicit_hash_key=str(shards[i % 2].starting_hash_key))
        for i, d in enumerate(data)
    ]
    sequence_numbers = await put_all(kinesis, stream, entries)

    for index, shard in enumerate(shards):
        iterator = await kinesis.get_shard_iterator(stream, shard.shard_id, "TRIM_HORIZON")
        records, last = await read_until(kinesis, iterator, count=20)
        assert [r.data for r in records] == data[index::2]
        assert [r.partition_key for r in records] == [f"pk-{i}" for i in range(index, 40, 2)]
        assert [r.sequence_number for r in records] == sequence_numbers[index::2]
        assert all(time.time() - 120 < r.approximate_arrival_timestamp < time.time() + 60 for r in records)
        assert last.millis_behind_latest is not None
        assert last.next_shard_iterator is not None  # an open shard never ends


async def test_put_record_single(kinesis: KinesisClient, new_stream: StreamFactory) -> None:
    stream = await new_stream(1)
    written = await kinesis.put_record(stream, b"\x00single\xff", "pk")
    assert written.shard_id == "shardId-000000000000"
    iterator = await kinesis.get_shard_iterator(stream, written.shard_id, "AT_SEQUENCE_NUMBER",
                                                sequence_number=written.sequence_number)  # fmt: skip
    records, _ = await read_until(kinesis, iterator, count=1)
    assert (records[0].data, records[0].sequence_number) == (b"\x00single\xff", written.sequence_number)


async def test_list_shards_paginates_and_covers_the_hash_space(
    kinesis: KinesisClient, new_stream: StreamFactory
) -> None:
    stream = await new_stream(3)
    paged = await kinesis.list_shards(stream, max_results=1)
    assert paged == await kinesis.list_shards(stream)
    assert [s.shard_id for s in paged] == [f"shardId-{i:012d}" for i in range(3)]
    assert paged[0].starting_hash_key == 0
    assert paged[-1].ending_hash_key == MAX_HASH
    for lower, upper in itertools.pairwise(paged):
        assert upper.starting_hash_key == lower.ending_hash_key + 1
    assert all(not s.is_closed and not s.parent_ids for s in paged)

    after = await kinesis.list_shards(
        stream, shard_filter=ShardFilter("AFTER_SHARD_ID", shard_id=paged[0].shard_id)
    )
    assert [s.shard_id for s in after] == [paged[1].shard_id, paged[2].shard_id]


async def test_iterator_types_start_where_they_say(kinesis: KinesisClient, new_stream: StreamFactory) -> None:
    stream = await new_stream(1)
    shard_id = "shardId-000000000000"
    first_batch = payloads(5, "a")
    seqs = await put_all(kinesis, stream, [PutRecordsEntry(d, "k") for d in first_batch])

    iterator = await kinesis.get_shard_iterator(
        stream, shard_id, "AT_SEQUENCE_NUMBER", sequence_number=seqs[2]
    )
    records, _ = await read_until(kinesis, iterator, count=3)
    assert [r.data for r in records] == first_batch[2:]

    iterator = await kinesis.get_shard_iterator(
        stream, shard_id, "AFTER_SEQUENCE_NUMBER", sequence_number=seqs[2]
    )
    records, _ = await read_until(kinesis, iterator, count=2)
    assert [r.data for r in records] == first_batch[3:]

    latest = await kinesis.get_shard_iterator(stream, shard_id, "LATEST")
    empty = await kinesis.get_records(latest)
    assert empty.records == []
    assert empty.next_shard_iterator is not None

    # Let the clock pass the first batch so a timestamp can separate the two batches.
    last_arrival = max(r.approximate_arrival_timestamp for r in records)

    async def clock_passed() -> bool:
        return time.time() > last_arrival + 0.05

    await wait_until_async(clock_passed, timeout=DEADLINE, what="the clock to pass the first batch")
    second_batch = payloads(3, "b")
    await put_all(kinesis, stream, [PutRecordsEntry(d, "k") for d in second_batch])

    records, _ = await read_until(kinesis, empty.next_shard_iterator, count=3)
    assert [r.data for r in records] == second_batch  # LATEST saw only what came after it

    at = records[0].approximate_arrival_timestamp
    iterator = await kinesis.get_shard_iterator(stream, shard_id, "AT_TIMESTAMP", timestamp=at)
    records, _ = await read_until(kinesis, iterator, count=3)
    assert [r.data for r in records] == second_batch

    iterator = await kinesis.get_shard_iterator(stream, shard_id, "TRIM_HORIZON")
    records, _ = await read_until(kinesis, iterator, count=8)
    assert [r.data for r in records] == first_batch + second_batch


async def wait_for_shards(kinesis: KinesisClient, stream: str, count: int) -> list[Shard]:
    found: list[Shard] = []

    async def listed() -> bool:
        summary = await kinesis.describe_stream_summary(stream)
        found[:] = await kinesis.list_shards(stream)
        return summary.stream_status == "ACTIVE" and len(found) == count

    await wait_until_async(listed, timeout=DEADLINE, what=f"{count} shards in {stream}")
    return found


async def test_split_closes_the_parent_with_child_shards_at_its_end(
    kinesis: KinesisClient, new_stream: StreamFactory
) -> None:
    stream = await new_stream(1)
    parent = (await kinesis.list_shards(stream))[0]
    data = payloads(10, "split")
    await put_all(kinesis, stream, [PutRecordsEntry(d, f"k{i}") for i, d in enumerate(data)])
    iterator = await kinesis.get_shard_iterator(stream, parent.shard_id, "TRIM_HORIZON")

    middle = MAX_HASH // 2 + 1
    await kinesis.split_shard(stream, parent.shard_id, middle)
    shards = {s.shard_id: s for s in await wait_for_shards(kinesis, stream, 3)}

    assert shards[parent.shard_id].is_closed
    children = [s for s in shards.values() if s.parent_shard_id == parent.shard_id]
    assert sorted((c.starting_hash_key, c.ending_hash_key) for c in children) == [
        (0, middle - 1),
        (middle, MAX_HASH),
    ]

    records, last = await read_until(kinesis, iterator, to_shard_end=True)
    assert [r.data for r in records] == data  # nothing lost across the split
    assert last.next_shard_iterator is None
    assert last.at_shard_end
    assert sorted(c.shard_id for c in last.child_shards) == sorted(c.shard_id for c in children)
    assert all(c.parent_shards == [parent.shard_id] for c in last.child_shards)
    assert {c.to_shard().starting_hash_key for c in last.child_shards} == {0, middle}

    open_only = await kinesis.list_shards(stream, shard_filter=ShardFilter("AT_LATEST"))
    assert sorted(s.shard_id for s in open_only) == sorted(c.shard_id for c in children)
    everything = await kinesis.list_shards(stream, shard_filter=ShardFilter("AT_TRIM_HORIZON"))
    assert len(everything) == 3


async def test_merge_closes_both_parents_into_one_child(
    kinesis: KinesisClient, new_stream: StreamFactory
) -> None:
    stream = await new_stream(2)
    low, high = await kinesis.list_shards(stream)
    await put_all(
        kinesis,
        stream,
        [
            PutRecordsEntry(b"low", "a", explicit_hash_key=str(low.starting_hash_key)),
            PutRecordsEntry(b"high", "b", explicit_hash_key=str(high.starting_hash_key)),
        ],
    )
    iterators = {
        s.shard_id: await kinesis.get_shard_iterator(stream, s.shard_id, "TRIM_HORIZON") for s in (low, high)
    }
    await kinesis.merge_shards(stream, low.shard_id, high.shard_id)
    shards = {s.shard_id: s for s in await wait_for_shards(kinesis, stream, 3)}
    (child,) = [s for s in shards.values() if s.parent_ids]
    assert set(child.parent_ids) == {low.shard_id, high.shard_id}
    assert (child.starting_hash_key, child.ending_hash_key) == (0, MAX_HASH)

    for shard_id, expected in ((low.shard_id, b"low"), (high.shard_id, b"high")):
        assert shards[shard_id].is_closed
        records, last = await read_until(kinesis, iterators[shard_id], to_shard_end=True)
        assert [r.data for r in records] == [expected]
        assert last.next_shard_iterator is None
        assert [c.shard_id for c in last.child_shards] == [child.shard_id]
        assert set(last.child_shards[0].parent_shards) == {low.shard_id, high.shard_id}


async def test_update_shard_count_reshards_uniformly(
    kinesis: KinesisClient, new_stream: StreamFactory
) -> None:
    stream = await new_stream(1)
    await kinesis.update_shard_count(stream, 2)

    async def two_open() -> bool:
        summary = await kinesis.describe_stream_summary(stream)
        return summary.stream_status == "ACTIVE" and summary.open_shard_count == 2

    await wait_until_async(two_open, timeout=DEADLINE, what="two open shards")
    open_shards = await kinesis.list_shards(stream, shard_filter=ShardFilter("AT_LATEST"))
    assert len(open_shards) == 2


async def test_delete_stream_then_it_is_gone(kinesis: KinesisClient, new_stream: StreamFactory) -> None:
    stream = await new_stream(1)
    await kinesis.delete_stream(stream)

    async def gone() -> bool:
        try:
            await kinesis.describe_stream_summary(stream)
        except ResourceNotFound:
            return True
        return False

    await wait_until_async(gone, timeout=DEADLINE, what=f"{stream} to be deleted")


async def test_get_shard_iterator_for_an_unknown_shard(
    kinesis: KinesisClient, new_stream: StreamFactory
) -> None:
    stream = await new_stream(1)
    with pytest.raises(AwsError) as info:
        await kinesis.get_shard_iterator(stream, "shardId-000000000099", "LATEST")
    assert isinstance(info.value, ResourceNotFound)

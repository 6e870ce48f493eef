"""AsyncProducer against an in-process fake Kinesis: batching, back-pressure, retries, ordering,
bad input, aggregation per predicted shard and the shard map refresh after a reshard."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter, defaultdict, deque
from collections.abc import Callable

import pytest

from kinesis_butler.aws.kinesis_shapes import PutRecordsEntry, PutRecordsResult, PutRecordsResultEntry
from kinesis_butler.config import ProducerConfig
from kinesis_butler.errors import (
    ClosedError,
    ConfigError,
    RecordFailed,
    RecordRejected,
    ResourceNotFound,
    Throttled,
)
from kinesis_butler.models import Record, Shard
from kinesis_butler.producer import AsyncProducer, PutHandle, PutResult
from kinesis_butler.producer_batching import Pending, ShardMap, compose
from kinesis_butler.retrieval.kpl import MAGIC, MAX_HASH_KEY, deaggregate, effective_hash_key
from kinesis_butler.sync import Producer
from tests.helpers import wait_until

THROTTLED = "ProvisionedThroughputExceededException"
FAST = {"linger": 0.0, "retry_base": 0.001, "retry_cap": 0.005}


def uniform_shards(count: int, first_id: int = 0) -> list[Shard]:
    step = (MAX_HASH_KEY + 1) // count
    return [
        Shard(
            f"shardId-{first_id + i:012d}",
            starting_hash_key=i * step,
            ending_hash_key=MAX_HASH_KEY if i == count - 1 else (i + 1) * step - 1,
        )
        for i in range(count)
    ]


class FakeKinesis:
    """PutRecords and ListShards in memory. ``fail(entry)`` may return an error code to inject;
    ``gate`` holds every call until set; ``raises`` is raised by the next calls, once each."""

    def __init__(self, shards: list[Shard] | None = None) -> None:
        self.shards = shards or uniform_shards(4)
        self.calls: list[list[PutRecordsEntry]] = []
        self.written: list[tuple[Shard, str, PutRecordsEntry]] = []
        self.fail: Callable[[PutRecordsEntry], str | None] = lambda entry: None
        self.gate = asyncio.Event()
        self.gate.set()
        self.raises: list[Exception] = []
        self.list_calls = 0
        self._sequence = itertools.count(1000)

    async def put_records(self, stream: str, entries: list[PutRecordsEntry]) -> PutRecordsResult:
        assert 1 <= len(entries) <= 500
        self.calls.append(list(entries))
        await self.gate.wait()
        if self.raises:
            raise self.raises.pop(0)
        outcomes = []
        for entry in entries:
            code = self.fail(entry)
            if code:
                outcomes.append(PutRecordsResultEntry(error_code=code, error_message="injected"))
                continue
            hash_key = effective_hash_key(entry.partition_key, entry.explicit_hash_key)
            shard = next(
                s
                for s in self.shards
                if not s.is_closed and s.starting_hash_key <= hash_key <= s.ending_hash_key
            )
            sequence = str(next(self._sequence))
            self.written.append((shard, sequence, entry))
            outcomes.append(PutRecordsResultEntry(sequence_number=sequence, shard_id=shard.shard_id))
        failed = sum(1 for outcome in outcomes if outcome.error_code)
        return PutRecordsResult(failed_record_count=failed, records=outcomes)

    async def list_shards(self, stream: str) -> list[Shard]:
        self.list_calls += 1
        return list(self.shards)

    async def aclose(self) -> None:
        pass

    def split_all(self) -> None:
        """Split every open shard in two: parents closed, children open."""
        children: list[Shard] = []
        closed: list[Shard] = []
        next_id = len(self.shards)
        for shard in self.shards:
            if shard.is_closed:
                closed.append(shard)
                continue
            closed.append(
                Shard(shard.shard_id, None, None, shard.starting_hash_key, shard.ending_hash_key, "0", "9")
            )
            middle = (shard.starting_hash_key + shard.ending_hash_key) // 2
            for start, end in ((shard.starting_hash_key, middle), (middle + 1, shard.ending_hash_key)):
                children.append(Shard(f"shardId-{next_id:012d}", shard.shard_id, None, start, end))
                next_id += 1
        self.shards = closed + children

    def delivered(self) -> list[Record]:
        """What a consumer reads, shard by shard in write order, sub-records outside the
        shard's range dropped (as ours and the KCL do)."""
        out: list[Record] = []
        for shard, sequence, entry in self.written:
            record = Record(entry.data, entry.partition_key, sequence, shard_id=shard.shard_id)
            out += deaggregate([record], hash_range=(shard.starting_hash_key, shard.ending_hash_key))
        return out


def producer(fake: FakeKinesis, **config: object) -> AsyncProducer:
    return AsyncProducer("orders", client=fake, config=ProducerConfig(**config))  # type: ignore[arg-type]


async def put_all(prod: AsyncProducer, records: list[tuple[bytes, str]]) -> list[PutHandle]:
    return [await prod.put(data, key) for data, key in records]


# -- batching ---------------------------------------------------------------------------------


async def test_a_full_batch_of_500_is_sent_without_waiting_for_the_linger() -> None:
    fake = FakeKinesis()
    async with producer(fake, linger=30.0, aggregate=False) as prod:
        handles = await put_all(prod, [(b"%d" % i, f"k{i}") for i in range(1200)])
        await wait_until(lambda: len(fake.calls) == 2, timeout=5, what="two full calls")
        assert [len(call) for call in fake.calls] == [500, 500]
        await prod.flush()
        assert [len(call) for call in fake.calls] == [500, 500, 200]
        assert all(handle.done() for handle in handles)
    assert [entry.data for _, _, entry in fake.written] == [b"%d" % i for i in range(1200)]


async def test_a_call_never_exceeds_the_request_byte_limit() -> None:
    fake = FakeKinesis()
    limit = 1024 * 1024
    config = {"linger": 30.0, "aggregate": False, "max_request_bytes": limit, "max_record_bytes": limit}
    async with producer(fake, **config) as prod:
        await put_all(prod, [(bytes(300_000), f"key-{i}") for i in range(4)])
        await wait_until(lambda: len(fake.calls) == 1, timeout=5, what="a call once 1 MiB is queued")
        assert len(fake.calls[0]) == 3
    assert [len(call) for call in fake.calls] == [3, 1]  # the rest on close
    for call in fake.calls:
        assert sum(len(e.data) + len(e.partition_key) for e in call) <= limit


async def test_records_wait_for_the_linger_then_go_in_one_call() -> None:
    fake = FakeKinesis()
    loop = asyncio.get_running_loop()
    async with producer(fake, linger=0.05, aggregate=False) as prod:
        started = loop.time()
        handles = await put_all(prod, [(b"a", "k1"), (b"b", "k2"), (b"c", "k3")])
        await asyncio.gather(*handles)
        assert loop.time() - started >= 0.05
    assert [len(call) for call in fake.calls] == [3]


# -- back-pressure ----------------------------------------------------------------------------


async def test_put_waits_while_the_buffer_is_full_of_records() -> None:
    fake = FakeKinesis()
    fake.gate.clear()
    async with producer(fake, max_buffered_records=5, max_in_flight=1, aggregate=False, **FAST) as prod:
        handles = await put_all(prod, [(b"x", f"k{i}") for i in range(5)])
        await wait_until(lambda: len(fake.calls) == 1, timeout=5, what="the first call to be held")
        blocked = asyncio.create_task(prod.put(b"y", "k5"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not blocked.done()
        fake.gate.set()
        await asyncio.gather(*handles)
        sixth = await asyncio.wait_for(blocked, 5)
        assert (await sixth).shard_id.startswith("shardId-")


async def test_put_waits_while_the_buffer_is_full_of_bytes() -> None:
    fake = FakeKinesis()
    fake.gate.clear()
    config = {
        "max_record_bytes": 1024,
        "max_request_bytes": 1024,
        "max_buffered_bytes": 2048,
        "aggregation_max_bytes": 512,
    }
    async with producer(fake, max_in_flight=1, aggregate=False, **config, **FAST) as prod:
        await put_all(prod, [(bytes(1000), "a"), (bytes(1000), "b")])
        blocked = asyncio.create_task(prod.put(bytes(1000), "c"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not blocked.done()
        fake.gate.set()
        await asyncio.wait_for(blocked, 5)


# -- failures ---------------------------------------------------------------------------------


async def test_failed_entries_of_a_partial_failure_are_retried_until_written() -> None:
    fake = FakeKinesis()
    failed_once: set[bytes] = set()

    def fail(entry: PutRecordsEntry) -> str | None:
        if int(entry.data) % 3 == 0 and entry.data not in failed_once:
            failed_once.add(entry.data)
            return THROTTLED if int(entry.data) % 2 else "InternalFailure"
        return None

    fake.fail = fail
    async with producer(fake, aggregate=False, **FAST) as prod:
        handles = await put_all(prod, [(b"%d" % i, f"k{i % 7}") for i in range(100)])
        results = await asyncio.gather(*handles)
    assert len(failed_once) == 34
    assert sorted(int(entry.data) for _, _, entry in fake.written) == list(range(100))
    assert all(isinstance(result, PutResult) and result.sub_sequence_number is None for result in results)


async def test_a_non_retriable_error_code_fails_only_that_record() -> None:
    fake = FakeKinesis()
    fake.fail = lambda entry: "KMSAccessDeniedException" if entry.data == b"bad" else None
    async with producer(fake, aggregate=False, **FAST) as prod:
        good1 = await prod.put(b"good1", "k")
        bad = await prod.put(b"bad", "k")
        good2 = await prod.put(b"good2", "k")
        await prod.flush()
    with pytest.raises(RecordFailed) as caught:
        await bad
    assert caught.value.code == "KMSAccessDeniedException"
    assert caught.value.attempts == 1
    assert (await good1).shard_id == (await good2).shard_id
    assert [entry.data for _, _, entry in fake.written] == [b"good1", b"good2"]
    assert len(fake.calls) == 1  # never retried


async def test_retries_end_with_a_typed_error_after_max_attempts() -> None:
    fake = FakeKinesis()
    fake.fail = lambda entry: THROTTLED if entry.data == b"hot" else None
    async with producer(fake, aggregate=False, max_attempts=3, **FAST) as prod:
        hot = await prod.put(b"hot", "k")
        cool = await prod.put(b"cool", "k2")
        await prod.flush()
    with pytest.raises(RecordFailed) as caught:
        await hot
    assert (caught.value.code, caught.value.attempts) == (THROTTLED, 3)
    assert (await cool).sequence_number
    assert len(fake.calls) == 3


async def test_a_failed_call_is_retried_when_retriable_and_fails_its_records_otherwise() -> None:
    fake = FakeKinesis()
    fake.raises = [Throttled("slow down", operation="PutRecords", code="LimitExceededException")]
    async with producer(fake, aggregate=False, **FAST) as prod:
        assert (await (await prod.put(b"a", "k"))).sequence_number
        fake.raises = [
            ResourceNotFound("no stream", operation="PutRecords", code="ResourceNotFoundException")
        ]
        lost = await prod.put(b"b", "k")
        with pytest.raises(ResourceNotFound):
            await lost
        assert (await (await prod.put(b"c", "k"))).sequence_number  # the producer goes on
    assert [entry.data for _, _, entry in fake.written] == [b"a", b"c"]


@pytest.mark.parametrize("aggregate", [False, True])
async def test_ordered_keeps_each_keys_order_under_injected_failures(aggregate: bool) -> None:
    fake = FakeKinesis()
    chance = random.Random(7)
    fake.fail = lambda entry: THROTTLED if chance.random() < 0.3 else None
    records = [(b"%d" % i, f"key-{i % 9}") for i in range(600)]
    config = {"ordered": True, "aggregate": aggregate, "max_in_flight": 4, "max_attempts": 50, **FAST}
    async with producer(fake, **config) as prod:
        handles = await put_all(prod, records)
        await prod.flush()
    assert all(handle.done() and handle.exception() is None for handle in handles)
    per_key: dict[str, list[int]] = defaultdict(list)
    for record in fake.delivered():
        per_key[record.partition_key].append(int(record.data))
    assert sum(map(len, per_key.values())) == 600
    for key, numbers in per_key.items():
        assert numbers == sorted(numbers), key
        assert numbers == [i for i in range(600) if f"key-{i % 9}" == key]


# -- bad input and lifecycle ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "hash_key"),
    [
        (bytes(1024 * 1024), "k", None),  # data + key over 1 MiB
        (b"x", "", None),
        (b"x", "k" * 257, None),
        (b"x", "k", "-1"),
        (b"x", "k", "01"),
        (b"x", "k", "12a"),
        (b"x", "k", str(MAX_HASH_KEY + 1)),
        (b"x", "k", 5),
        ("text", "k", None),
        (b"x", 7, None),
    ],
)
async def test_bad_input_is_refused_at_put_and_loses_nothing_else(
    data: object, key: object, hash_key: object
) -> None:
    fake = FakeKinesis()
    async with producer(fake, **FAST) as prod:
        before = await prod.put(b"before", "k")
        with pytest.raises(RecordRejected):
            await prod.put(data, key, hash_key)  # type: ignore[arg-type]
        after = await prod.put(b"after", "k")
        await asyncio.gather(before, after)
    assert sorted(r.data for r in fake.delivered()) == [b"after", b"before"]


async def test_the_largest_record_and_explicit_hash_key_are_accepted() -> None:
    fake = FakeKinesis()
    async with producer(fake, **FAST) as prod:
        big = await prod.put(bytes(1024 * 1024 - 1), "k")
        edge = await prod.put(b"x", "k" * 256, str(MAX_HASH_KEY))
        zero = await prod.put(b"y", "z", "0")
        results = await asyncio.gather(big, edge, zero)
    assert [r.shard_id for r in results[1:]] == ["shardId-000000000003", "shardId-000000000000"]


async def test_close_flushes_and_later_puts_raise_closed_error() -> None:
    fake = FakeKinesis()
    prod = producer(fake, linger=30.0)
    handle = await prod.put(b"x", "k")
    await prod.aclose()
    assert handle.done()
    assert (await handle).sequence_number
    with pytest.raises(ClosedError):
        await prod.put(b"y", "k")
    await prod.aclose()  # idempotent
    with pytest.raises(ClosedError):
        await prod.start()


@pytest.mark.parametrize(
    "bad",
    [
        {"max_batch_records": 501},
        {"max_request_bytes": 11 * 1024 * 1024},
        {"max_record_bytes": 20 * 1024 * 1024},
        {"linger": -1},
        {"aggregation_max_bytes": 2 * 1024 * 1024},
        {"max_in_flight": 0},
        {"max_attempts": 0},
    ],
)
def test_producer_config_is_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ProducerConfig(**bad)  # type: ignore[arg-type]


# -- aggregation ------------------------------------------------------------------------------


async def test_small_records_are_aggregated_per_predicted_shard() -> None:
    fake = FakeKinesis(uniform_shards(4))
    records = [(b"payload-%d" % i, f"user-{i % 40}") for i in range(400)]
    async with producer(fake, **{**FAST, "linger": 30.0}) as prod:
        handles = await put_all(prod, records)
        big = await prod.put(bytes(60_000), "user-1")  # over the 51,200 B aggregate: sent alone
        await prod.flush()
    results = [await handle for handle in handles]
    aggregates = [entry for _, _, entry in fake.written if entry.data.startswith(MAGIC)]
    assert len(aggregates) == 4  # one per shard: 400 small records fit in 4 aggregates
    assert (await big).sub_sequence_number is None
    delivered = fake.delivered()
    assert sorted((r.data, r.partition_key) for r in delivered) == sorted(
        [*records, (bytes(60_000), "user-1")]
    )
    by_data = {r.data: r for r in delivered}
    for (data, _), result in zip(records, results, strict=True):
        record = by_data[data]
        assert (record.shard_id, record.sequence_number, record.sub_sequence_number) == result
    assert fake.list_calls == 1


async def test_a_reshard_refreshes_the_map_and_resends_records_outside_the_landing_shard() -> None:
    fake = FakeKinesis(uniform_shards(1))
    async with producer(fake, **FAST) as prod:
        first = await put_all(prod, [(b"a%d" % i, f"user-{i}") for i in range(50)])
        await asyncio.gather(*first)
        fake.split_all()  # the producer's map still has the one parent shard
        records = [(b"b%d" % i, f"user-{i}") for i in range(50)]
        second = await put_all(prod, records)
        results = await asyncio.gather(*second)
        assert fake.list_calls == 2
        third = await put_all(prod, [(b"c%d" % i, f"user-{i}") for i in range(50)])
        await asyncio.gather(*third)
    assert fake.list_calls == 2  # the refreshed map predicted the children
    delivered = fake.delivered()
    assert sorted(r.data for r in delivered) == sorted(
        b"%s%d" % (p, i) for p in (b"a", b"b", b"c") for i in range(50)
    )
    by_data = {r.data: r for r in delivered}
    for (data, _), result in zip(records, results, strict=True):
        record = by_data[data]
        assert (record.shard_id, record.sequence_number, record.sub_sequence_number) == result
    assert {r.shard_id for r in delivered if r.data.startswith(b"c")} == {
        "shardId-000000000001",
        "shardId-000000000002",
    }


# -- the sync facade --------------------------------------------------------------------------


def test_the_sync_producer_runs_the_async_core_on_its_own_loop_thread() -> None:
    fake = FakeKinesis()
    config = ProducerConfig(linger=30.0, aggregate=False)
    with Producer("orders", client=fake, config=config) as prod:
        futures = [prod.put(b"%d" % i, f"k{i}") for i in range(10)]
        with pytest.raises(RecordRejected):
            prod.put(b"x", "")
        prod.flush(timeout=10)
        assert all(future.done() for future in futures)
        assert futures[0].result().sequence_number
        last = prod.put(b"last", "k")
    assert last.result(timeout=0).sequence_number  # close flushed it
    with pytest.raises(ClosedError):
        prod.put(b"late", "k")
    prod.close()  # idempotent
    assert sorted(entry.data for _, _, entry in fake.written) == sorted(
        [b"last", *(b"%d" % i for i in range(10))]
    )


def test_a_sync_put_that_fails_sets_the_futures_exception() -> None:
    fake = FakeKinesis()
    fake.fail = lambda entry: "KMSAccessDeniedException"
    with Producer("orders", client=fake, config=ProducerConfig(**FAST)) as prod:  # type: ignore[arg-type]
        future = prod.put(b"x", "k")
        with pytest.raises(RecordFailed):
            future.result(timeout=10)


def test_ordered_composition_puts_a_key_in_one_entry_per_call() -> None:
    """A key whose records go to two shards (explicit hash keys) or overflow an aggregate waits
    for the next call rather than travel in two entries that could fail apart."""
    shards = ShardMap(uniform_shards(2))
    config = ProducerConfig(aggregation_max_bytes=1024)
    loop = asyncio.new_event_loop()
    try:

        def pending(data: bytes, key: str, hash_key: str | None = None) -> Pending:
            hashed = effective_hash_key(key, hash_key)
            return Pending(data, key, hash_key, hashed, len(data) + len(key), loop.create_future(), 0.0)

        low, high = "0", str(MAX_HASH_KEY)
        queue = deque([pending(b"1", "k", low), pending(b"2", "k", high), pending(b"3", "other", high)])
        entries, _ = compose(queue, config=config, shards=shards, holds=Counter(), room=(500, 1 << 20))
        assert [[r.data for r in e.records] for e in entries] == [[b"1"], [b"3"]]
        assert [r.data for r in queue] == [b"2"]
        queue = deque([pending(bytes(600), "k"), pending(bytes(600), "k"), pending(b"x", "j")])
        entries, _ = compose(queue, config=config, shards=shards, holds=Counter(), room=(500, 1 << 20))
        assert sorted(len(e.records) for e in entries) == [1, 1]
        assert [len(r.data) for r in queue] == [600]
        held = Counter({"k": 1})
        queue = deque([pending(b"a", "k"), pending(b"b", "j")])
        entries, _ = compose(queue, config=config, shards=shards, holds=held, room=(500, 1 << 20))
        assert [[r.data for r in e.records] for e in entries] == [[b"b"]]
    finally:
        loop.close()

"""Polling within Kinesis's per-shard read quotas and one process-wide prefetch byte budget.

Everything runs on the virtual-time loop (deterministic, instant) against FakeKinesis with its
quota enforcement on: any call that Kinesis would have throttled is counted.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import pytest

from kinesis_butler import AsyncConsumer, ConsumerConfig
from kinesis_butler.errors import AwsError, ConfigError, ServiceUnavailable, Throttled
from kinesis_butler.models import TRIM_HORIZON, ExtendedSequenceNumber, Record, StartPosition
from kinesis_butler.retrieval.budget import ByteBudget, process_budget, record_cost
from kinesis_butler.retrieval.kpl import partition_key_hash
from kinesis_butler.retrieval.polling import PollingSource
from kinesis_butler.retrieval.quota import ShardPacer, pacer_for
from kinesis_butler.stores.memory import MemoryBacking, MemoryLeaseStore
from kinesis_butler.testing.fake import FakeKinesis
from kinesis_butler.testing.virtual_time import run_simulation
from tests.helpers import wait_until

CONFIG = ConsumerConfig(idle_poll_interval=1.0, min_poll_interval=0.01)


def _fill(fake: FakeKinesis, stream: str, count: int, size: int = 100, key: str = "k") -> list[Record]:
    return [fake.put(stream, bytes(size), f"{key}{i % 7}") for i in range(count)]


async def _drain(source: PollingSource, count: int) -> list[Record]:
    got: list[Record] = []
    while len(got) < count:
        got.extend((await source.next_batch()).records)
    return got


# -- the pacer -------------------------------------------------------------------------------------


def test_the_pacer_spaces_calls_and_waits_for_bytes() -> None:
    async def main() -> list[float]:
        pacer = ShardPacer(calls_per_second=5.0, bytes_per_second=2 * 1024 * 1024)
        starts = [await pacer.wait() for _ in range(3)]
        pacer.received(starts[-1], 4 * 1024 * 1024)  # 4 MiB: the shard is spent for 2 s
        starts.append(await pacer.wait())
        pacer.hold_off(3.0)  # throttled: nobody calls for 3 s
        starts.append(await pacer.wait())
        return starts

    starts = run_simulation(main)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    assert gaps == [0.2, 0.2, 2.0, 3.0]


def test_readers_of_one_shard_in_a_process_share_one_pacer() -> None:
    async def main() -> tuple[bool, bool, int]:
        first = pacer_for("s", "shard-1", 5.0, 1e6)
        second = pacer_for("s", "shard-1", 2.5, 2e6)  # a second app asking for less: slower wins
        other = pacer_for("s", "shard-2")
        shared = first.pacer is second.pacer and first.pacer.min_interval == 0.4
        first.release()
        second.release()
        third = pacer_for("s", "shard-1")
        fresh = third.pacer is not first.pacer  # the last release dropped the entry
        third.release()
        other.release()
        from kinesis_butler.retrieval import quota

        return shared, fresh, len(quota._pacers)

    assert run_simulation(main) == (True, True, 0)


# -- polling within the quota ----------------------------------------------------------------------


def test_two_sources_on_one_shard_never_exceed_five_calls_a_second() -> None:
    fake = FakeKinesis(enforce_read_quota=True)
    fake.create_stream("s", 1)
    _fill(fake, "s", 3_000)

    async def main() -> tuple[int, int]:
        config = ConsumerConfig(min_poll_interval=0.01, idle_poll_interval=0.05, max_records=100)
        sources = [
            PollingSource(fake, "s", "shardId-000000000000", config, StartPosition()) for _ in range(2)
        ]
        for source in sources:
            await source.start(TRIM_HORIZON)
        got = await asyncio.gather(*(_drain(source, 3_000) for source in sources))
        for source in sources:
            await source.aclose()
        return len(got[0]), len(got[1])

    assert run_simulation(main) == (3_000, 3_000)
    assert fake.throttled == 0
    times = [at for at, _, _ in fake.read_log]
    assert len(times) >= 60  # 2 x 30 calls of 100 records
    assert all(b - a >= 0.2 - 1e-6 for a, b in itertools.pairwise(times))


def test_a_shard_is_read_no_faster_than_two_mib_a_second() -> None:
    fake = FakeKinesis(enforce_read_quota=True)
    fake.create_stream("s", 1)
    _fill(fake, "s", 400, size=100_000)  # 40 MB, ~38 MiB

    async def main() -> float:
        source = PollingSource(fake, "s", "shardId-000000000000", CONFIG, StartPosition())
        loop = asyncio.get_running_loop()
        started = loop.time()
        await source.start(TRIM_HORIZON)
        await _drain(source, 400)
        await source.aclose()
        return loop.time() - started

    elapsed = run_simulation(main)
    assert fake.throttled == 0
    mib = 400 * 100_001 / 2**20
    last_bytes = fake.read_log[-1][2] / 2**20
    assert elapsed >= (mib - last_bytes) / 2 - 0.01  # paced by bytes, not calls
    assert elapsed <= mib / 2 + 1.0  # and not slower than the quota allows


def test_read_quota_share_splits_the_shard_between_apps() -> None:
    fake = FakeKinesis(enforce_read_quota=True)
    fake.create_stream("s", 1)
    _fill(fake, "s", 200)

    async def main() -> None:
        half = ConsumerConfig(
            min_poll_interval=0.01, idle_poll_interval=0.05, max_records=10, read_quota_share=0.5
        )
        source = PollingSource(fake, "s", "shardId-000000000000", half, StartPosition())
        await source.start(TRIM_HORIZON)
        await _drain(source, 200)
        await source.aclose()

    run_simulation(main)
    times = [at for at, _, _ in fake.read_log]
    assert all(b - a >= 0.4 - 1e-6 for a, b in itertools.pairwise(times))


def test_throttling_backs_off_with_jitter_and_loses_nothing() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 50)
    for _ in range(6):
        fake.fail_next("get_records", Throttled("Rate exceeded", operation="GetRecords"))
    fake.fail_next("get_records", ServiceUnavailable("InternalFailure", operation="GetRecords"))

    async def main() -> list[Record]:
        source = PollingSource(fake, "s", "shardId-000000000000", CONFIG, StartPosition())
        await source.start(TRIM_HORIZON)
        got = await _drain(source, 50)
        await source.aclose()
        return got

    got = run_simulation(main, seed=3)
    assert [r.sequence_number for r in got] == sorted({r.sequence_number for r in got})
    assert len(got) == 50
    times = [at for at, _, _ in fake.read_log]
    assert times[0] > 0.2  # seven failures cost backoff time before the first answer


def test_storms_of_throttling_and_5xx_answers_are_ridden_out() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 20)
    for i in range(40):
        error = Throttled if i % 2 else ServiceUnavailable
        fake.fail_next("get_records", error("storm", operation="GetRecords"))

    async def main() -> tuple[list[Record], float]:
        source = PollingSource(fake, "s", "shardId-000000000000", CONFIG, StartPosition())
        await source.start(TRIM_HORIZON)
        got = await _drain(source, 20)
        await source.aclose()
        return got, asyncio.get_running_loop().time()

    got, elapsed = run_simulation(main, seed=5)
    assert len(got) == 20
    assert elapsed < 40 * 5.0  # each back-off is capped at 5 s


def test_a_few_unreadable_answers_are_retried_and_more_are_reported() -> None:
    def malformed() -> AwsError:
        return AwsError("malformed GetRecords response", operation="GetRecords", code="MalformedResponse")

    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 5)
    for _ in range(4):
        fake.fail_next("get_records", malformed())

    async def recovers() -> int:
        source = PollingSource(fake, "s", "shardId-000000000000", CONFIG, StartPosition())
        await source.start(TRIM_HORIZON)
        got = await _drain(source, 5)
        await source.aclose()
        return len(got)

    assert run_simulation(recovers) == 5
    for _ in range(5):
        fake.fail_next("get_records", malformed())

    async def gives_up() -> str:
        source = PollingSource(fake, "s", "shardId-000000000000", CONFIG, StartPosition())
        await source.start(TRIM_HORIZON)
        try:
            await source.next_batch()
        except AwsError as exc:
            return str(exc)
        finally:
            await source.aclose()
        return "no error"

    message = run_simulation(gives_up)
    assert "shardId-000000000000: 5 GetRecords answers in a row could not be read" in message


def test_records_larger_than_the_whole_budget_still_flow_one_at_a_time() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    _fill(fake, "s", 6, size=3 * 1024 * 1024)

    async def main() -> tuple[int, int]:
        budget = ByteBudget(1024 * 1024)
        source = PollingSource(fake, "s", "shardId-000000000000", CONFIG, StartPosition(), budget=budget)
        await source.start(TRIM_HORIZON)
        got = await _drain(source, 6)
        await source.aclose()
        return len(got), budget.high_water

    count, high_water = run_simulation(main)
    assert count == 6
    assert high_water <= 2 * (3 * 1024 * 1024 + 400)  # the batch in hand and at most one fetched


def test_idle_polling_backs_off_but_delivers_within_one_idle_interval() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)

    async def main() -> tuple[int, float]:
        config = ConsumerConfig(min_poll_interval=0.2, idle_poll_interval=1.0)
        source = PollingSource(fake, "s", "shardId-000000000000", config, StartPosition())
        loop = asyncio.get_running_loop()
        await source.start(TRIM_HORIZON)
        await asyncio.sleep(30)  # 30 idle seconds
        idle_calls = len(fake.read_log)
        written = loop.time()
        fake.put("s", b"x", "k")
        await source.next_batch()
        latency = loop.time() - written
        await source.aclose()
        return idle_calls, latency

    idle_calls, latency = run_simulation(main)
    assert 28 <= idle_calls <= 35  # about one call a second once idle, not five
    assert latency <= 1.0 + 1e-6


# -- the byte budget -------------------------------------------------------------------------------


def test_the_budget_grants_fair_shares_and_waits_when_full() -> None:
    async def main() -> list[object]:
        budget = ByteBudget(1000)
        for _ in range(4):
            budget.register()
        first = await budget.acquire(10_000, minimum=100)  # capped at the fair share
        others = [await budget.acquire(10_000, minimum=100) for _ in range(3)]
        blocked = asyncio.ensure_future(budget.acquire(300, minimum=100))
        await asyncio.sleep(0)
        waiting = not blocked.done()
        budget.release(first)
        granted = await blocked
        return [first, others, waiting, granted, budget.used, budget.high_water]

    assert run_simulation(main) == [250, [250, 250, 250], True, 250, 1000, 1000]


def test_a_record_larger_than_the_budget_still_gets_through_alone() -> None:
    async def main() -> tuple[int, bool]:
        budget = ByteBudget(1000)
        budget.register()
        big = await budget.acquire(5000, minimum=5000)
        second = asyncio.ensure_future(budget.acquire(10, minimum=10))
        await asyncio.sleep(0)
        waited = not second.done()
        budget.release(big)
        await second
        return big, waited

    assert run_simulation(main) == (5000, True)


def test_a_cancelled_waiter_neither_leaks_nor_blocks_the_next() -> None:
    async def main() -> int:
        budget = ByteBudget(100)
        budget.register()
        held = await budget.acquire(100, minimum=100)
        cancelled = asyncio.ensure_future(budget.acquire(50, minimum=50))
        patient = asyncio.ensure_future(budget.acquire(50, minimum=50))
        await asyncio.sleep(0)
        cancelled.cancel()
        budget.release(held)
        await patient
        return budget.used

    assert run_simulation(main) == 50


def _keys_per_shard(fake: FakeKinesis, stream: str, shards: int) -> list[str]:
    """One partition key landing in each shard (the fake routes by MD5 like Kinesis)."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < shards:
        key = f"key-{n}"
        found.setdefault(partition_key_hash(key) * shards >> 128, key)
        n += 1
    return [found[i] for i in range(shards)]


def test_many_shards_stay_within_the_budget() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 40)
    for key in _keys_per_shard(fake, "s", 40):
        for _ in range(50):
            fake.put("s", bytes(20_000), key)
    limit = 1024 * 1024

    async def main() -> tuple[int, int]:
        budget = ByteBudget(limit)
        config = ConsumerConfig(min_poll_interval=0.01, idle_poll_interval=0.05)
        sources = [
            PollingSource(fake, "s", f"shardId-{i:012d}", config, StartPosition(), budget=budget)
            for i in range(40)
        ]
        for source in sources:
            await source.start(TRIM_HORIZON)
        counts = await asyncio.gather(*(_slow_drain(source, 50) for source in sources))
        for source in sources:
            await source.aclose()
        return sum(counts), budget.high_water

    total, high_water = run_simulation(main)
    assert total == 40 * 50
    one_record = record_cost([Record(bytes(20_000), "key-xx", "1")])
    # A grant is trued up after the answer arrives: the overshoot is at most one record.
    assert high_water <= limit + one_record


async def _slow_drain(source: PollingSource, count: int) -> int:
    got = 0
    while got < count:
        batch = await source.next_batch()
        got += len(batch.records)
        await asyncio.sleep(0.5)  # virtual: a slow processor keeps its batch charged meanwhile
    return got


def test_process_budget_is_one_per_loop_and_the_largest_limit_wins() -> None:
    async def main() -> tuple[bool, int]:
        first = process_budget(8 * 1024 * 1024)
        second = process_budget(16 * 1024 * 1024)
        return first is second, second.limit

    assert run_simulation(main) == (True, 16 * 1024 * 1024)


def test_budget_bytes_are_returned_when_sources_close() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 4)
    for i in range(400):
        fake.put("s", bytes(1000), f"k{i}")

    async def main() -> tuple[int, int]:
        budget = ByteBudget(64 * 1024 * 1024)
        sources = [
            PollingSource(fake, "s", f"shardId-{i:012d}", CONFIG, StartPosition(), budget=budget)
            for i in range(4)
        ]
        for source in sources:
            await source.start(TRIM_HORIZON)
        await asyncio.gather(*(source.next_batch() for source in sources))
        await asyncio.sleep(2)
        held = budget.used
        for source in sources:
            await source.aclose()
        return held, budget.used

    held, after = run_simulation(main)
    assert held > 0
    assert after == 0


# -- start positions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("at_sequence_number:{seq}", 10), ("AFTER_SEQUENCE_NUMBER:{seq}", 11)],
)
def test_a_shard_starts_at_or_after_a_sequence_number(text: str, expected: int) -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    records = _fill(fake, "s", 20)

    async def main() -> list[Record]:
        got: list[Record] = []
        consumer = AsyncConsumer(
            "s",
            "app",
            got.extend,
            store=MemoryLeaseStore("app", backing=MemoryBacking()),
            client=fake,
            shard_start_at={"shardId-000000000000": text.format(seq=records[10].sequence_number)},
            config=ConsumerConfig(failover_time=1.0, min_poll_interval=0.01, idle_poll_interval=0.05),
        )
        runner = asyncio.ensure_future(consumer.run())
        await wait_until(lambda: len(got) >= 20 - expected, timeout=60)
        await consumer.stop()
        await runner
        return got

    got = run_simulation(main)
    assert [r.sequence_number for r in got] == [r.sequence_number for r in records[expected:]]


def test_a_stream_wide_sequence_start_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="per shard"):
        AsyncConsumer("s", "app", lambda records: None, store="memory://", start_at="at_sequence_number:1")
    with pytest.raises(ConfigError, match="not a sequence number"):
        StartPosition.parse("after_sequence_number:abc")
    position = StartPosition.parse("after_sequence_number:42")
    assert position.sentinel == TRIM_HORIZON
    assert position.sequence_number == "42"


def test_a_checkpoint_wins_over_a_per_shard_start() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    records = _fill(fake, "s", 10)

    async def main() -> list[Record]:
        source = PollingSource(
            fake,
            "s",
            "shardId-000000000000",
            CONFIG,
            StartPosition.parse(f"at_sequence_number:{records[2].sequence_number}"),
        )
        await source.start(ExtendedSequenceNumber(records[6].sequence_number))
        got = await _drain(source, 3)
        await source.aclose()
        return got

    got = run_simulation(main)
    assert [r.sequence_number for r in got] == [r.sequence_number for r in records[7:]]


def test_config_rejects_bad_quota_and_budget_values() -> None:
    with pytest.raises(ConfigError, match="read_quota_share"):
        ConsumerConfig(read_quota_share=0)
    with pytest.raises(ConfigError, match="prefetch_budget_bytes"):
        ConsumerConfig(prefetch_budget_bytes=1000)
    with pytest.raises(ConfigError, match="shard_read_calls_per_second"):
        ConsumerConfig(shard_read_calls_per_second=0)


def test_the_fake_throttles_like_kinesis() -> None:
    # Guard for the tests above: the fake's quota check really throttles a too-fast reader.
    fake = FakeKinesis(enforce_read_quota=True)
    fake.create_stream("s", 2)
    key = _keys_per_shard(fake, "s", 2)[1]
    for _ in range(42):
        fake.put("s", bytes(100_000), key)  # 4.2 MB in the second shard

    async def main() -> tuple[int, int]:
        empty = await fake.get_shard_iterator("s", "shardId-000000000000", "TRIM_HORIZON")
        by_calls = 0
        for _ in range(7):  # seven calls in one instant on an empty shard: two too many
            try:
                await fake.get_records(empty)
            except Throttled:
                by_calls += 1
        full = await fake.get_shard_iterator("s", "shardId-000000000001", "TRIM_HORIZON")
        await fake.get_records(full)
        await asyncio.sleep(1.0)  # 4 MiB read: the shard is spent for 2 s, not 1
        try:
            await fake.get_records(full)
        except Throttled:
            return by_calls, 1
        return by_calls, 0

    assert run_simulation(main) == (2, 1)
    assert Counter(shard for _, shard, _ in fake.read_log) == {
        "shardId-000000000000": 5,
        "shardId-000000000001": 1,
    }


def test_a_stopped_consumer_leaves_the_process_budget_and_pacers_empty() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 4)
    for i in range(400):
        fake.put("s", bytes(1000), f"k{i}")

    async def main() -> tuple[int, int, int]:
        from kinesis_butler.retrieval import quota

        got: list[Record] = []
        consumer = AsyncConsumer(
            "s",
            "app",
            got.extend,
            store=MemoryLeaseStore("app", backing=MemoryBacking()),
            client=fake,
            config=ConsumerConfig(failover_time=1.0, min_poll_interval=0.01, idle_poll_interval=0.05),
        )
        runner = asyncio.ensure_future(consumer.run())
        await wait_until(lambda: len(got) >= 400, timeout=60)
        await asyncio.sleep(3)  # idle polls in flight, waiting in the pacer or for the budget
        await consumer.stop()
        await runner
        budget = process_budget(1)
        return budget.used, budget.sources, len(quota._pacers)

    assert run_simulation(main) == (0, 0, 0)

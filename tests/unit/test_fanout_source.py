"""FanOutSource: subscriptions resumed from continuation numbers, shard end, refusals, fallback.

An in-process subscriber over FakeKinesis's records stands in for SubscribeToShard (the wire
format and HTTP/2 are tested in test_subscribe_to_shard.py / test_http2.py and against the
emulator); it runs on the virtual-time loop, so backoffs cost no wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections import deque
from collections.abc import AsyncIterator, Sequence

import pytest

from kinesis_butler import AsyncConsumer, ConsumerConfig
from kinesis_butler.errors import AccessDenied, ResourceInUse, Throttled
from kinesis_butler.models import TRIM_HORIZON, ExtendedSequenceNumber, Record, StartPosition
from kinesis_butler.retrieval.fanout import FanOutSource
from kinesis_butler.retrieval.kpl import aggregate
from kinesis_butler.retrieval.polling import PollingSource
from kinesis_butler.stores.memory import MemoryBacking, MemoryLeaseStore
from kinesis_butler.testing.fake import FakeKinesis
from kinesis_butler.testing.virtual_time import run_simulation
from tests.helpers import wait_until

SHARD = "shardId-000000000000"
CONFIG = ConsumerConfig(min_poll_interval=0.01, idle_poll_interval=0.05)


@dataclasses.dataclass
class _Child:
    shard_id: str
    parent_shards: Sequence[str]


@dataclasses.dataclass
class _Event:
    records: list[Record]
    continuation_sequence_number: str | None
    millis_behind_latest: int = 0
    child_shards: Sequence[_Child] = ()


class FakeSubscriber:
    """SubscribeToShard over FakeKinesis: ``per_event`` records an event, ``events_per_subscription``
    events, then the subscription ends (as after 5 minutes). ``refusals`` are raised by the next
    subscriptions, in order."""

    def __init__(self, fake: FakeKinesis, *, per_event: int = 10, events_per_subscription: int = 3) -> None:
        self.fake = fake
        self.per_event = per_event
        self.events_per_subscription = events_per_subscription
        self.refusals: deque[BaseException] = deque()
        self.calls: list[tuple[float, str, str | None]] = []  # (time, position type, sequence)

    @contextlib.asynccontextmanager
    async def subscribe_to_shard(
        self,
        consumer_arn: str,
        shard_id: str,
        starting_position_type: str,
        *,
        sequence_number: str | None = None,
        timestamp: float | None = None,
    ) -> AsyncIterator[AsyncIterator[_Event]]:
        del consumer_arn, timestamp
        self.calls.append((asyncio.get_running_loop().time(), starting_position_type, sequence_number))
        if self.refusals:
            raise self.refusals.popleft()
        iterator = await self.fake.get_shard_iterator(
            "s", shard_id, starting_position_type, sequence_number=sequence_number
        )
        yield self._events(iterator)

    async def _events(self, iterator: str) -> AsyncIterator[_Event]:
        for _ in range(self.events_per_subscription):
            page = await self.fake.get_records(iterator, limit=self.per_event)
            if page.next_shard_iterator is None:
                children = [_Child(c.shard_id, c.parent_shards) for c in page.child_shards]
                yield _Event(page.records, None, 0, children)
                return
            iterator = page.next_shard_iterator
            index = int(iterator.rsplit("|", 1)[1])
            entry = self.fake._streams["s"][SHARD]
            continuation = entry.records[index - 1].sequence_number if index else "0"
            yield _Event(page.records, continuation)
            await asyncio.sleep(0.01)


def _source(subscriber: FakeSubscriber, fake: FakeKinesis, **kwargs: object) -> FanOutSource:
    return FanOutSource(
        subscriber,
        "s",
        SHARD,
        consumer_arn="arn:aws:kinesis:us-east-1:1:stream/s/consumer/app:1",
        config=CONFIG,
        start_position=StartPosition(),
        fallback=lambda: PollingSource(fake, "s", SHARD, CONFIG, StartPosition()),
        **kwargs,  # type: ignore[arg-type]
    )


async def _read(source: FanOutSource, count: int) -> list[Record]:
    got: list[Record] = []
    while len(got) < count:
        got.extend((await source.next_batch()).records)
    return got


def _stream(records: int) -> FakeKinesis:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    for i in range(records):
        fake.put("s", f"{i}".encode(), "k")
    return fake


def test_subscriptions_resume_from_the_continuation_without_loss_or_repeats() -> None:
    fake = _stream(100)
    subscriber = FakeSubscriber(fake, per_event=7, events_per_subscription=2)

    async def main() -> list[Record]:
        source = _source(subscriber, fake)
        await source.start(TRIM_HORIZON)
        got = await _read(source, 100)
        await source.aclose()
        return got

    got = run_simulation(main)
    assert [int(r.data) for r in got] == list(range(100))
    assert {r.shard_id for r in got} == {SHARD}
    kinds = [kind for _, kind, _ in subscriber.calls]
    assert kinds[0] == "TRIM_HORIZON"
    assert set(kinds[1:]) == {"AFTER_SEQUENCE_NUMBER"}
    times = [at for at, _, _ in subscriber.calls]
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(times))  # 1 call/s


def test_a_checkpoint_resumes_at_the_sequence_and_skips_what_was_processed() -> None:
    fake = _stream(20)
    records = fake._streams["s"][SHARD].records
    subscriber = FakeSubscriber(fake)

    async def main() -> list[Record]:
        source = _source(subscriber, fake)
        await source.start(ExtendedSequenceNumber(records[11].sequence_number))
        got = await _read(source, 8)
        await source.aclose()
        return got

    got = run_simulation(main)
    assert [int(r.data) for r in got] == list(range(12, 20))
    assert subscriber.calls[0][1:] == ("AT_SEQUENCE_NUMBER", records[11].sequence_number)


def test_a_restart_resumes_inside_an_aggregated_record() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 1)
    blob = aggregate([(f"{i}".encode(), "k", None) for i in range(10)])
    parent = fake.put("s", blob, "k")
    fake.put("s", b"after", "k")
    subscriber = FakeSubscriber(fake)

    async def main() -> list[Record]:
        source = _source(subscriber, fake)
        await source.start(ExtendedSequenceNumber(parent.sequence_number, 6))
        got = await _read(source, 4)
        await source.aclose()
        return got

    got = run_simulation(main)
    assert [(r.data, r.sub_sequence_number) for r in got] == [(b"7", 7), (b"8", 8), (b"9", 9), (b"after", 0)]


def test_resource_in_use_and_throttling_are_retried_with_backoff() -> None:
    fake = _stream(30)
    subscriber = FakeSubscriber(fake)
    subscriber.refusals.extend(
        [
            ResourceInUse("another subscription is open", operation="SubscribeToShard"),
            Throttled("LimitExceededException", operation="SubscribeToShard"),
        ]
    )

    async def main() -> list[Record]:
        source = _source(subscriber, fake)
        await source.start(TRIM_HORIZON)
        got = await _read(source, 30)
        await source.aclose()
        return got

    got = run_simulation(main, seed=1)
    assert [int(r.data) for r in got] == list(range(30))
    first, second, third = (at for at, _, _ in subscriber.calls[:3])
    assert second - first >= 2.5  # ResourceInUse: a subscription is < 5 s old, wait at least half
    assert third > second
    assert subscriber.calls[2][1] == "TRIM_HORIZON"  # nothing delivered yet: same position


def test_shard_end_during_a_subscription_ends_the_source_with_its_children() -> None:
    fake = _stream(15)
    left, right = fake.split("s", SHARD)
    subscriber = FakeSubscriber(fake, per_event=10, events_per_subscription=5)

    async def main() -> list[object]:
        source = _source(subscriber, fake)
        await source.start(TRIM_HORIZON)
        batches = []
        while True:
            batch = await source.next_batch()
            batches.append(batch)
            if batch.shard_end:
                break
        await source.aclose()
        return batches

    batches = run_simulation(main)
    last = batches[-1]
    assert sum(len(b.records) for b in batches) == 15
    assert last.child_shard_ids == (left, right)
    assert last.child_parents == ((left, (SHARD,)), (right, (SHARD,)))


def test_without_fan_out_the_shard_falls_back_to_polling_from_where_it_was() -> None:
    fake = _stream(40)
    subscriber = FakeSubscriber(fake, per_event=10, events_per_subscription=2)
    denied = AccessDenied("not authorized to perform kinesis:SubscribeToShard", operation="SubscribeToShard")

    async def main() -> list[Record]:
        source = _source(subscriber, fake)
        await source.start(TRIM_HORIZON)
        got = await _read(source, 20)  # the first subscription
        subscriber.refusals.append(denied)
        got += await _read(source, 20)  # by polling, after the last delivered record
        await source.aclose()
        return got

    got = run_simulation(main)
    assert [int(r.data) for r in got] == list(range(40))
    assert len(subscriber.calls) == 2  # the refused subscription was the last: polling took over


def test_prefetched_events_are_charged_to_the_budget_and_returned() -> None:
    fake = _stream(50)
    subscriber = FakeSubscriber(fake, per_event=10, events_per_subscription=10)

    async def main() -> tuple[int, int]:
        from kinesis_butler.retrieval.budget import ByteBudget

        budget = ByteBudget(1024 * 1024)
        source = _source(subscriber, fake, budget=budget)
        await source.start(TRIM_HORIZON)
        await source.next_batch()
        await wait_until(lambda: not source._queue.empty(), what="the next event queued")
        held = budget.used
        await source.aclose()
        return held, budget.used

    held, after = run_simulation(main)
    assert held > 0
    assert after == 0


class _RefusingFanOut(FakeKinesis):
    """A client with the fan-out API whose registration is refused (no permission)."""

    def __init__(self) -> None:
        super().__init__()
        self.registrations = 0

    async def ensure_stream_consumer(self, stream_arn: str, name: str) -> object:
        self.registrations += 1
        raise AccessDenied(
            "not authorized: kinesis:RegisterStreamConsumer", operation="RegisterStreamConsumer"
        )

    def subscribe_to_shard(self, *args: object, **kwargs: object) -> object:
        raise AssertionError("no subscription without a registered consumer")


@pytest.mark.parametrize("client_kind", ["no fan-out API", "registration refused"])
def test_a_fan_out_app_polls_where_fan_out_is_unavailable(
    client_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeKinesis() if client_kind == "no fan-out API" else _RefusingFanOut()
    fake.create_stream("s", 2)
    for i in range(40):
        fake.put("s", f"{i}".encode(), f"k{i}")

    async def main() -> list[Record]:
        got: list[Record] = []
        consumer = AsyncConsumer(
            "s",
            "app",
            got.extend,
            store=MemoryLeaseStore("app", backing=MemoryBacking()),
            client=fake,
            config=ConsumerConfig(
                failover_time=1.0, min_poll_interval=0.01, idle_poll_interval=0.05, retrieval="fanout"
            ),
        )
        runner = asyncio.ensure_future(consumer.run())
        await wait_until(lambda: len(got) >= 40, timeout=60)
        await consumer.stop()
        await runner
        assert consumer.sources.fanout == {"s": None}
        return got

    got = run_simulation(main)
    assert sorted(int(r.data) for r in got) == list(range(40))
    assert "polling instead" in caplog.text
    if isinstance(fake, _RefusingFanOut):
        assert fake.registrations == 1  # refused for good: not retried

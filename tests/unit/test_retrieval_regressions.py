"""Regression tests from a review of the retrieval layer: polling, fan-out's fallback, the
process-wide prefetch budget, the per-shard pacer, and shard ends.

Each test names the guarantee it keeps. Most run on the virtual-time loop against FakeKinesis
(deterministic; their sleeps cost no wall time). The two that run a whole consumer do so in real
time and wait on conditions; the throttling one talks to a local aiohttp server, so that what
goes over the wire is what is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from kinesis_butler import AsyncConsumer, ConsumerConfig
from kinesis_butler.aws import AwsCredentials, KinesisClient, TransportOptions
from kinesis_butler.errors import AccessDenied
from kinesis_butler.models import TRIM_HORIZON, Record, StartPosition
from kinesis_butler.retrieval.budget import ByteBudget
from kinesis_butler.retrieval.fanout import FanOutSource
from kinesis_butler.retrieval.kpl import aggregate, partition_key_hash
from kinesis_butler.retrieval.polling import PollingSource
from kinesis_butler.stores import MemoryBacking, MemoryLeaseStore
from kinesis_butler.testing.fake import FakeChildShard, FakeGetRecords, FakeKinesis
from kinesis_butler.testing.virtual_time import run_simulation
from tests.helpers import Collector, consume_until, wait_until

SHARD = "shardId-000000000000"
# Polling at Kinesis's own pace: 5 calls a second when busy, one a second when idle.
PACED = ConsumerConfig(min_poll_interval=0.2, idle_poll_interval=1.0)
# Whole consumers in real time: fast polling, lease taking and shard discovery.
FAST = ConsumerConfig(
    failover_time=1.0,
    idle_poll_interval=0.01,
    min_poll_interval=0.001,
    shard_read_calls_per_second=1000.0,
    shard_sync_interval=0.05,
    take_interval=0.05,
)


def _stream(records: int = 0, *, enforce_read_quota: bool = False) -> FakeKinesis:
    """Stream "s" of one shard with ``records`` small records (``b"0"``, ``b"1"``...)."""
    fake = FakeKinesis(enforce_read_quota=enforce_read_quota)
    fake.create_stream("s", 1)
    for i in range(records):
        fake.put("s", f"{i}".encode(), "k")
    return fake


def _key_hashing_into(low: int, high: int) -> str:
    """A partition key whose hash key (MD5, as Kinesis routes) is in ``low..high``."""
    return next(
        key for key in (f"key-{i}" for i in itertools.count()) if low <= partition_key_hash(key) <= high
    )


async def _count(source: PollingSource, records: int, *, pause: float = 0.0) -> int:
    """Take batches until ``records`` records came; ``pause`` is a processor's time per batch
    (the batch stays charged to the budget meanwhile)."""
    got = 0
    while got < records:
        got += len((await source.next_batch()).records)
        if pause:
            await asyncio.sleep(pause)
    return got


# -- shard ends ------------------------------------------------------------------------------------


async def test_a_trimmed_parent_ends_and_its_children_are_read() -> None:
    """A closed parent shard whose records all expired while the app was down (longer than the
    retention period, across a reshard) is gone from ListShards and GetShardIterator answers
    ResourceNotFound for it. As in the KCL, it counts as ended: the consumer keeps running (the
    stream itself exists) and reads the children, which wait for the parent's SHARD_END."""
    fake = _stream(5)
    backing = MemoryBacking()
    first = Collector()
    # First run: the app reads the shard, checkpoints, and stops.
    await consume_until(
        AsyncConsumer(
            "s", "app", first, store=MemoryLeaseStore("app", backing=backing), client=fake, config=FAST
        ),
        lambda: len(first.records) >= 5,
        timeout=10,
    )
    # While the app is down: a reshard, then the retention period passes and the parent is gone.
    fake.split("s", SHARD)
    del fake._streams["s"][SHARD]
    fake.put("s", b"new", "k")  # in a child

    second = Collector()
    consumer = AsyncConsumer(
        "s", "app", second, store=MemoryLeaseStore("app", backing=backing), client=fake, config=FAST
    )
    runner = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: bool(second.records) or runner.done(), timeout=10, what="the child's record")
        stopped_by_itself = runner.done()
    finally:
        consumer.request_stop()
        await runner
    assert not stopped_by_itself, f"the consumer stopped by itself: {consumer.failures}"
    assert [r.data for r in second.records] == [b"new"]


async def test_a_child_shard_drops_kpl_sub_records_routed_to_its_sibling() -> None:
    """The child leases written when a parent reaches SHARD_END carry the children's hash key
    ranges, so the filter of misrouted KPL sub-records (``drop_misrouted_subrecords``, on by
    default) works on child shards too: right after a reshard, the one time it matters.

    Scenario: a KPL with a stale shard map sends an aggregate built for the parent to the left
    child; one of its sub-records belongs to the right child (the KPL sends that one there again).
    Shard discovery is slowed down so that the children's leases come from the shard end."""
    fake = _stream()
    fake.put("s", b"before", "k")
    store = MemoryLeaseStore("app")
    got = Collector()
    consumer = AsyncConsumer(
        "s", "app", got, store=store, client=fake, config=dataclasses.replace(FAST, shard_sync_interval=30.0)
    )
    runner = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: len(got.records) == 1, what="the parent's record")
        left, _ = fake.split("s", SHARD)  # at 2**127
        left_key = _key_hashing_into(0, 2**127 - 1)
        right_key = _key_hashing_into(2**127, 2**128 - 1)
        fake.put("s", aggregate([(b"in-range", left_key, None), (b"misrouted", right_key, None)]), left_key)
        await wait_until(lambda: len(got.records) > 1, what="the child's records")
    finally:
        consumer.request_stop()
        await runner
    # Both sub-records come in one batch: had the second not been dropped, it would be here.
    assert [r.data for r in got.records] == [b"before", b"in-range"]
    lease = await MemoryLeaseStore("app", backing=store.backing).get_lease(left)
    assert lease is not None
    assert (lease.starting_hash_key, lease.ending_hash_key) == ("0", str(2**127 - 1))


# -- fan-out's fallback to polling -----------------------------------------------------------------


@dataclasses.dataclass
class _Event:
    records: list[Record]
    continuation_sequence_number: str | None
    millis_behind_latest: int = 0
    child_shards: Sequence[FakeChildShard] = ()


class _OneEventThenDenied:
    """SubscribeToShard over FakeKinesis: one event with the shard's first five records, then an
    AccessDenied exception frame (the stream consumer was deleted, or IAM changed)."""

    def __init__(self, fake: FakeKinesis) -> None:
        self.fake = fake

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
        del consumer_arn, sequence_number, timestamp
        yield self._events(await self.fake.get_shard_iterator("s", shard_id, starting_position_type))

    async def _events(self, iterator: str) -> AsyncIterator[_Event]:
        page = await self.fake.get_records(iterator, limit=5)
        yield _Event(page.records, page.records[-1].sequence_number)
        raise AccessDenied("not authorized to perform kinesis:SubscribeToShard", operation="SubscribeToShard")


def test_closing_a_fan_out_source_closes_the_fallback_it_has_not_handed_over_yet() -> None:
    """Closing a fan-out source (lease lost, shutdown) leaves nothing behind, even when fan-out
    has just failed and the polling source that replaces it is started but still waiting for
    room in the prefetch queue: no budget registration or bytes, no GetRecords, no task.

    Scenario: the processor has not asked for a batch yet, so the subscription's first event
    fills the queue; then the subscription is refused for good."""
    fake = _stream(50)
    budget = ByteBudget(16 * 1024 * 1024)
    config = ConsumerConfig(min_poll_interval=0.01, idle_poll_interval=0.05)

    async def main() -> tuple[int, int, int, list[asyncio.Task[object]]]:
        source = FanOutSource(
            _OneEventThenDenied(fake),
            "s",
            SHARD,
            consumer_arn="arn:aws:kinesis:us-east-1:1:stream/s/consumer/app:1",
            config=config,
            start_position=StartPosition(),
            budget=budget,
            fallback=lambda: PollingSource(fake, "s", SHARD, config, StartPosition(), budget=budget),
        )
        await source.start(TRIM_HORIZON)
        await asyncio.sleep(1.0)  # the event is queued, fan-out refused, the fallback started
        await source.aclose()
        calls_at_close = fake.calls["get_records"]
        await asyncio.sleep(60.0)
        calls_since = fake.calls["get_records"] - calls_at_close
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return budget.sources, budget.used, calls_since, left

    sources, used, calls_since, tasks = run_simulation(main)
    assert (sources, used, calls_since, tasks) == (0, 0, 0, [])


# -- the budget and the pacer ----------------------------------------------------------------------


class _SlowFake(FakeKinesis):
    """FakeKinesis whose GetRecords takes a round trip of 100 ms."""

    async def get_records(
        self, shard_iterator: str, *, limit: int | None = None, max_attempts: int | None = None
    ) -> FakeGetRecords:
        await asyncio.sleep(0.1)
        return await super().get_records(shard_iterator, limit=limit, max_attempts=max_attempts)


def test_idle_shards_poll_at_the_idle_interval_under_a_small_budget() -> None:
    """An idle shard's poll reserves no more than its fair share of the prefetch budget, so many
    idle shards do not queue behind each other for budget they never fill: each still polls
    about once per idle interval, with 200 shards and an 8 MiB budget (a shard that never had
    records has not measured their size, so it assumes the 1 MiB maximum per record)."""
    shards = 200
    fake = _SlowFake()
    fake.create_stream("s", shards)
    config = dataclasses.replace(PACED, prefetch_budget_bytes=8 * 1024 * 1024)

    async def main() -> tuple[float, int]:
        budget = ByteBudget(config.prefetch_budget_bytes)
        sources = [
            PollingSource(fake, "s", shard_id, config, StartPosition(), budget=budget)
            for shard_id in fake._streams["s"]
        ]
        for source in sources:
            await source.start(TRIM_HORIZON)
        await asyncio.sleep(10.0)  # settle into idle polling
        before = fake.calls["get_records"]
        await asyncio.sleep(60.0)
        calls = fake.calls["get_records"] - before
        for source in sources:
            await source.aclose()
        return calls / shards / 60.0, budget.high_water

    rate, high_water = run_simulation(main)
    # One call per idle interval plus the round trip: ~0.9 a second.
    assert rate > 0.8, f"each idle shard polled {rate:.2f}/s (budget high water {high_water} B, no records)"


def test_the_budget_bounds_memory_when_records_are_kpl_aggregates() -> None:
    """The budget holds with KPL aggregated records: a call's Limit is sized from what the
    de-aggregated batch costs (each small sub-record has its own ~360 B of Python overhead), not
    from the aggregates' size, so the batches in memory stay within the budget."""
    fake = _stream()
    aggregates = 1000
    blob = aggregate([(bytes(100), f"key-{i}", None) for i in range(500)])  # ~55 KB, like the KPL's
    for _ in range(aggregates):
        fake.put("s", blob, "k")
    limit = 16 * 1024 * 1024
    config = dataclasses.replace(PACED, shard_read_bytes_per_second=1 << 40)  # no byte pacing

    async def main() -> int:
        budget = ByteBudget(limit)
        source = PollingSource(fake, "s", SHARD, config, StartPosition(), budget=budget)
        await source.start(TRIM_HORIZON)
        await _count(source, 500 * aggregates, pause=0.5)
        await source.aclose()
        return budget.high_water

    high_water = run_simulation(main)
    assert high_water <= 1.5 * limit, f"budget {limit >> 20} MiB, high water {high_water / 2**20:.0f} MiB"


def test_a_call_delayed_by_the_budget_is_paced_from_when_it_really_goes_out() -> None:
    """A GetRecords that had to wait for budget is paced from when it is really sent, not from
    when it first asked: the calls after it stay within the shard's read quota (5 calls and
    2 MiB a second).

    Scenario: a 50 MiB backlog of 256 KiB records; after the first batch another shard of the
    process holds the whole budget for 5 s."""
    fake = _stream(enforce_read_quota=True)
    for i in range(200):
        fake.put("s", bytes(256 * 1024), f"k{i}")

    async def main() -> None:
        budget = ByteBudget(16 * 1024 * 1024)
        source = PollingSource(fake, "s", SHARD, PACED, StartPosition(), budget=budget)
        await source.start(TRIM_HORIZON)
        got = len((await source.next_batch()).records)
        hog = await budget.acquire(budget.limit, minimum=1)
        await asyncio.sleep(5.0)
        budget.release(hog)
        await _count(source, 200 - got)
        await source.aclose()

    run_simulation(main)
    calls = [(round(at, 3), size) for at, _, size in fake.read_log[:6]]
    assert fake.throttled == 0, f"Kinesis would have throttled {fake.throttled} GetRecords: {calls}"


async def test_a_throttled_get_records_is_retried_by_the_shard_pacer_not_the_transport() -> None:
    """A GetRecords that Kinesis throttles is sent once: the retry waits for the shard's pacer
    (5 calls a second, shared by every reader of the shard in the process) instead of being
    repeated at once by the transport's own retries, which would keep the shard throttled.

    Scenario: a local server throttles every GetRecords; the transport would retry 8 times
    without any backoff; the polling source's own backoff is short, so only the pacer spaces
    the calls out."""
    arrivals: list[float] = []

    async def kinesis(request: web.Request) -> web.Response:
        if request.headers["X-Amz-Target"].endswith(".GetShardIterator"):
            return web.json_response({"ShardIterator": "it"}, content_type="application/x-amz-json-1.1")
        arrivals.append(asyncio.get_running_loop().time())
        body = {"__type": "ProvisionedThroughputExceededException", "message": "Rate exceeded for shard"}
        return web.Response(status=400, text=json.dumps(body), content_type="application/x-amz-json-1.1")

    app = web.Application()
    app.router.add_post("/", kinesis)
    config = dataclasses.replace(PACED, min_poll_interval=0.01)  # backoff: up to 0.01 s x 2**failures
    async with contextlib.AsyncExitStack() as cleanup:
        server = web.AppRunner(app)
        await server.setup()
        cleanup.push_async_callback(server.cleanup)
        await web.TCPSite(server, "127.0.0.1", 0).start()
        client = KinesisClient(
            region="us-east-1",
            endpoint_url=f"http://127.0.0.1:{server.addresses[0][1]}",
            credentials=AwsCredentials("AKID", "secret"),
            transport_options=TransportOptions(max_attempts=8, backoff_base=0.0, backoff_cap=0.0),
        )
        cleanup.push_async_callback(client.aclose)
        source = PollingSource(client, "s", SHARD, config, StartPosition())
        cleanup.push_async_callback(source.aclose)
        await source.start(TRIM_HORIZON)
        await wait_until(lambda: len(arrivals) >= 3, timeout=10, what="three GetRecords")
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(arrivals[:3])]
    # 0.2 s apart at the client; the margin is for the requests' varying trip to the server.
    assert min(gaps) >= 0.1, f"GetRecords {gaps} s apart on a throttled shard"

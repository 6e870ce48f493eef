"""Several workers of one application in one event loop (FakeKinesis, shared memory store):
balancing by graceful handoff, failover, multi-stream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter

from kinesis_butler import AsyncConsumer, ConsumerConfig, Record
from kinesis_butler.stores import MemoryBacking, MemoryLeaseStore
from kinesis_butler.testing.fake import FakeKinesis
from tests.helpers import Collector, wait_until

FEED_EVERY = 0.005  # seconds between writes of 20 records: steady traffic, not a wait
FAST = ConsumerConfig(
    failover_time=1.0,
    renew_interval=0.1,
    take_interval=0.1,
    idle_poll_interval=0.01,
    min_poll_interval=0.001,
    shard_read_calls_per_second=1000.0,
    shard_sync_interval=0.1,
    shutdown_timeout=5,
)


def _fill(fake: FakeKinesis, stream: str, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        fake.put(stream, json.dumps({"n": n}).encode(), f"key-{n % 29}")


def _owners(backing: MemoryBacking) -> Counter[str | None]:
    return Counter(lease.lease_owner for lease in backing.leases("app"))


def _worker(
    fake: FakeKinesis, backing: MemoryBacking, name: str, sink: object, **kw: object
) -> AsyncConsumer:
    return AsyncConsumer(
        kw.pop("stream", "s"),  # type: ignore[arg-type]
        "app",
        sink,
        store=MemoryLeaseStore("app", backing=backing),
        client=fake,
        worker_id=name,
        config=kw.pop("config", FAST),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


async def test_a_joining_worker_gets_its_share_by_handoff_with_no_duplicates() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 8)
    backing = MemoryBacking()
    seen = Collector()
    a = _worker(fake, backing, "a", seen)
    b = _worker(fake, backing, "b", seen)
    runner_a = asyncio.create_task(a.run())
    await wait_until(lambda: _owners(backing)["a"] == 8, what="a holds all 8")
    feeding = True

    async def feed() -> None:
        n = 0
        while feeding:
            _fill(fake, "s", 20, start=n)
            n += 20
            await asyncio.sleep(FEED_EVERY)

    feeder = asyncio.create_task(feed())
    runner_b = asyncio.create_task(b.run())
    await wait_until(lambda: _owners(backing) == Counter({"a": 4, "b": 4}), what="4 and 4")
    feeding = False
    await feeder
    written = sum(len(shard.records) for shard in fake._streams["s"].values())
    await wait_until(lambda: len(seen.records) >= written, what="every record")
    a.request_stop()
    b.request_stop()
    await asyncio.gather(runner_a, runner_b)
    counts = Counter(seen.numbers)
    assert len(counts) == written
    assert max(counts.values()) == 1, "a planned move delivered a record twice"
    assert all(lease.checkpoint_owner is None for lease in backing.leases("app"))


async def test_a_dead_worker_s_shards_are_taken_over_and_resume_after_its_checkpoint() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 4)
    _fill(fake, "s", 200)
    backing = MemoryBacking()
    first = Collector()
    earlier = _worker(fake, backing, "earlier", first)
    runner = asyncio.create_task(earlier.run())
    await wait_until(lambda: len(first.records) >= 200)
    earlier.request_stop()
    await runner
    # A worker that then took every lease and was killed: its leases stay owned, unrenewed.
    store = MemoryLeaseStore("app", backing=backing)
    for lease in await store.list_leases():
        await store.take_lease(lease, "dead")
    _fill(fake, "s", 100, start=200)
    second = Collector()
    heir = _worker(fake, backing, "heir", second)
    loop = asyncio.get_running_loop()
    started = loop.time()
    runner = asyncio.create_task(heir.run())
    await wait_until(lambda: _owners(backing)["heir"] == 4, timeout=10, what="failover")
    took = loop.time() - started
    await wait_until(lambda: len(second.records) >= 100)
    heir.request_stop()
    await runner
    assert sorted(second.numbers) == list(range(200, 300))
    assert took >= FAST.failover_time  # expiry is judged on the observer's clock, from first sight


async def test_one_app_reads_several_streams_and_streams_come_and_go_without_restart() -> None:
    fake = FakeKinesis()
    for name in ("orders", "refunds", "audit"):
        fake.create_stream(name, 2)
    _fill(fake, "orders", 50)
    _fill(fake, "refunds", 30)
    _fill(fake, "audit", 20)
    backing = MemoryBacking()
    got: list[Record] = []

    async def sink(records: list[Record]) -> None:
        got.extend(records)

    consumer = _worker(fake, backing, "w", sink, stream=["orders", "refunds"])
    runner = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(got) >= 80)
    assert Counter(r.stream for r in got) == Counter({"orders": 50, "refunds": 30})
    keys = {lease.lease_key for lease in backing.leases("app")}
    assert all(key.count(":") == 3 for key in keys)
    assert {key.split(":")[1] for key in keys} == {"orders", "refunds"}
    await consumer.add_stream("audit")
    await wait_until(lambda: len(got) >= 100)
    await consumer.remove_stream("refunds")
    await wait_until(lambda: not any(s.stream == "refunds" for s in consumer.shards.values()))
    _fill(fake, "refunds", 10, start=30)
    _fill(fake, "orders", 10, start=50)
    await wait_until(lambda: sum(r.stream == "orders" for r in got) >= 60)
    consumer.request_stop()
    await runner
    assert Counter(r.stream for r in got) == Counter({"orders": 60, "refunds": 30, "audit": 20})
    refund_leases = [lease for lease in backing.leases("app") if ":refunds:" in lease.lease_key]
    assert refund_leases and all(lease.lease_owner is None for lease in refund_leases)


async def test_sigterm_style_stop_hands_shards_to_the_remaining_worker_without_duplicates() -> None:
    fake = FakeKinesis()
    fake.create_stream("s", 4)
    backing = MemoryBacking()
    seen = Collector()
    config = dataclasses.replace(FAST, failover_time=30.0)  # a release must not wait for expiry
    a = _worker(fake, backing, "a", seen, config=config)
    b = _worker(fake, backing, "b", seen, config=config)
    runners = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    await wait_until(lambda: _owners(backing) == Counter({"a": 2, "b": 2}), timeout=15)
    _fill(fake, "s", 100)
    await wait_until(lambda: len(seen.records) >= 100)
    a.request_stop()
    await runners[0]
    _fill(fake, "s", 100, start=100)
    await wait_until(
        lambda: _owners(backing) == Counter({"b": 4}), timeout=5, what="b takes a's released shards"
    )
    await wait_until(lambda: len(seen.records) >= 200)
    b.request_stop()
    await runners[1]
    assert Counter(seen.numbers) == Counter(range(200))


async def test_a_deleted_stream_stops_only_its_own_shards_in_a_multi_stream_app() -> None:
    fake = FakeKinesis()
    for name in ("keep", "doomed"):
        fake.create_stream(name, 1)
        _fill(fake, name, 10)
    backing = MemoryBacking()
    got: list[Record] = []

    async def sink(records: list[Record]) -> None:
        got.extend(records)

    consumer = _worker(fake, backing, "w", sink, stream=["keep", "doomed"])
    runner = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(got) >= 20)
    fake.delete_stream("doomed")
    await wait_until(lambda: consumer.tracker.names == ["keep"], what="the deleted stream dropped")
    _fill(fake, "keep", 5, start=10)
    await wait_until(lambda: len(got) >= 25, what="the other stream goes on")
    assert not runner.done()
    consumer.request_stop()
    await runner


async def test_a_handoff_naming_a_worker_that_never_started_the_lease_is_completed_at_once() -> None:
    # w1 was receiving the lease from w0 when w6 stole it from w1: w1 never held it, so w1
    # completes that handoff at once rather than leaving w6 to wait out the failover time.
    from kinesis_butler.leasing import LeaseCoordinator
    from kinesis_butler.models import Lease

    backing = MemoryBacking()
    store = MemoryLeaseStore("app", backing=backing)
    await store.create_lease_if_absent(Lease("shard-0"))
    lease = await store.take_lease(Lease("shard-0"), "w1")
    stolen = await store.initiate_handoff(lease, "w6")
    assert (stolen.lease_owner, stolen.checkpoint_owner) == ("w6", "w1")
    coordinator = LeaseCoordinator(
        MemoryLeaseStore("app", backing=backing),
        "w1",
        FAST,
        on_acquired=lambda h: None,
        on_lost=lambda h: None,
    )
    coordinator.taking = False  # only the table scan, no takes
    await coordinator.take_round()
    after = await store.get_lease("shard-0")
    assert after is not None
    assert (after.lease_owner, after.checkpoint_owner) == ("w6", None)

"""A lease store outage: keep processing what is held until the failover time, then stop;
recover when the store returns. Nothing lost, no shard stopped for good."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from kinesis_butler import AsyncConsumer, ConsumerConfig, StoreUnavailable
from kinesis_butler.stores import MemoryBacking, MemoryLeaseStore
from kinesis_butler.testing.fake import FakeKinesis
from tests.helpers import Collector, wait_until

CONFIG = ConsumerConfig(
    failover_time=1.0,
    renew_interval=0.1,
    take_interval=0.1,
    idle_poll_interval=0.01,
    min_poll_interval=0.001,
    shard_read_calls_per_second=1000.0,
    shard_sync_interval=0.1,
    shutdown_timeout=5,
)


_CALLS = frozenset(
    {"list_leases", "get_lease", "create_lease_if_absent", "renew_lease", "take_lease", "evict_lease",
     "checkpoint", "initiate_handoff", "complete_handoff", "update_lineage"}
)  # fmt: skip


class FlakyStore(MemoryLeaseStore):
    """A memory store that can be switched off, like a database that went away."""

    down = False

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name in _CALLS:

            async def guarded(*args: Any, **kwargs: Any) -> Any:
                if FlakyStore.down:
                    raise StoreUnavailable("store is down (test)")
                return await attribute(*args, **kwargs)

            return guarded
        return attribute


def _fill(fake: FakeKinesis, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        fake.put("s", json.dumps({"n": n}).encode(), f"k{n % 7}")


async def _scenario(outage: float) -> tuple[Collector, AsyncConsumer, list[int]]:
    fake = FakeKinesis()
    fake.create_stream("s", 2)
    _fill(fake, 40)
    backing = MemoryBacking()
    seen = Collector()
    consumer = AsyncConsumer(
        "s", "app", seen, store=FlakyStore("app", backing=backing), client=fake, worker_id="w", config=CONFIG
    )
    runner = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(seen.records) >= 40)
    FlakyStore.down = True
    during: list[int] = []
    _fill(fake, 40, start=40)
    await wait_until(
        lambda: len(seen.records) >= 80 or outage > CONFIG.failover_time, what="records in the outage"
    )
    loop = asyncio.get_running_loop()
    end = loop.time() + outage
    await wait_until(lambda: loop.time() >= end, timeout=outage + 5, what="the outage to pass")
    during.append(len(seen.records))
    FlakyStore.down = False
    _fill(fake, 40, start=80)
    await wait_until(lambda: set(seen.numbers) >= set(range(120)), timeout=15, what="recovery")
    consumer.request_stop()
    await runner
    return seen, consumer, during


async def test_a_short_outage_does_not_stop_processing_and_loses_nothing() -> None:
    try:
        seen, consumer, during = await _scenario(outage=0.5)
    finally:
        FlakyStore.down = False
    assert during[0] >= 80  # records written during the outage were processed during it
    assert consumer.failures == []
    assert max(seen.numbers.count(n) for n in range(120)) == 1  # no lease moved: no duplicates


async def test_a_long_outage_drops_the_leases_then_recovers_from_the_checkpoints(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        seen, consumer, _ = await _scenario(outage=2.5)
    finally:
        FlakyStore.down = False
    assert "lost lease" in caplog.text  # after the failover time it stopped working on them
    assert consumer.failures == []  # no shard stopped for good
    assert set(seen.numbers) >= set(range(120))
    # The positions processed during the outage were written once the leases came back.
    assert sorted(seen.numbers) == list(range(120))

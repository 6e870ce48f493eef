"""Wall-clock time to balance and to fail over, with the library's real timers.

64 shards on an in-process FakeKinesis and a shared memory store (so only the lease protocol
is measured, not a server): one worker holds everything, seven join; then one worker is cut
off from the store (a partition, which to the others is the same as a SIGKILL) and we time
how long until its shards are owned by the others. Default timings (failover 10 s).

    .venv/bin/python bench/group_realtime.py [--failover 10]

Goals (issue 3): balanced within +-1 of ceil(64/8) in <= 30 s; failover within
failover + one renew interval (13.3 s at the defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections import Counter
from typing import Any

from kinesis_butler import AsyncConsumer, ConsumerConfig, Record, StoreUnavailable
from kinesis_butler.stores import MemoryBacking, MemoryLeaseStore
from kinesis_butler.testing.fake import FakeKinesis

SHARDS, WORKERS = 64, 8
POLL = 0.05  # how often the bench looks at the lease table


class _Partitioned(MemoryLeaseStore):
    """Every store call fails: the worker is cut off, its leases stay owned but unrenewed."""

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name in {"app", "backing", "aclose", "initialize"}:
            return super().__getattribute__(name)

        async def unreachable(*args: object, **kwargs: object) -> None:
            raise StoreUnavailable("partitioned (bench)")

        return unreachable


async def _sink(records: list[Record]) -> None:
    return None


async def main(failover: float, *, verbose: bool = False) -> None:
    fake = FakeKinesis()
    fake.create_stream("s", SHARDS)
    backing = MemoryBacking()
    config = ConsumerConfig(failover_time=failover)

    def worker(name: str) -> AsyncConsumer:
        store = MemoryLeaseStore("app", backing=backing)
        return AsyncConsumer("s", "app", _sink, store=store, client=fake, worker_id=name, config=config)

    def owners() -> Counter[str | None]:
        return Counter(lease.lease_owner for lease in backing.leases("app") if lease.checkpoint_owner is None)

    workers = [worker("w0")]
    tasks = [asyncio.create_task(workers[0].run())]
    while owners()["w0"] < SHARDS:  # noqa: ASYNC110 - polling a table another task writes
        await asyncio.sleep(POLL)
    started = time.monotonic()
    for i in range(1, WORKERS):
        workers.append(worker(f"w{i}"))
        tasks.append(asyncio.create_task(workers[-1].run()))
    target = -(-SHARDS // WORKERS)
    last_print = 0.0
    while True:
        counts = [owners().get(f"w{i}", 0) for i in range(WORKERS)]
        if verbose and time.monotonic() - last_print > 1:
            last_print = time.monotonic()
            moving = sum(1 for lease in backing.leases("app") if lease.checkpoint_owner)
            print(f"{last_print - started:5.1f}s {counts} handoffs in flight: {moving}")
        if sum(counts) == SHARDS and all(abs(c - target) <= 1 for c in counts):
            break
        await asyncio.sleep(POLL)
    balance = time.monotonic() - started

    victim = workers[3]
    lost = owners()["w3"]
    victim.coordinator.store = _Partitioned("app", backing=backing)
    started = time.monotonic()
    while owners().get("w3", 0) or None in owners():  # noqa: ASYNC110
        await asyncio.sleep(POLL)
    failover_took = time.monotonic() - started
    for w in workers:
        w.request_stop()
    await asyncio.gather(*tasks, return_exceptions=True)

    renew = config.effective_renew_interval
    take = config.effective_take_interval
    print(f"failover {failover:.0f} s, renew every {renew:.2f} s, take every {take:.2f} s")
    print(f"{'':34}{'measured':>10}{'goal':>10}")
    print(f"{'balance 64 shards, 1 -> 8 workers':34}{balance:>9.1f}s{30:>9.1f}s")
    print(f"{f'fail over {lost} shards of a dead worker':34}{failover_took:>9.1f}s{failover + renew:>9.1f}s")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--failover", type=float, default=10.0)
    parser.add_argument("--verbose", action="store_true", help="print the distribution every second")
    args = parser.parse_args()
    asyncio.run(main(args.failover, verbose=args.verbose))

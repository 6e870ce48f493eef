"""Cost and speed-up of ordered_parallel (kinesis_butler.parallel), in one process.

1. Overhead: a no-op ``async def`` handler over 100,000 records fed in batches of 10,000
   (as GetRecords delivers them), through ``OrderedParallelProcessor`` until its shard ends,
   against a plain sequential ``for record in batch: await handle(record)`` loop. Also one
   ``asyncio.create_task`` per record (the design ordered_parallel avoids), for scale.
   Wall time per record, the least of five runs.
2. Throughput: a handler that awaits ~5 ms of I/O (``asyncio.sleep``), 500 keys, at
   concurrency 1, 8 and 64; against the same number of bare asyncio worker tasks draining a
   list (no order, no checkpoint: what asyncio itself allows on this machine).

Run: ``.venv/bin/python bench/bench_parallel.py`` (about 15 s).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable

from kinesis_butler.models import ExtendedSequenceNumber, Record
from kinesis_butler.parallel import OrderedParallelProcessor, ParallelConfig
from kinesis_butler.processor import CheckpointTarget, ProcessRecordsInput, ShardEndedInput

BATCH = 10_000


class NullCheckpointer:
    def __init__(self) -> None:
        self.count = 0
        self.last_checkpoint = ExtendedSequenceNumber("TRIM_HORIZON")

    async def checkpoint(self, target: CheckpointTarget = None, *, wait: bool = True) -> None:
        self.count += 1


def make_records(count: int, keys: int) -> list[Record]:
    return [
        Record(b"x" * 100, f"key-{n % keys}", str(10**20 + n), shard_id="shard-0", stream="s")
        for n in range(count)
    ]


async def noop(record: Record) -> None:
    return None


async def run_parallel(
    records: list[Record], handler: Callable[[Record], Awaitable[None]], **knobs: object
) -> float:
    processor = OrderedParallelProcessor(handler, ParallelConfig(**knobs))  # type: ignore[arg-type]
    checkpointer = NullCheckpointer()
    started = time.perf_counter()
    for first in range(0, len(records), BATCH):
        batch = records[first : first + BATCH]
        await processor.process_records(ProcessRecordsInput(batch, checkpointer, "shard-0", "s"))
    await processor.shard_ended(ShardEndedInput("shard-0", "s", checkpointer))
    return time.perf_counter() - started


async def run_sequential(records: list[Record], handler: Callable[[Record], Awaitable[None]]) -> float:
    started = time.perf_counter()
    for first in range(0, len(records), BATCH):
        for record in records[first : first + BATCH]:
            await handler(record)
    return time.perf_counter() - started


async def run_task_per_record(records: list[Record], handler: Callable[[Record], Awaitable[None]]) -> float:
    started = time.perf_counter()
    for first in range(0, len(records), BATCH):
        await asyncio.gather(*(asyncio.create_task(handler(r)) for r in records[first : first + BATCH]))
    return time.perf_counter() - started


def best_of(runs: int, make: Callable[[], Awaitable[float]]) -> float:
    times = []
    for _ in range(runs):
        gc.collect()
        times.append(asyncio.run(make()))  # type: ignore[arg-type]
    return min(times)


def overhead() -> None:
    count = 100_000
    print(f"1. overhead, no-op async handler, {count:,} records in batches of {BATCH:,} (µs/record)")
    for keys in (count, 1_000, 1):
        records = make_records(count, keys)
        sequential = best_of(5, lambda r=records: run_sequential(r, noop))
        per_task = best_of(5, lambda r=records: run_task_per_record(r, noop))
        print(
            f"   {keys:>7,} keys: sequential loop {sequential / count * 1e6:5.2f}"
            f" | task per record (unordered) {per_task / count * 1e6:5.2f}",
            end="",
        )
        for concurrency in (16, 64):
            spent = best_of(5, lambda r=records, c=concurrency: run_parallel(r, noop, concurrency=c))
            print(f" | ordered_parallel c={concurrency} {spent / count * 1e6:5.2f}", end="")
        print()


async def io_5ms(record: Record) -> None:
    await asyncio.sleep(0.005)


async def run_bare_workers(records: list[Record], concurrency: int) -> float:
    todo = list(records)

    async def worker() -> None:
        while todo:
            await io_5ms(todo.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


def throughput() -> None:
    print("2. throughput, handler awaiting 5 ms of I/O, 500 keys (records/s)")
    for concurrency in (1, 8, 64):
        count = 400 * concurrency
        records = make_records(count, 500)
        spent = best_of(1, lambda r=records, c=concurrency: run_parallel(r, io_5ms, concurrency=c))
        bare = best_of(1, lambda r=records, c=concurrency: run_bare_workers(r, c))
        print(
            f"   concurrency {concurrency:>2}: ordered_parallel {count / spent:7,.0f}"
            f" | bare worker tasks {count / bare:7,.0f} | 1/5 ms x concurrency {concurrency / 0.005:7,.0f}"
        )


if __name__ == "__main__":
    overhead()
    throughput()

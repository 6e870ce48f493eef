"""Memory of one process consuming 1,000 shards: the process-wide prefetch byte budget at work.

One AsyncConsumer (memory:// store, an in-process FakeKinesis, default ConsumerConfig but for
``prefetch_budget_bytes``) reads a 1,000-shard stream whose every shard holds a backlog of
10,000 x 100 B records: 10 M records, about 4.7 GB as Python objects once fetched. The
processor is slow on purpose (it sleeps a second per batch), so fetched batches pile up and
only the budget holds them back. Each budget runs in a fresh child process, so peak RSS
(VmHWM) is that run's alone:

* 256 MiB, the default;
* 64 MiB;
* 64 GiB, i.e. no budget: only each shard's pipeline (a batch in the processor, one queued,
  one being fetched; up to 10,000 records each) and how fast this one process can fetch and
  decode bound what is held.

The backlog costs nothing until it is read: each shard's records are made on demand when
FakeKinesis.get_records slices them, each with its own payload bytes, partition key, sequence
number and timestamp objects, as a real GetRecords decode allocates them. So the baseline (RSS
before the consumer starts) is only the interpreter and the library, and RSS over baseline is
what the consumer holds. The fake's call log (``read_log``) is cleared as the run goes, so it
does not count either.

    .venv/bin/python bench/memory_1000_shards.py            # about 3 minutes
    .venv/bin/python bench/memory_1000_shards.py --quick    # 200 shards, under a minute

It also measures with tracemalloc what one decoded Record really holds beyond its payload and
partition key (the budget charges ``PER_RECORD_OVERHEAD`` for it), and how long 1,000 shards
take to start: every lease taken, and a first batch handed to the processor of every shard.

Goal (issue): 1,000 shards in one process stay <= 500 MB at the default budget.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from typing import Any

import msgspec

from kinesis_butler import AsyncConsumer, ConsumerConfig, Record
from kinesis_butler.retrieval.budget import (
    DEFAULT_BUDGET_BYTES,
    PER_RECORD_OVERHEAD,
    ByteBudget,
    process_budget,
)
from kinesis_butler.testing.fake import FakeKinesis

MiB = 1024 * 1024
GiB = 1024 * MiB
GOAL_BYTES = 500 * 1000 * 1000  # "<= 500 MB"
STREAM = "memory-bench"
SAMPLE_EVERY = 0.25
FIRST_SEQUENCE = 49_600_000_000_000_000_000_000_000_000_000_000_000_000_000_000


class Backlog:
    """One shard's records, made when GetRecords slices them (``FakeKinesis`` stores a list).

    Every record gets objects of its own, as a decode of a GetRecords answer makes them. The
    fake slices the same range twice per call (once to log its size, once to copy it); the
    second slice returns the first one's records instead of making them again.
    """

    def __init__(self, shard_index: int, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self.key_prefix = f"partition-key-{shard_index:04d}-"
        self.first_sequence = FIRST_SEQUENCE + shard_index * 10_000_000_000
        self.filler = b"x" * max(0, size - 8)
        self._last: tuple[int, int, list[Record]] | None = None

    def __len__(self) -> int:
        return self.count

    def _make(self, index: int) -> Record:
        data = index.to_bytes(8, "big")[: self.size] + self.filler  # a new bytes object
        return Record(
            data, f"{self.key_prefix}{index}", str(self.first_sequence + index), 1.8e9 + index / 1000
        )

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, int):
            if not 0 <= item < self.count:
                raise IndexError(item)
            return self._make(item)
        start, stop, _ = item.indices(self.count)
        last = self._last
        if last is not None and last[0] == start and last[1] == stop:
            self._last = None
            return last[2]
        records = [self._make(i) for i in range(start, stop)]
        self._last = (start, stop, records)
        return records


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value, _ = line.split()
                out[name[:-1]] = int(value) * 1024
    return out


class _WarningCount(logging.Handler):
    """Counts the library's warnings by message template (a lost lease, a failed renewal...)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[str(record.msg)] += 1


def _library_state() -> str:
    """The commit the library was imported from, and a digest of uncommitted changes under src/
    (other work may land while the bench runs: each run says what it measured)."""
    src = os.path.dirname(os.path.abspath(sys.modules["kinesis_butler"].__file__ or "."))

    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", src, *command], capture_output=True, check=False)
        return done.stdout.decode(errors="replace").strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    diff = git("diff", "HEAD", "--", ".")
    return f"{commit} + uncommitted diff {hashlib.sha256(diff.encode()).hexdigest()[:8]}" if diff else commit


def _mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * GiB  # pragma: no cover


# -- one run, in a child process ---------------------------------------------------------------
class Run:
    """One consumer, one budget: start it, sample memory until time is up, stop it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.warnings = _WarningCount()
        library_log = logging.getLogger("kinesis_butler")
        library_log.setLevel(logging.WARNING)
        library_log.addHandler(self.warnings)
        library_log.propagate = False
        self.fake = FakeKinesis()
        self.fake.create_stream(STREAM, args.shards)
        for index, entry in enumerate(self.fake._streams[STREAM].values()):
            entry.records = Backlog(index, args.records, args.size)  # type: ignore[assignment]
        self.config = ConsumerConfig(
            prefetch_budget_bytes=args.budget, shard_read_calls_per_second=args.calls_per_second
        )
        self.budget: ByteBudget | None = None  # the process budget, once the first source exists
        self.delivered = 0
        self.first_batch: dict[str, float] = {}  # shard -> when its processor got a first batch
        self.result: dict[str, Any] = {"budget": args.budget, "shards": args.shards, "capped": False}
        self.result.update(leases_taken_s=None, first_delivery_s=None, all_delivering_s=None)
        self.result.update(peak_rss=0, peak_rss_at=0.0, budget_peak_used=0, max_loop_stall_s=0.0)

    async def slow(self, records: list[Record]) -> None:
        """The processor: slow on purpose, so that fetched batches pile up."""
        self.delivered += len(records)
        self.first_batch.setdefault(records[0].shard_id, asyncio.get_running_loop().time())
        await asyncio.sleep(self.args.process_seconds)

    async def main(self) -> dict[str, Any]:
        args, result = self.args, self.result
        gc.collect()
        result["library"] = _library_state()
        result["baseline"] = _status()["VmRSS"]
        rss_cap = min(args.rss_cap, int(_mem_available() * 0.7) + result["baseline"])
        loop = asyncio.get_running_loop()
        consumer = AsyncConsumer(
            STREAM, "memory-bench", self.slow, store="memory://", client=self.fake, config=self.config
        )
        started = loop.time()
        task = asyncio.create_task(consumer.run())
        next_print = 0.0
        while loop.time() - started < args.seconds and not task.done():
            pause = 0.05 if result["all_delivering_s"] is None else SAMPLE_EVERY
            before = loop.time()
            await asyncio.sleep(pause)
            # How long the event loop did not answer (lease renewals wait just as long).
            stall = loop.time() - before - pause
            result["max_loop_stall_s"] = round(max(result["max_loop_stall_s"], stall), 2)
            rss = self.sample(consumer, loop.time() - started, started)
            if args.verbose and loop.time() - started >= next_print:
                next_print = loop.time() - started + 2
                self.progress(loop.time() - started, rss)
            if rss > rss_cap:
                result["capped"] = True
                break
        result["get_records_calls"] = self.fake.calls.get("get_records", 0)
        stop_started = loop.time()
        consumer.request_stop()
        await asyncio.wait_for(task, timeout=120)
        status = _status()
        result.update(
            seconds=round(stop_started - started, 1),
            stop_s=round(loop.time() - stop_started, 1),
            hwm=status["VmHWM"],
            peak_rss=max(result["peak_rss"], status["VmRSS"]),
            budget_high_water=self.budget.high_water if self.budget else 0,
            delivered=self.delivered,
            shards_delivering=len(self.first_batch),
            failures=len(consumer.failures),
            warnings=dict(self.warnings.counts),
        )
        return result

    def sample(self, consumer: AsyncConsumer, now: float, started: float) -> int:
        """Record RSS, budget use and start-up milestones; return RSS."""
        result = self.result
        self.fake.read_log.clear()  # the fake's call log is not the consumer's memory
        if self.budget is None and consumer.shards:
            self.budget = process_budget(self.config.prefetch_budget_bytes)  # the one sources share
        if result["leases_taken_s"] is None and len(consumer.coordinator.held) == self.args.shards:
            result["leases_taken_s"] = round(now, 2)
        if result["first_delivery_s"] is None and self.first_batch:
            result["first_delivery_s"] = round(min(self.first_batch.values()) - started, 2)
        if result["all_delivering_s"] is None and len(self.first_batch) == self.args.shards:
            result["all_delivering_s"] = round(max(self.first_batch.values()) - started, 2)
        rss = _status()["VmRSS"]
        if rss > result["peak_rss"]:
            result["peak_rss"], result["peak_rss_at"] = rss, round(now, 1)
        used = self.budget.used if self.budget is not None else 0
        result["budget_peak_used"] = max(result["budget_peak_used"], used)
        return rss

    def progress(self, now: float, rss: int) -> None:
        used = self.budget.used if self.budget is not None else 0
        print(
            f"  [{self.args.budget // MiB} MiB] {now:5.1f}s rss {rss / MiB:7.0f} MiB"
            f"  budget used {used / MiB:7.1f} MiB  delivered {self.delivered:>10,}"
            f"  shards delivering {len(self.first_batch)}",
            file=sys.stderr,
            flush=True,
        )


# -- what one decoded record holds -----------------------------------------------------------------
def _size_class(nbytes: int) -> int:
    """What the allocator really hands out: pymalloc rounds small objects up to 16 B; larger
    ones come from malloc with a 16 B header."""
    return -(-nbytes // 16) * 16 if nbytes <= 512 else -(-(nbytes + 8) // 16) * 16


def per_record_memory(size: int, count: int = 10_000) -> dict[str, float]:
    """Decode a GetRecords ``Records`` array the way the Kinesis client does (msgspec into
    Record, Data base64-decoded) and measure what the records hold beyond payload + key."""
    body = msgspec.json.encode(
        [
            {
                "SequenceNumber": f"4968048879266125360450591123432132513259339049705930{i:05d}",
                "ApproximateArrivalTimestamp": 1795431832.505 + i / 1000,
                "Data": base64.b64encode(os.urandom(size)).decode(),
                "PartitionKey": f"partition-key-{i % 977}",
            }
            for i in range(count)
        ]
    )
    decoder = msgspec.json.Decoder(list[Record])
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    records = decoder.decode(body)
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    payload = sum(len(r.data) + len(r.partition_key) for r in records)
    allocated = 8 * count + sum(  # the list's slots, then each object rounded to its size class
        _size_class(sys.getsizeof(obj))
        for r in records
        for obj in (r, r.data, r.partition_key, r.sequence_number, r.approximate_arrival_timestamp)
    )
    return {
        "size": size,
        "traced_overhead": (traced - payload) / count,
        "allocated_overhead": (allocated - payload) / count,
    }


# -- the parent: one child per budget, then the table ----------------------------------------------
def _child(args: argparse.Namespace, budget: int) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        str(budget),
        "--shards",
        str(args.shards),
        "--records",
        str(args.records),
        "--size",
        str(args.size),
        "--seconds",
        str(args.seconds),
        "--process-seconds",
        str(args.process_seconds),
        "--calls-per-second",
        str(args.calls_per_second),
        "--rss-cap",
        str(args.rss_cap),
    ]
    if args.verbose:
        command.append("--verbose")
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    if args.verbose:
        sys.stderr.write(done.stderr)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise RuntimeError(f"child for budget {budget} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.0f} MB"


def _label(budget: int) -> str:
    if budget >= 16 * GiB:
        return f"{budget // GiB} GiB (no budget)"
    suffix = " (default)" if budget == DEFAULT_BUDGET_BYTES else ""
    return f"{budget // MiB} MiB{suffix}"


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def report(
    args: argparse.Namespace, results: list[dict[str, Any]], per_record: list[dict[str, float]]
) -> None:
    backlog = args.shards * args.records
    print(
        f"{args.shards} shards x {args.records:,} records of {args.size} B "
        f"({backlog:,} records); processor sleeps {args.process_seconds} s per batch; "
        f"{args.seconds:.0f} s per run; shard_read_calls_per_second={args.calls_per_second:g}"
    )
    header = (
        "budget",
        "peak RSS",
        "over baseline",
        "budget high water",
        "budget used, sampled peak",
        "delivered",
        "<= 500 MB",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        over = r["hwm"] - r["baseline"]
        goal = "yes" if r["hwm"] <= GOAL_BYTES else "no"
        capped = " (stopped at the RSS cap)" if r["capped"] else ""
        print(
            f"| {_label(r['budget'])} | {_mb(r['hwm'])}{capped} | {_mb(over)} | "
            f"{r['budget_high_water'] / MiB:,.1f} MiB | {r['budget_peak_used'] / MiB:,.1f} MiB | "
            f"{r['delivered']:,} | {goal} |"
        )
    print()
    libraries = list(dict.fromkeys(r["library"] for r in results))
    if len(libraries) == 1:
        print(f"library: {libraries[0]}")
    else:  # the source tree changed between runs: say which run measured what
        print("library: " + "; ".join(f"{_label(r['budget'])}: {r['library']}" for r in results))
    print(
        "budget figures count grants reserved before each GetRecords answer is measured (a shard's "
        "first calls reserve at a pessimistic per-record estimate): without a real limit they are "
        "reservations, not memory; 'sampled peak' is budget.used read every 0.25 s"
    )
    print(f"baseline RSS before the consumer starts: {', '.join(_mb(r['baseline']) for r in results)}")
    for r in results:
        over = r["hwm"] - r["baseline"]
        limited = r["budget_peak_used"] and r["budget"] < 16 * GiB
        ratio = f"{over / r['budget_peak_used']:.2f}" if limited else "n/a"
        warned = ", ".join(f"{n} x {msg!r}" for msg, n in sorted(r["warnings"].items())) or "none"
        print(
            f"{_label(r['budget'])}: RSS over baseline / sampled peak budget use = {ratio}; "
            f"peak RSS sampled at {r['peak_rss_at']} s; {r['get_records_calls']:,} GetRecords; "
            f"all {r['shards']} leases taken at {_seconds(r['leases_taken_s'])}, first batch at "
            f"{_seconds(r['first_delivery_s'])}, a first batch on every shard at "
            f"{_seconds(r['all_delivering_s'])} ({r['shards_delivering']} of {r['shards']}); "
            f"stop {r['stop_s']:.1f} s; longest event-loop stall {r['max_loop_stall_s']:.1f} s; "
            f"shard failures {r['failures']}; library warnings: {warned}"
        )
    print()
    print(
        "one decoded Record beyond payload + partition key "
        f"(the budget charges PER_RECORD_OVERHEAD = {PER_RECORD_OVERHEAD} B):"
    )
    for m in per_record:
        print(
            f"  {m['size']:>5} B payload: {m['traced_overhead']:.0f} B requested (tracemalloc), "
            f"{m['allocated_overhead']:.0f} B with allocator size classes"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 shards, 10 s per run (under a minute)")
    parser.add_argument("--shards", type=int, default=None, help="default 1000 (200 with --quick)")
    parser.add_argument("--records", type=int, default=10_000, help="backlog per shard")
    parser.add_argument("--size", type=int, default=100, help="payload bytes per record")
    parser.add_argument("--seconds", type=float, default=None, help="per run; default 60 (10 with --quick)")
    parser.add_argument("--process-seconds", type=float, default=1.0, help="processor sleep per batch")
    parser.add_argument(
        "--calls-per-second", type=float, default=5.0, help="shard_read_calls_per_second (Kinesis: 5)"
    )
    parser.add_argument(
        "--budgets",
        default=f"{DEFAULT_BUDGET_BYTES},{64 * MiB},{64 * GiB}",
        help="comma-separated prefetch_budget_bytes values, one child process each",
    )
    parser.add_argument(
        "--rss-cap", type=int, default=16 * GiB, help="stop a run early above this RSS (safety)"
    )
    parser.add_argument("--verbose", action="store_true", help="print progress every 2 s")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shards = args.shards or (200 if args.quick else 1000)
    args.seconds = args.seconds or (10.0 if args.quick else 60.0)
    logging.basicConfig(level=logging.ERROR)

    if args.child is not None:
        args.budget = args.child
        result = asyncio.run(Run(args).main())
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # skip freeing gigabytes of records one by one

    per_record = [per_record_memory(size) for size in (100, 1024)]
    results = []
    for budget in (int(b) for b in args.budgets.split(",")):
        started = time.monotonic()
        results.append(_child(args, budget))
        if args.verbose:
            print(f"  [{_label(budget)}] run took {time.monotonic() - started:.0f} s", file=sys.stderr)
    report(args, results, per_record)


if __name__ == "__main__":
    main()

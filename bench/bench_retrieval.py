"""CPU cost of retrieval: kinesis-butler against boto3, aiobotocore and async-kinesis, in one run.

Every client reads from the replay endpoint of ``bench/replay.py`` (a child process, so its CPU is
not counted): GetRecords answers of 10,000 records of 100 B, of 1,000 records of 1 KiB, and empty
ones. This process's CPU (``time.process_time``: user + system, every thread) is measured around
each sample; the clients take turns, in a rotating order, for ``--repeats`` rounds, and each
cell is the median [min] of its samples. The machine may be shared: the median is the figure,
the min is what the code costs when nothing else gets in the way.

The rows:

* kinesis-butler ``KinesisClient.get_records`` in a loop;
* kinesis-butler ``PollingSource``, the consumer's retrieval path end to end (its fetch task,
  pacing, byte budget, queue, ``next_batch``), with the poll intervals and per-shard quotas made
  tiny/huge so that it polls as fast as it can;
* boto3 ``get_records`` in a loop (the baseline of every ratio);
* aiobotocore ``get_records`` in a loop;
* async-kinesis 3 ``Consumer``: its real DescribeStream, shard allocation, fetch loop and
  queue, iterated with ``async for`` (a pass-through processor, so the payload bytes are the
  items: no JSON parsing is charged to it). It sleeps 0.2 s between fetch rounds by design; that
  costs wall time, not CPU. ``sleep_time_no_records=0`` and a high ``shard_fetch_rate`` keep its
  throttler from spinning.

Empty polls are counted by the server when a client cannot count them itself. The report ends
with the ratios, the shards one process keeps up with (formulas printed) and the goals.

Run: ``.venv/bin/python bench/bench_retrieval.py`` (about 1.5 minutes; ``--quick``: about 30 s).
``--tls`` serves HTTPS as AWS does, ``--vary`` answers of varying size, ``--malloc-tuned``
reruns under glibc settings that keep freed memory mapped, ``--clients`` picks a subset (with
kinesis-butler alone, no other client's allocations change the allocator's state first). See
docs/performance.md for a run and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from replay import KINDS, ReplayServer, build_bodies, iterator_for, stream_name

_T = TypeVar("_T")

REGION = "us-east-1"
ACCESS_KEY = "AKIDREPLAYBENCH"
SECRET_KEY = "replay-bench-secret"  # noqa: S105 - a dummy key for a local server
SHARD_RATE = 2 * 1024 * 1024  # Kinesis's read quota per shard, bytes per second
RECORD_KINDS = ("100b", "1kib")
#: glibc malloc settings under which freed memory is reused instead of unmapped and faulted in
#: again (``--malloc-tuned``): no mmap below 32 MiB, trim the heap only above 128 MiB free.
MALLOC_TUNED = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "134217728",
    "MALLOC_TOP_PAD_": "67108864",
}
KIND_LABEL = {"100b": "100 B", "1kib": "1 KiB", "empty": "empty poll"}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each sample reads: records per record sample, polls per empty-poll sample."""

    records: dict[str, int]
    slow_records: dict[str, int]  # for the ~20x slower clients
    polls: int
    slow_polls: int
    repeats: int


FULL = Sizes(
    records={"100b": 200_000, "1kib": 100_000},
    slow_records={"100b": 30_000, "1kib": 15_000},
    polls=2_000,
    slow_polls=300,
    repeats=5,
)
QUICK = Sizes(
    records={"100b": 60_000, "1kib": 30_000},
    slow_records={"100b": 10_000, "1kib": 5_000},
    polls=600,
    slow_polls=100,
    repeats=3,
)


@dataclasses.dataclass
class Sample:
    cpu: float  # seconds of this process's CPU
    units: int  # records, or polls
    faults: int  # minor page faults


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Meter:
    """Measures this process's CPU and page faults around one sample."""

    def __enter__(self) -> Meter:
        gc.collect()
        self.faults = _faults()
        self.start = time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cpu = time.process_time() - self.start
        self.faults = _faults() - self.faults

    def sample(self, units: int) -> Sample:
        return Sample(self.cpu, units, self.faults)


class Client:
    """One row of the table. ``run`` the async parts on the shared event loop."""

    name = ""
    slow = False  # reads fewer records per sample

    def __init__(self, server: ReplayServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def open(self) -> None:
        """Create the client (not measured)."""

    def close(self) -> None:
        """Release it."""

    def records(self, kind: str, count: int) -> Sample:
        """CPU to read about ``count`` records of ``kind``."""
        raise NotImplementedError

    def empty(self, polls: int) -> Sample:
        """CPU of ``polls`` empty polls."""
        raise NotImplementedError


class OursGetRecords(Client):
    name = "kinesis-butler get_records"

    def open(self) -> None:
        from kinesis_butler.aws import AwsCredentials, KinesisClient

        self.client = KinesisClient(
            endpoint_url=self.server.endpoint,
            region=REGION,
            credentials=AwsCredentials(ACCESS_KEY, SECRET_KEY),
        )

    def close(self) -> None:
        self.run(self.client.aclose())

    async def _loop(self, iterator: str, calls: int) -> int:
        count = 0
        for _ in range(calls):
            count += len((await self.client.get_records(iterator)).records)
        return count

    def records(self, kind: str, count: int) -> Sample:
        iterator = iterator_for(kind)
        self.run(self._loop(iterator, 1))
        with Meter() as meter:
            got = self.run(self._loop(iterator, max(1, count // KINDS[kind].records)))
        return meter.sample(got)

    def empty(self, polls: int) -> Sample:
        iterator = iterator_for("empty")
        self.run(self._loop(iterator, 10))
        with Meter() as meter:
            self.run(self._loop(iterator, polls))
        return meter.sample(polls)


def _fast_polling_config() -> Any:
    """A ConsumerConfig that polls as fast as the server answers (no pacing, no quotas)."""
    from kinesis_butler.config import ConsumerConfig

    wanted: dict[str, Any] = {
        "min_poll_interval": 1e-6,
        "idle_poll_interval": 1e-6,
        "shard_read_calls_per_second": 1e9,
        "shard_read_bytes_per_second": 1 << 50,
    }
    known = {field.name for field in dataclasses.fields(ConsumerConfig)}
    return ConsumerConfig(**{key: value for key, value in wanted.items() if key in known})


class OursPolling(OursGetRecords):
    name = "kinesis-butler PollingSource"

    @contextlib.asynccontextmanager
    async def _source(self, kind: str) -> AsyncIterator[Any]:
        from kinesis_butler.models import TRIM_HORIZON, StartPosition
        from kinesis_butler.retrieval.polling import PollingSource

        source = PollingSource(
            self.client, stream_name(kind), "shardId-000000000000", _fast_polling_config(), StartPosition()
        )
        await source.start(TRIM_HORIZON)
        try:
            yield source
        finally:
            await source.aclose()

    async def _read(self, kind: str, count: int) -> Sample:
        async with self._source(kind) as source:
            await source.next_batch()  # the iterator, the first answer, the prefetch under way
            got = 0
            with Meter() as meter:
                while got < count:
                    got += len((await source.next_batch()).records)
            return meter.sample(got)

    def records(self, kind: str, count: int) -> Sample:
        return self.run(self._read(kind, count))

    async def _idle(self, polls: int) -> Sample:
        async with self._source("empty"):
            await _served_at_least(self.server, "empty", self.server.served("empty") + 10)
            first = self.server.served("empty")
            with Meter() as meter:
                last = await _served_at_least(self.server, "empty", first + polls)
            return meter.sample(last - first)

    def empty(self, polls: int) -> Sample:
        return self.run(self._idle(polls))


async def _cancel_other_tasks() -> None:
    """Cancel and wait for every task of the loop but the running one."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


async def _served_at_least(server: ReplayServer, kind: str, count: int, within: float = 120.0) -> int:
    """Wait (polling the server's counter every 20 ms) until it served ``count`` answers of ``kind``."""
    deadline = time.monotonic() + within
    while (served := server.served(kind)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server answered only {served} of {count} {kind} polls")
        await asyncio.sleep(0.02)
    return served


class Boto3(Client):
    name = "boto3 get_records"
    slow = True

    def open(self) -> None:
        import boto3

        self.client = boto3.client(
            "kinesis",
            endpoint_url=self.server.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def close(self) -> None:
        self.client.close()

    def _loop(self, iterator: str, calls: int) -> int:
        count = 0
        for _ in range(calls):
            count += len(self.client.get_records(ShardIterator=iterator)["Records"])
        return count

    def records(self, kind: str, count: int) -> Sample:
        iterator = iterator_for(kind)
        self._loop(iterator, 1)
        with Meter() as meter:
            got = self._loop(iterator, max(1, count // KINDS[kind].records))
        return meter.sample(got)

    def empty(self, polls: int) -> Sample:
        iterator = iterator_for("empty")
        self._loop(iterator, 5)
        with Meter() as meter:
            self._loop(iterator, polls)
        return meter.sample(polls)


class Aiobotocore(Client):
    name = "aiobotocore get_records"
    slow = True

    def open(self) -> None:
        from aiobotocore.session import get_session

        self._stack = contextlib.AsyncExitStack()
        self.client = self.run(
            self._stack.enter_async_context(
                get_session().create_client(
                    "kinesis",
                    endpoint_url=self.server.endpoint,
                    region_name=REGION,
                    aws_access_key_id=ACCESS_KEY,
                    aws_secret_access_key=SECRET_KEY,
                )
            )
        )

    def close(self) -> None:
        self.run(self._stack.aclose())

    async def _loop(self, iterator: str, calls: int) -> int:
        count = 0
        for _ in range(calls):
            count += len((await self.client.get_records(ShardIterator=iterator))["Records"])
        return count

    def records(self, kind: str, count: int) -> Sample:
        iterator = iterator_for(kind)
        self.run(self._loop(iterator, 1))
        with Meter() as meter:
            got = self.run(self._loop(iterator, max(1, count // KINDS[kind].records)))
        return meter.sample(got)

    def empty(self, polls: int) -> Sample:
        iterator = iterator_for("empty")
        self.run(self._loop(iterator, 5))
        with Meter() as meter:
            self.run(self._loop(iterator, polls))
        return meter.sample(polls)


class AsyncKinesis(Client):
    name = "async-kinesis Consumer"
    slow = True
    RECORD_SHARDS = 2  # two shards keep its 0.2 s fetch rounds from idling the 1 KiB sample
    EMPTY_SHARDS = 50  # its rounds are 0.2 s apart: many shards give many polls per second

    @contextlib.asynccontextmanager
    async def _consumer(self, kind: str, shards: int) -> AsyncIterator[Any]:
        from kinesis import Consumer
        from kinesis.processors import Processor

        class PassThrough(Processor):
            """Yields each record's payload as it is: no deserialization is charged."""

            def parse(self, data: bytes) -> Any:
                yield data

        consumer = Consumer(
            stream_name(kind, shards),
            endpoint_url=self.server.endpoint,
            region_name=REGION,
            processor=PassThrough(),
            iterator_type="TRIM_HORIZON",
            sleep_time_no_records=0,
            shard_fetch_rate=1000,
            idle_timeout=60,
        )
        await consumer.__aenter__()
        try:
            yield consumer
        finally:
            # Its close() closes the HTTP client under a fetch it just started (it logs a
            # connection error and leaves that task sleeping 3 s): quiet, then reap it, so that
            # nothing of it runs during the next client's sample.
            quiet = logging.getLogger("kinesis")
            level, quiet.level = quiet.level, logging.CRITICAL
            try:
                await consumer.__aexit__(None, None, None)
                await _cancel_other_tasks()
            finally:
                quiet.setLevel(level)

    async def _read(self, kind: str, count: int) -> Sample:
        async with self._consumer(kind, self.RECORD_SHARDS) as consumer:
            for _ in range(KINDS[kind].records):  # warm up: a first batch
                await consumer.__anext__()
            with Meter() as meter:
                for _ in range(count):
                    await consumer.__anext__()
            return meter.sample(count)

    def records(self, kind: str, count: int) -> Sample:
        return self.run(self._read(kind, count))

    async def _idle(self, polls: int) -> Sample:
        async with self._consumer("empty", self.EMPTY_SHARDS) as consumer:
            await consumer.wait_ready()
            await _served_at_least(self.server, "empty", self.server.served("empty") + self.EMPTY_SHARDS)
            first = self.server.served("empty")
            with Meter() as meter:
                last = await _served_at_least(self.server, "empty", first + polls)
            return meter.sample(last - first)

    def empty(self, polls: int) -> Sample:
        return self.run(self._idle(polls))


CLIENTS: dict[str, type[Client]] = {
    "get_records": OursGetRecords,
    "polling": OursPolling,
    "boto3": Boto3,
    "aiobotocore": Aiobotocore,
    "async-kinesis": AsyncKinesis,
}


def decode_only(sizes: Sizes) -> dict[str, list[Sample]]:
    """kinesis-butler's msgspec decode of the canned bodies alone, from bytes: the floor."""
    from kinesis_butler.aws import kinesis as kinesis_module

    decoder = kinesis_module._get_records_decoder  # the very decoder get_records uses
    bodies = build_bodies()
    samples: dict[str, list[Sample]] = {}
    for kind in RECORD_KINDS:
        calls = max(1, sizes.records[kind] // KINDS[kind].records)
        for _ in range(sizes.repeats):
            with Meter() as meter:
                for _ in range(calls):
                    decoder.decode(bodies[kind][0])
            samples.setdefault(kind, []).append(meter.sample(calls * KINDS[kind].records))
    return samples


# -- the report ----------------------------------------------------------------------------------


def per_unit(samples: list[Sample]) -> tuple[float, float]:
    """(median, min) µs per unit."""
    values = [s.cpu / s.units * 1e6 for s in samples]
    return statistics.median(values), min(values)


def faults_per_call(samples: list[Sample], kind: str) -> float:
    units = KINDS[kind].records or 1
    return statistics.median(s.faults / s.units * units for s in samples)


def shards_at_quota(size: int, us_per_record: float) -> float:
    """Shards at 2 MiB/s whose payload one process decodes: (size / µs per record) / 2 MiB/s."""
    return (size / (us_per_record * 1e-6)) / SHARD_RATE


def shards_with_polls(size: int, us_per_record: float, us_per_poll: float) -> float:
    """The same, also charging 5 polls per second per shard at the empty-poll cost."""
    per_shard_second = 5 * us_per_poll * 1e-6 + (SHARD_RATE / size) * us_per_record * 1e-6
    return 1 / per_shard_second


OURS = ("kinesis-butler get_records", "kinesis-butler PollingSource")
BOTO3 = "boto3 get_records"
ASYNC_KINESIS = "async-kinesis Consumer"
Results = dict[str, dict[str, list[Sample]]]


def median_us(results: Results, name: str, kind: str) -> float:
    return per_unit(results[name][kind])[0]


def print_table(results: Results, decode: dict[str, list[Sample]], sizes: Sizes) -> None:
    base = results.get(BOTO3)

    def cell(name: str, kind: str) -> str:
        samples = results[name].get(kind)
        if not samples:
            return f"{'-':>27}"
        median, least = per_unit(samples)
        digits = 1 if kind == "empty" else 3 if median < 10 else 2
        text = f"{median:.{digits}f} [{least:.{digits}f}]"
        if base and kind in base and name != BOTO3:
            text += f" {per_unit(base[kind])[0] / median:5.1f}x"
        else:
            text += " " * 7
        return f"{text:>27}"

    print()
    print(
        f"Retrieval CPU, client process only: median [min] of {sizes.repeats} samples; "
        "Nx = boto3's median / this median"
    )
    labels = ("µs/record, 100 B", "µs/record, 1 KiB", "µs/empty poll")
    print(f"{'':32}" + "".join(f"{label:>27}" for label in labels))
    for name in results:
        print(f"{name:32}" + "".join(cell(name, kind) for kind in (*RECORD_KINDS, "empty")))
    if decode:
        row = "".join(f"{'{:.3f} [{:.3f}]'.format(*per_unit(decode[kind])):>27}" for kind in RECORD_KINDS)
        print(f"{'  (msgspec decode alone)':32}{row}")


def print_faults(results: Results) -> None:
    print()
    print("Minor page faults per GetRecords call (median):")
    for name, by_kind in results.items():
        text = "  ".join(
            f"{KIND_LABEL[kind]} {faults_per_call(by_kind[kind], kind):6.0f}"
            for kind in RECORD_KINDS
            if kind in by_kind
        )
        print(f"  {name:30}{text}")


def print_versus_async_kinesis(results: Results, ours: list[str]) -> None:
    print()
    print("kinesis-butler vs async-kinesis (its median / ours):")
    for name in ours:
        text = "  ".join(
            f"{KIND_LABEL[kind]} "
            f"{median_us(results, ASYNC_KINESIS, kind) / median_us(results, name, kind):6.1f}x"
            for kind in (*RECORD_KINDS, "empty")
        )
        print(f"  {name:30}{text}")


def print_shards(results: Results, ours: list[str]) -> None:
    print()
    print("Shards at 2 MiB/s one process keeps up with (median CPU; one core, nothing else to do):")
    print("  A = (payload bytes per record / CPU seconds per record) / 2 MiB/s")
    print("  B = 1 s / (5 polls x CPU per empty poll + (2 MiB / payload bytes) x CPU per record)")
    for name in ours:
        poll = median_us(results, name, "empty")
        parts = []
        for kind in RECORD_KINDS:
            size, record = KINDS[kind].size, median_us(results, name, kind)
            parts.append(
                f"{KIND_LABEL[kind]}: A {shards_at_quota(size, record):4.0f}  "
                f"B {shards_with_polls(size, record, poll):4.0f}"
            )
        print(f"  {name:30}" + "    ".join(parts))


def print_goals(results: Results, ours: list[str]) -> None:
    print()
    print("Goals (medians):")
    goals: list[tuple[str, bool]] = []
    for name in ours:
        short = name.removeprefix("kinesis-butler ")
        if BOTO3 in results:
            ratio = median_us(results, BOTO3, "100b") / median_us(results, name, "100b")
            goals.append((f"{short}: >= 20x boto3 per 100 B record: {ratio:.1f}x", ratio >= 20))
        empty = median_us(results, name, "empty")
        goals.append((f"{short}: <= 150 µs CPU per empty poll: {empty:.0f} µs", empty <= 150))
        if ASYNC_KINESIS in results:
            versus = median_us(results, ASYNC_KINESIS, "100b") / median_us(results, name, "100b")
            goals.append((f"{short}: >= 10x async-kinesis per 100 B record: {versus:.1f}x", versus >= 10))
        for kind in RECORD_KINDS:
            shards = shards_at_quota(KINDS[kind].size, median_us(results, name, kind))
            label = KIND_LABEL[kind]
            goals.append(
                (f"{short}: >= 60 shards at 2 MiB/s of {label} records (A): {shards:.0f}", shards >= 60)
            )
    for text, met in goals:
        print(f"  [{'met' if met else 'MISSED'}] {text}")


def report(results: Results, decode: dict[str, list[Sample]], sizes: Sizes) -> None:
    print_table(results, decode, sizes)
    print_faults(results)
    ours = [name for name in OURS if name in results]
    if ours and ASYNC_KINESIS in results:
        print_versus_async_kinesis(results, ours)
    if ours:
        print_shards(results, ours)
        print_goals(results, ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller samples (under 60 s)")
    parser.add_argument("--repeats", type=int, help="samples per cell (default 5, quick 3)")
    parser.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help=f"comma-separated subset of {','.join(CLIENTS)} (boto3 is the ratios' baseline)",
    )
    parser.add_argument(
        "--vary",
        action="store_true",
        help="answers of varying size (55-100%% of 10,000 / 1,000 records) instead of always the same",
    )
    parser.add_argument(
        "--malloc-tuned",
        action="store_true",
        help="rerun under glibc settings that keep freed memory mapped (" + " ".join(MALLOC_TUNED) + ")",
    )
    parser.add_argument(
        "--tls", action="store_true", help="HTTPS, as AWS serves it (a throwaway self-signed certificate)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every sample")
    args = parser.parse_args()
    if args.malloc_tuned and not all(os.environ.get(key) for key in MALLOC_TUNED):
        print("re-running with " + " ".join(f"{k}={v}" for k, v in MALLOC_TUNED.items()), flush=True)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNED})  # noqa: S606
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    chosen = [CLIENTS[name.strip()] for name in args.clients.split(",") if name.strip()]

    os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)  # async-kinesis builds its own session
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    began = time.monotonic()
    results: dict[str, dict[str, list[Sample]]] = {cls.name: {} for cls in chosen}
    with ReplayServer(vary=args.vary, tls=args.tls) as server:
        if args.tls:  # before any HTTP library is imported (aiohttp builds its context at import)
            os.environ["SSL_CERT_FILE"] = server.ca_file  # aiohttp, through OpenSSL's default paths
            os.environ["AWS_CA_BUNDLE"] = server.ca_file  # boto3, aiobotocore, async-kinesis
        loop = asyncio.new_event_loop()
        clients = [cls(server, loop) for cls in chosen]
        try:
            for client in clients:
                client.open()
            for repeat in range(sizes.repeats):
                turn = repeat % len(clients)
                for client in clients[turn:] + clients[:turn]:  # nobody always runs first
                    for kind in (*RECORD_KINDS, "empty"):
                        if kind == "empty":
                            sample = client.empty(sizes.slow_polls if client.slow else sizes.polls)
                        else:
                            wanted = (sizes.slow_records if client.slow else sizes.records)[kind]
                            sample = client.records(kind, wanted)
                        results[client.name].setdefault(kind, []).append(sample)
                        if args.verbose:
                            print(
                                f"  round {repeat + 1} {client.name:30} {KIND_LABEL[kind]:10} "
                                f"{sample.cpu / sample.units * 1e6:9.3f} µs x {sample.units} "
                                f"({sample.faults} faults)",
                                file=sys.stderr,
                            )
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    client.close()
            loop.run_until_complete(_cancel_other_tasks())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    decode = decode_only(sizes) if any(cls is OursGetRecords for cls in chosen) else {}
    report(results, decode, sizes)
    print(f"\n({time.monotonic() - began:.0f} s; Python {sys.version.split()[0]}; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()

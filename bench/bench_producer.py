"""CPU cost of producing: kinesis-butler's AsyncProducer against boto3 and aws-kinesis-agg, in one run.

Every client writes 100 B records with varied partition keys to the replay endpoint of
``bench/replay.py`` (a child process, so its CPU is not counted), which answers PutRecords with one
result per entry, all on one shard (``replay-100b-1``). This process's CPU (``time.process_time``)
is measured around each sample; the rows take turns, in a rotating order, for ``--repeats``
rounds, and each cell is the median [min] of its samples, in CPU microseconds per record.

The rows:

* kinesis-butler ``AsyncProducer``, KPL aggregation on (the default) and off: ``put`` N records,
  then ``flush`` (the handles are dropped, as a fire-and-forget caller would);
* boto3 ``put_records`` in a loop, 500 records per call (botocore does the base64): the baseline
  of every ratio;
* aws-kinesis-agg ``RecordAggregator`` building 51,200 B aggregates (``add_user_record``, then
  ``get_contents`` of each), CPU only, and the same plus boto3 ``put_records`` sending them.

Run: ``.venv/bin/python bench/bench_producer.py`` (about 2 minutes; ``--quick``: under a minute).
See docs/performance.md ("Producer") for a run and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from replay import ReplayServer, stream_name

REGION = "us-east-1"
ACCESS_KEY = "AKIDREPLAYBENCH"
SECRET_KEY = "replay-bench-secret"  # noqa: S105 - a dummy key for a local server
STREAM = stream_name("100b", 1)
RECORD_BYTES = 100
KEYS = 10_007  # distinct partition keys, cycled
AGG_MAX_BYTES = 51_200  # the KPL's AggregationMaxSize, and the producer's default
GOAL = 10.0  # times cheaper than boto3 per 100 B record


def workload(count: int, seed: int = 5) -> tuple[list[bytes], list[str]]:
    """``count`` payloads of 100 B (1,000 distinct ones, cycled) and their partition keys."""
    rng = random.Random(seed)
    payloads = [rng.randbytes(RECORD_BYTES) for _ in range(1000)]
    keys = [f"{rng.getrandbits(48):012x}-{i}" for i in range(KEYS)]
    return [payloads[i % 1000] for i in range(count)], [keys[i % KEYS] for i in range(count)]


class Row:
    """One row of the table: ``open`` (not measured), then ``run`` (measured), then ``close``."""

    name = ""
    slow = False  # writes fewer records per sample

    def __init__(self, endpoint: str, loop: asyncio.AbstractEventLoop) -> None:
        self.endpoint = endpoint
        self.loop = loop

    def open(self) -> None: ...

    def close(self) -> None: ...

    def run(self, data: list[bytes], keys: list[str]) -> None:
        raise NotImplementedError


class Ours(Row):
    aggregate = True

    def open(self) -> None:
        from kinesis_butler.aws import AwsCredentials, KinesisClient
        from kinesis_butler.config import ProducerConfig
        from kinesis_butler.producer import AsyncProducer

        client = KinesisClient(
            endpoint_url=self.endpoint, region=REGION, credentials=AwsCredentials(ACCESS_KEY, SECRET_KEY)
        )
        config = ProducerConfig(aggregate=self.aggregate, aggregation_max_bytes=AGG_MAX_BYTES)
        self.producer = AsyncProducer(STREAM, client=client, config=config)
        self.client = client
        self.loop.run_until_complete(self.producer.start())

    def close(self) -> None:
        self.loop.run_until_complete(self.producer.aclose())
        self.loop.run_until_complete(self.client.aclose())

    async def _put(self, data: list[bytes], keys: list[str]) -> None:
        put = self.producer.put
        for payload, key in zip(data, keys, strict=True):
            await put(payload, key)
        await self.producer.flush()

    def run(self, data: list[bytes], keys: list[str]) -> None:
        self.loop.run_until_complete(self._put(data, keys))


class OursAggregated(Ours):
    name = "kinesis-butler AsyncProducer, aggregated"


class OursPlain(Ours):
    name = "kinesis-butler AsyncProducer, plain"
    aggregate = False


def _boto3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "kinesis",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


class Boto3(Row):
    name = "boto3 put_records (500 per call)"
    slow = True

    def open(self) -> None:
        self.client = _boto3_client(self.endpoint)

    def close(self) -> None:
        self.client.close()

    def run(self, data: list[bytes], keys: list[str]) -> None:
        put_records = self.client.put_records
        for start in range(0, len(data), 500):
            records = [
                {"Data": payload, "PartitionKey": key}
                for payload, key in zip(data[start : start + 500], keys[start : start + 500], strict=True)
            ]
            result = put_records(StreamName=STREAM, Records=records)
            assert result["FailedRecordCount"] == 0


class KinesisAgg(Row):
    name = "aws-kinesis-agg RecordAggregator (CPU only)"
    send = False

    def open(self) -> None:
        from aws_kinesis_agg.aggregator import RecordAggregator

        self.factory = RecordAggregator
        if self.send:
            self.client = _boto3_client(self.endpoint)

    def close(self) -> None:
        if self.send:
            self.client.close()

    def _flush(self, aggregates: list[tuple[str, str, bytes]]) -> None:
        if self.send and aggregates:
            result = self.client.put_records(
                StreamName=STREAM,
                Records=[
                    {"Data": d, "PartitionKey": pk, **({"ExplicitHashKey": ehk} if ehk else {})}
                    for pk, ehk, d in aggregates
                ],
            )
            assert result["FailedRecordCount"] == 0
        aggregates.clear()

    def run(self, data: list[bytes], keys: list[str]) -> None:
        aggregator = self.factory(max_size=AGG_MAX_BYTES)
        add = aggregator.add_user_record
        pending: list[tuple[str, str, bytes]] = []
        for payload, key in zip(data, keys, strict=True):
            full = add(key, payload)
            if full is not None:
                pending.append(full.get_contents())
                if len(pending) * AGG_MAX_BYTES >= 5 * 1024 * 1024 - AGG_MAX_BYTES:  # the request limit
                    self._flush(pending)
        last = aggregator.clear_and_get()
        if last is not None:
            pending.append(last.get_contents())
        self._flush(pending)


class KinesisAggSend(KinesisAgg):
    name = "aws-kinesis-agg + boto3 put_records"
    send = True
    slow = True


ROWS: list[type[Row]] = [OursAggregated, OursPlain, Boto3, KinesisAgg, KinesisAggSend]


def measure(row: Row, data: list[bytes], keys: list[str]) -> float:
    """CPU microseconds per record of one sample."""
    gc.collect()
    start = time.process_time()
    row.run(data, keys)
    return (time.process_time() - start) / len(data) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer records and rounds (< 60 s)")
    parser.add_argument("--repeats", type=int, help="rounds (default 5, --quick 3)")
    args = parser.parse_args(argv)
    records, slow_records = (50_000, 10_000) if args.quick else (200_000, 30_000)
    repeats = args.repeats or (3 if args.quick else 5)
    data, keys = workload(records)
    loop = asyncio.new_event_loop()
    samples: dict[str, list[float]] = {}
    with ReplayServer() as server:
        rows = [cls(server.endpoint, loop) for cls in ROWS]
        for row in rows:
            row.open()
            count = 2_000
            row.run(data[:count], keys[:count])  # warm up: connections, imports, caches
        for round_ in range(repeats):
            for row in rows[round_ % len(rows) :] + rows[: round_ % len(rows)]:
                count = slow_records if row.slow else records
                samples.setdefault(row.name, []).append(measure(row, data[:count], keys[:count]))
        for row in rows:
            row.close()
    loop.close()
    report(samples, records, slow_records, repeats)
    return 0


def report(samples: dict[str, list[float]], records: int, slow_records: int, repeats: int) -> None:
    median: Callable[[list[float]], float] = statistics.median
    base = median(samples[Boto3.name])
    print(
        f"CPU µs per 100 B record (median [min] of {repeats} rounds; {records:,} records per sample, "
        f"{slow_records:,} for boto3 rows; Python {sys.version.split()[0]})\n"
    )
    width = max(len(name) for name in samples)
    print(f"{'row':<{width}}  {'µs/record':>16}  {'vs boto3':>9}")
    for name, values in samples.items():
        mid = median(values)
        print(f"{name:<{width}}  {mid:>7.2f} [{min(values):>6.2f}]  {base / mid:>8.1f}x")
    print()
    for name in (OursAggregated.name, OursPlain.name):
        ratio = base / median(samples[name])
        verdict = "met" if ratio >= GOAL else "NOT met"
        print(f"goal ≥ {GOAL:.0f}x boto3 per 100 B record, {name}: {ratio:.1f}x — {verdict}")


if __name__ == "__main__":
    sys.exit(main())

"""CPU cost of KPL aggregation: kinesis-butler's retrieval/kpl.py against aws-kinesis-agg, in one run.

De-aggregation: 1,000 aggregates of 100 x 100 B sub-records (100 partition keys each), as one
GetRecords batch would deliver them. Ours takes ``Record`` structs; aws-kinesis-agg's
``deaggregate_records`` takes Lambda-shaped dicts with base64 data (and re-base64s every
sub-record), so it is also measured on boto3-shaped dicts with raw bytes
(``iter_deaggregate_records(..., data_format="Boto3")``), which skips the input decoding. The
pass-through line is the cost ``deaggregate`` adds to every plain (non-aggregated) record.
Aggregation: 100,000 records of 100 B packed into aggregates of at most 51,200 B (the KPL
default), with our ``Aggregator`` and with aws-kinesis-agg's ``RecordAggregator``.

Each figure is the median CPU time (``time.process_time``) of several runs, per (sub-)record.

Run: ``pip install -e '.[bench]'`` then ``python bench/bench_kpl.py``.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

AGGREGATES = 1_000
SUB_RECORDS = 100
RECORD_SIZE = 100
PLAIN_RECORDS = 10_000
AGGREGATION_RECORDS = 100_000
AGGREGATION_LIMIT = 51_200
SEQ = "49590338271490256608559692538361571095921575989136588898"


def cpu_of(run: Callable[[], object], repeats: int) -> float:
    """The median CPU time of ``repeats`` runs, after one warm-up run."""
    run()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times)


def entries_for(aggregate_index: int) -> list[tuple[bytes, str, None]]:
    return [(os.urandom(RECORD_SIZE), f"user-{aggregate_index}-{j}", None) for j in range(SUB_RECORDS)]


def bench_deaggregation(repeats: int) -> dict[str, float]:
    """µs per sub-record (and per plain record for the pass-through)."""
    from aws_kinesis_agg.deaggregator import deaggregate_records, iter_deaggregate_records

    from kinesis_butler.models import Record
    from kinesis_butler.retrieval.kpl import MAX_HASH_KEY, aggregate, deaggregate

    blobs = [aggregate(entries_for(i)) for i in range(AGGREGATES)]
    records = [Record(blob, "a", f"{SEQ}{i:05d}", 1795431832.505) for i, blob in enumerate(blobs)]
    lambda_shaped = [
        {
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": "a",
                "sequenceNumber": f"{SEQ}{i:05d}",
                "data": base64.b64encode(blob).decode(),
                "approximateArrivalTimestamp": 1795431832.505,
            }
        }
        for i, blob in enumerate(blobs)
    ]
    boto3_shaped = [
        {
            "SequenceNumber": f"{SEQ}{i:05d}",
            "PartitionKey": "a",
            "Data": blob,
            "ApproximateArrivalTimestamp": 1795431832.505,
        }
        for i, blob in enumerate(blobs)
    ]
    total = AGGREGATES * SUB_RECORDS
    assert len(deaggregate(records)) == total
    assert len(deaggregate_records(lambda_shaped)) == total
    assert len(list(iter_deaggregate_records(boto3_shaped, data_format="Boto3"))) == total
    half = (0, MAX_HASH_KEY // 2)

    plain = [
        Record(b"{" + os.urandom(RECORD_SIZE - 1), f"k{i}", f"{SEQ}{i:05d}") for i in range(PLAIN_RECORDS)
    ]
    assert deaggregate(plain) is plain
    plain_runs = 100

    def pass_through() -> None:
        for _ in range(plain_runs):
            deaggregate(plain)

    return {
        "ours": cpu_of(lambda: deaggregate(records), repeats) / total * 1e6,
        "ours_filtered": cpu_of(lambda: deaggregate(records, hash_range=half), repeats) / total * 1e6,
        "aws_lambda": cpu_of(lambda: deaggregate_records(lambda_shaped), repeats) / total * 1e6,
        "aws_boto3": cpu_of(
            lambda: list(iter_deaggregate_records(boto3_shaped, data_format="Boto3")), repeats
        )
        / total
        * 1e6,
        "pass_through": cpu_of(pass_through, repeats) / (plain_runs * PLAIN_RECORDS) * 1e6,
    }


def bench_aggregation(repeats: int) -> dict[str, float]:
    """µs per record to pack records into aggregates of at most AGGREGATION_LIMIT bytes."""
    from aws_kinesis_agg.aggregator import RecordAggregator

    from kinesis_butler.retrieval.kpl import Aggregator

    entries = [(os.urandom(RECORD_SIZE), f"user-{i % 5_000}") for i in range(AGGREGATION_RECORDS)]

    def ours() -> list[bytes]:
        aggregator, blobs = Aggregator(), []
        for data, partition_key in entries:
            if len(aggregator) and aggregator.size_with(data, partition_key) > AGGREGATION_LIMIT:
                blobs.append(aggregator.encode())
                aggregator.clear()
            aggregator.add(data, partition_key)
        blobs.append(aggregator.encode())
        return blobs

    def theirs() -> list[bytes]:
        blobs: list[bytes] = []
        aggregator = RecordAggregator(max_size=AGGREGATION_LIMIT)

        def complete(agg: Any) -> None:
            blobs.append(agg.get_contents()[2])

        aggregator.on_record_complete(complete, execute_on_new_thread=False)
        for data, partition_key in entries:
            aggregator.add_user_record(partition_key, data)
        last = aggregator.clear_and_get()
        blobs.append(last.get_contents()[2])
        return blobs

    ours_blobs, their_blobs = ours(), theirs()
    assert all(len(b) <= AGGREGATION_LIMIT for b in ours_blobs + their_blobs)
    return {
        "ours": cpu_of(ours, repeats) / AGGREGATION_RECORDS * 1e6,
        "aws": cpu_of(theirs, repeats) / AGGREGATION_RECORDS * 1e6,
        "ours_aggregates": len(ours_blobs),
        "aws_aggregates": len(their_blobs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure (the median is shown)")
    args = parser.parse_args()

    de = bench_deaggregation(args.repeats)
    ag = bench_aggregation(args.repeats)

    def row(label: str, value: float, base: float | None = None, extra: str = "") -> None:
        ratio = f"{value / base:9.1f}x" if base else ""
        print(f"{label:46}{value:14.3f}{ratio:>10}{extra}")

    print(
        f"KPL de-aggregation CPU, {AGGREGATES:,} aggregates x {SUB_RECORDS} x {RECORD_SIZE} B sub-records, "
        f"median of {args.repeats}"
    )
    print(f"{'':46}{'us/sub-record':>14}{'vs ours':>10}")
    row("kinesis-butler deaggregate", de["ours"], de["ours"])
    row("kinesis-butler, hash_range = half the keys", de["ours_filtered"], de["ours"])
    row("aws-kinesis-agg, Lambda dicts (base64 in)", de["aws_lambda"], de["ours"])
    row("aws-kinesis-agg, boto3 dicts (raw bytes in)", de["aws_boto3"], de["ours"])
    print(f"{'kinesis-butler pass-through, per plain record':46}{de['pass_through'] * 1000:11.1f} ns")
    print()
    print(
        f"KPL aggregation CPU, {AGGREGATION_RECORDS:,} x {RECORD_SIZE} B records into aggregates of "
        f"<= {AGGREGATION_LIMIT:,} B, median of {args.repeats}"
    )
    print(f"{'':46}{'us/record':>14}{'vs ours':>10}{'aggregates':>12}")
    row("kinesis-butler Aggregator", ag["ours"], ag["ours"], f"{ag['ours_aggregates']:12,}")
    row("aws-kinesis-agg RecordAggregator", ag["aws"], ag["ours"], f"{ag['aws_aggregates']:12,}")


if __name__ == "__main__":
    main()

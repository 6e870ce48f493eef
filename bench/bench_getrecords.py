"""CPU cost of GetRecords: kinesis-butler's KinesisClient against boto3, in one run.

A local aiohttp server (in a child process, so its CPU is not counted) serves two canned
GetRecords bodies: 10,000 records of 100 bytes, and an empty batch. The benchmark measures this
process's CPU time (``time.process_time``, the least of five runs) per record and per empty poll
for each client, and prints the ratios.

Run: ``pip install -e '.[bench]'`` then ``python bench/bench_getrecords.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

RECORDS_PER_BATCH = 10_000
RECORD_SIZE = 100
ITERATOR_FULL = "AAAAAAAAAAF-full-" + "x" * 200  # real iterators are ~250 characters
ITERATOR_EMPTY = "AAAAAAAAAAF-empty-" + "x" * 200


def canned_bodies() -> tuple[bytes, bytes]:
    """A 10,000 x 100 B GetRecords body shaped like the real service's, and an empty one."""
    records = [
        {
            "SequenceNumber": f"4968048879266125360450591123432132513259339049705930{i:05d}",
            "ApproximateArrivalTimestamp": 1795431832.505 + i / 1000,
            "Data": base64.b64encode(os.urandom(RECORD_SIZE)).decode(),
            "PartitionKey": f"partition-key-{i % 977}",
        }
        for i in range(RECORDS_PER_BATCH)
    ]
    full = msgspec.json.encode(
        {"Records": records, "NextShardIterator": ITERATOR_FULL, "MillisBehindLatest": 0}
    )
    empty = msgspec.json.encode({"Records": [], "NextShardIterator": ITERATOR_EMPTY, "MillisBehindLatest": 0})
    return full, empty


def serve(port: int, ready: Any) -> None:
    """The child process: answer GetRecords from the canned bodies until killed."""
    full, empty = canned_bodies()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        answer = full if b"-full-" in body else empty
        return web.Response(body=answer, content_type="application/x-amz-json-1.1")

    async def main() -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


REPEATS = 5


def cpu_of(run: Callable[[], None]) -> float:
    """The least CPU time of several runs: the machine's noise only ever adds time."""
    best = float("inf")
    for _ in range(REPEATS):
        gc.collect()
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def bench_ours(endpoint: str, full_calls: int, empty_calls: int) -> tuple[float, float, float]:
    """(µs per record, µs per empty poll, µs per record for the msgspec decode alone)."""
    from kinesis_butler.aws import AwsCredentials, KinesisClient
    from kinesis_butler.aws import kinesis as kinesis_module

    loop = asyncio.new_event_loop()
    client = KinesisClient(
        endpoint_url=endpoint, region="us-east-1", credentials=AwsCredentials("AKID", "secret")
    )

    async def poll(iterator: str, times: int) -> int:
        count = 0
        for _ in range(times):
            count += len((await client.get_records(iterator)).records)
        return count

    try:
        assert loop.run_until_complete(poll(ITERATOR_FULL, 2)) == 2 * RECORDS_PER_BATCH  # warm up
        loop.run_until_complete(poll(ITERATOR_EMPTY, 50))
        per_record = cpu_of(lambda: loop.run_until_complete(poll(ITERATOR_FULL, full_calls)))
        per_empty = cpu_of(lambda: loop.run_until_complete(poll(ITERATOR_EMPTY, empty_calls)))
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()

    body, _ = canned_bodies()
    decoder = kinesis_module._get_records_decoder

    def decode_only() -> None:
        for _ in range(full_calls):
            decoder.decode(body)

    decode = cpu_of(decode_only)
    records = full_calls * RECORDS_PER_BATCH
    return per_record / records * 1e6, per_empty / empty_calls * 1e6, decode / records * 1e6


def bench_boto3(endpoint: str, full_calls: int, empty_calls: int) -> tuple[float, float]:
    """(µs per record, µs per empty poll) for boto3's ``get_records``."""
    import boto3

    client = boto3.client(
        "kinesis",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKID",
        aws_secret_access_key="secret",  # noqa: S106 - dummy key for a local server
    )
    try:
        assert len(client.get_records(ShardIterator=ITERATOR_FULL)["Records"]) == RECORDS_PER_BATCH
        for _ in range(20):
            client.get_records(ShardIterator=ITERATOR_EMPTY)

        def full() -> None:
            for _ in range(full_calls):
                client.get_records(ShardIterator=ITERATOR_FULL)

        def empty() -> None:
            for _ in range(empty_calls):
                client.get_records(ShardIterator=ITERATOR_EMPTY)

        per_record = cpu_of(full) / (full_calls * RECORDS_PER_BATCH) * 1e6
        per_empty = cpu_of(empty) / empty_calls * 1e6
    finally:
        client.close()
    return per_record, per_empty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-calls", type=int, default=12, help="10,000-record calls per client")
    parser.add_argument("--empty-calls", type=int, default=1000, help="empty polls per client")
    args = parser.parse_args()

    port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise SystemExit("the canned GetRecords server did not start")
        endpoint = f"http://127.0.0.1:{port}"
        ours_record, ours_empty, ours_decode = bench_ours(endpoint, args.full_calls, args.empty_calls)
        boto_record, boto_empty = bench_boto3(
            endpoint, max(1, args.full_calls // 6), max(1, args.empty_calls // 4)
        )
    finally:
        server.terminate()
        server.join(10)

    print(f"GetRecords CPU, {RECORDS_PER_BATCH:,} x {RECORD_SIZE} B records per call (client process only)")
    print(f"{'':28}{'kinesis-butler':>16}{'boto3':>12}{'ratio':>10}")
    print(f"{'us per record':28}{ours_record:16.3f}{boto_record:12.3f}{boto_record / ours_record:9.1f}x")
    print(f"{'us per empty poll':28}{ours_empty:16.1f}{boto_empty:12.1f}{boto_empty / ours_empty:9.1f}x")
    print(f"{'us per record, decode only':28}{ours_decode:16.3f}")


if __name__ == "__main__":
    main()

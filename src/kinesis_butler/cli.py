"""The ``kinesis-butler`` command: wiring only.

User errors (bad flags, unknown stream, unreachable endpoint, missing credentials, a processor
that does not import) print one line ``kinesis-butler: error: ...`` and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import io
import json
import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import cast

from kinesis_butler.aws import KinesisClient
from kinesis_butler.config import ConsumerConfig, ProducerConfig
from kinesis_butler.consumer import AsyncConsumer
from kinesis_butler.errors import ButlerError, ConfigError, RecordRejected, ResourceNotFound
from kinesis_butler.models import StartPosition
from kinesis_butler.parallel import ordered_parallel
from kinesis_butler.processor import import_processor
from kinesis_butler.producer import AsyncProducer, PutHandle
from kinesis_butler.progress import ProgressBar
from kinesis_butler.testing.emulator import KinesisEmulator

__all__ = ["main"]

log = logging.getLogger("kinesis_butler.cli")

EXIT_USER_ERROR = 2
EXIT_SHARD_FAILED = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kinesis-butler", description="Consume Amazon Kinesis streams.")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    consume = commands.add_parser("consume", help="consume a stream until SIGINT/SIGTERM")
    consume.add_argument(
        "--stream", required=True, action="append", help="stream name (repeat to read several streams)"
    )
    consume.add_argument(
        "--app", required=True, help="application name (workers of one app share the shards)"
    )
    consume.add_argument("--processor", required=True, help="pkg.module:func or pkg.module:ProcessorClass")
    consume.add_argument(
        "--store", default="sqlite:///kinesis-butler.db", help="lease store URL (default: %(default)s)"
    )
    consume.add_argument(
        "--start-at", default="trim_horizon", help="trim_horizon | latest | at_timestamp:ISO8601"
    )
    consume.add_argument(
        "--start-at-shard",
        action="append",
        default=[],
        metavar="SHARD=POSITION",
        help="a per-shard start for a shard with no checkpoint (repeatable); POSITION may also be "
        "at_sequence_number:N or after_sequence_number:N; SHARD may be STREAM/SHARD",
    )
    consume.add_argument(
        "--fanout",
        action="store_true",
        help="read through enhanced fan-out (a registered stream consumer, SubscribeToShard); "
        "falls back to polling where unavailable",
    )
    consume.add_argument(
        "--fanout-consumer", help="the stream consumer's name with --fanout (default: the app name)"
    )
    consume.add_argument(
        "--read-quota-share",
        type=float,
        default=1.0,
        help="the part of each shard's 5 reads/s and 2 MiB/s this app uses (0.5 each for two apps)",
    )
    consume.add_argument("--endpoint-url", help="Kinesis endpoint override (e.g. the local emulator)")
    consume.add_argument("--region", help="AWS region (default: the AWS config chain)")
    consume.add_argument("--worker-id", help="this worker's id in the lease table (default host:pid:random)")
    consume.add_argument(
        "--failover-time", type=float, default=10.0, help="lease failover seconds (default 10)"
    )
    consume.add_argument(
        "--max-attempts", type=int, default=5, help="processor attempts per batch before the shard stops"
    )
    consume.add_argument(
        "--per-record",
        action="store_true",
        help="the processor is a function of one record: keys run concurrently, each key in order "
        "(--max-attempts then counts per record; see docs/parallel.md)",
    )
    consume.add_argument(
        "--concurrency", type=int, help="with --per-record: records handled at once per shard (default 16)"
    )
    consume.add_argument("--quiet", action="store_true", help="no progress line")

    local = commands.add_parser("local", help="run the local Kinesis emulator in the foreground")
    local.add_argument("--port", type=int, default=4567, help="plain HTTP port (default %(default)s)")
    local.add_argument(
        "--create-stream",
        action="append",
        default=[],
        metavar="NAME:SHARDS",
        help="create a stream once the emulator is up (repeatable)",
    )

    _add_produce_parser(commands)

    demo = commands.add_parser("demo", help="an end-to-end demo on the local emulator")
    demo.add_argument(
        "--records", type=int, default=3000, help="records to write per run (default %(default)s)"
    )
    demo.add_argument("--shards", type=int, default=4, help="shards of the demo stream (default %(default)s)")
    demo.add_argument("--dir", default=".demo", help="where the demo keeps its emulator data and leases")
    return parser


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - one return per command
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "consume":
            return asyncio.run(_consume(args))
        if args.command == "local":
            return _local(args)
        if args.command == "produce":
            return asyncio.run(_produce(args))
        if args.command == "demo":
            from kinesis_butler.demo import run_demo  # noqa: PLC0415 - only the demo needs it

            return run_demo(records=args.records, shards=args.shards, directory=args.dir)
    except KeyboardInterrupt:
        return 130
    except ButlerError as exc:
        print(f"kinesis-butler: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _shard_starts(values: list[str]) -> dict[str, StartPosition]:
    starts: dict[str, StartPosition] = {}
    for value in values:
        shard, sep, position = value.partition("=")
        if not sep or not shard.strip():
            raise ConfigError(
                f"--start-at-shard {value!r}: expected SHARD=POSITION "
                "(example: shardId-000000000001=after_sequence_number:4959...)"
            )
        starts[shard.strip()] = StartPosition.parse(position)
    return starts


async def _consume(args: argparse.Namespace) -> int:
    sys.path.insert(0, "")  # so `--processor mymodule:func` finds modules in the current directory
    start = StartPosition.parse(args.start_at)
    processor = import_processor(args.processor)
    if args.concurrency is not None and not args.per_record:
        raise ConfigError("--concurrency needs --per-record")
    if args.per_record:
        processor = ordered_parallel(
            processor,  # type: ignore[arg-type]  # checked by ordered_parallel: a function of a record
            concurrency=16 if args.concurrency is None else args.concurrency,
            max_attempts=args.max_attempts,
        )
    config = ConsumerConfig(
        failover_time=args.failover_time,
        processor_max_attempts=args.max_attempts,
        read_quota_share=args.read_quota_share,
        retrieval="fanout" if args.fanout else "polling",
        fanout_consumer_name=args.fanout_consumer,
    )
    if args.fanout_consumer is not None and not args.fanout:
        raise ConfigError("--fanout-consumer needs --fanout")
    progress = None if args.quiet else ProgressBar(None)
    consumer = AsyncConsumer(
        args.stream[0] if len(args.stream) == 1 else args.stream,
        args.app,
        processor,
        store=args.store,
        start_at=start,
        shard_start_at=_shard_starts(args.start_at_shard),
        region=args.region,
        endpoint_url=args.endpoint_url,
        worker_id=args.worker_id,
        config=config,
        on_batch=(lambda _shard, n: progress.update(n)) if progress else None,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, consumer.request_stop)
    try:
        await consumer.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if progress:
            progress.close()
    print(f"stopped cleanly: worker {consumer.worker_id}", file=sys.stderr)
    if consumer.failures:
        for failure in consumer.failures:
            print(f"kinesis-butler: error: {failure}", file=sys.stderr)
        return EXIT_SHARD_FAILED
    return 0


# -- produce ----------------------------------------------------------------------------------


def _add_produce_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    produce = commands.add_parser(
        "produce", help="write stdin's lines to a stream, one record per line (see docs/cli.md)"
    )
    produce.add_argument("--stream", required=True, help="stream name")
    keys = produce.add_mutually_exclusive_group()
    keys.add_argument(
        "--partition-key-field",
        metavar="F",
        help="parse each line as a JSON object and use its field F as the partition key",
    )
    keys.add_argument("--random-key", action="store_true", help="a random partition key per record")
    produce.add_argument(
        "--aggregate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pack small records into KPL aggregated records (default: on)",
    )
    produce.add_argument(
        "--ordered", action="store_true", help="keep each partition key's records in line order"
    )
    produce.add_argument("--endpoint-url", help="Kinesis endpoint override (e.g. the local emulator)")
    produce.add_argument("--region", help="AWS region (default: the AWS config chain)")
    produce.add_argument("--quiet", action="store_true", help="no progress line")


_READ_CHUNK = 1 << 16
_READ_AHEAD = 16


class _StdinReader:
    """Reads stdin in a daemon thread (it may block forever on a terminal or an open pipe; a
    signal must not wait for it): chunks, then ``b""`` at EOF, or the OSError that stopped it.
    At most ``_READ_AHEAD`` chunks wait to be taken."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self._slots = threading.Semaphore(_READ_AHEAD)
        threading.Thread(target=self._run, name="produce-stdin", daemon=True).start()

    def _run(self) -> None:
        source = cast("io.BufferedReader", sys.stdin.buffer)
        while True:
            try:
                chunk: bytes | BaseException = source.read1(_READ_CHUNK)
            except (OSError, ValueError) as exc:  # ValueError: stdin is closed
                chunk = exc
            self._slots.acquire()
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
            except RuntimeError:  # the loop is closed: the command is over
                return
            if not isinstance(chunk, bytes) or not chunk:
                return

    async def get(self) -> bytes | BaseException:
        chunk = await self._queue.get()
        self._slots.release()
        return chunk


class _KeyError(ValueError):
    """A line that yields no partition key (reported with its line number, then skipped)."""


def _key_of(line: bytes, args: argparse.Namespace) -> str:
    if args.random_key:
        return f"{random.getrandbits(128):032x}"
    if args.partition_key_field is None:
        return hashlib.md5(line, usedforsecurity=False).hexdigest()
    field = args.partition_key_field
    try:
        document = json.loads(line)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _KeyError(f"not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise _KeyError(f"not a JSON object, so it has no field {field!r}")
    if field not in document:
        raise _KeyError(f"no field {field!r}")
    value = document[field]
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return json.dumps(value)
    raise _KeyError(f"field {field!r} is {type(value).__name__}, not a string or a number")


class _ProduceRun:
    """One ``produce`` run: stdin's lines into a producer, counting what became of each line."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress = None if args.quiet else ProgressBar(None)
        self.written = self.failed = self.skipped = self.line_number = 0
        self.read_error: BaseException | None = None
        self.stopped_by: list[int] = []
        self.stop = asyncio.Event()

    def on_signal(self, signum: int) -> None:
        self.stopped_by.append(signum)
        self.stop.set()

    def on_done(self, line_number: int, handle: PutHandle) -> None:
        error = handle.exception()
        if error is None:
            self.written += 1
            if self.progress:
                self.progress.update(1)
        else:
            self.failed += 1
            print(f"kinesis-butler: error: line {line_number}: not written: {error}", file=sys.stderr)

    async def put_lines(self, producer: AsyncProducer, lines: list[bytes]) -> None:
        for line in lines:
            self.line_number += 1
            try:
                handle = await producer.put(line, _key_of(line, self.args))
            except (_KeyError, RecordRejected) as exc:
                self.skipped += 1
                print(f"kinesis-butler: error: line {self.line_number}: skipped: {exc}", file=sys.stderr)
                continue
            handle.add_done_callback(functools.partial(self.on_done, self.line_number))
            if self.stop.is_set():
                return  # stop reading: what was accepted is flushed on close

    async def feed(self, producer: AsyncProducer, reader: _StdinReader) -> None:
        """Put every line until EOF, a read error or a signal."""
        pending = b""
        stop_wait = asyncio.ensure_future(self.stop.wait())
        try:
            while not self.stop.is_set():
                get = asyncio.ensure_future(reader.get())
                await asyncio.wait({get, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                chunk = get.result()
                if isinstance(chunk, BaseException):
                    self.read_error = chunk
                    return
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop() if chunk else b""
                if not chunk and lines[-1] == b"":
                    lines.pop()  # the input ended with a newline: no empty last record
                await self.put_lines(producer, lines)
                if not chunk:
                    return
        finally:
            stop_wait.cancel()

    def report(self, elapsed: float) -> int:
        if self.read_error is not None:
            print(
                f"kinesis-butler: error: cannot read stdin after line {self.line_number}: {self.read_error}",
                file=sys.stderr,
            )
        if self.stopped_by:
            name = signal.Signals(self.stopped_by[0]).name
            print(f"kinesis-butler: {name}: stopped reading after line {self.line_number}", file=sys.stderr)
        rate = self.written / max(elapsed, 1e-6)
        print(
            f"produced {self.written} records to {self.args.stream} in {elapsed:.1f} s "
            f"({rate:,.0f} records/s); {self.failed} failed; {self.skipped} skipped",
            file=sys.stderr,
        )
        if self.failed:
            return EXIT_SHARD_FAILED
        if self.skipped or self.read_error is not None:
            return EXIT_USER_ERROR
        if self.stopped_by:
            return 128 + self.stopped_by[0]
        return 0


async def _produce(args: argparse.Namespace) -> int:
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise ConfigError("there is no standard input to read lines from")
    config = ProducerConfig(aggregate=args.aggregate, ordered=args.ordered)
    run = _ProduceRun(args)
    loop = asyncio.get_running_loop()
    client = KinesisClient(region=args.region, endpoint_url=args.endpoint_url)
    try:
        try:
            await client.describe_stream_summary(args.stream)
        except ResourceNotFound:
            raise ConfigError(
                f"stream {args.stream!r} does not exist at this endpoint/region; "
                "check --stream, --region and --endpoint-url"
            ) from None
        started = time.monotonic()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, run.on_signal, sig)
        try:
            async with AsyncProducer(args.stream, client=client, config=config) as producer:
                await run.feed(producer, _StdinReader(loop))
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if run.progress:
                run.progress.close()
    finally:
        await client.aclose()
    return run.report(time.monotonic() - started)


def _local(args: argparse.Namespace) -> int:
    async def create(endpoint: str) -> None:
        from kinesis_butler.aws.kinesis import KinesisClient  # noqa: PLC0415

        async with KinesisClient(endpoint_url=endpoint, region="us-east-1") as client:
            for spec in args.create_stream:
                name, _, shards = spec.partition(":")
                await client.create_stream(name, int(shards or 1))
                await client.wait_for_active(name)
                print(f"created stream {name} ({shards or 1} shards)")

    with KinesisEmulator(port=args.port) as emulator:
        print(f"Kinesis emulator on {emulator.endpoint_url} (Ctrl-C to stop)")
        asyncio.run(create(emulator.endpoint_url))
        signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # so that both end here, not in a handler
        signal.sigwait(signals)
    return 0


if __name__ == "__main__":
    sys.exit(main())

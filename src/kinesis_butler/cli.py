"""The ``kinesis-butler`` command: wiring only.

User errors (bad flags, unknown stream, unreachable endpoint, missing credentials, a processor
that does not import) print one line ``kinesis-butler: error: ...`` and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from kinesis_butler.config import ConsumerConfig
from kinesis_butler.consumer import AsyncConsumer
from kinesis_butler.errors import ButlerError
from kinesis_butler.models import StartPosition
from kinesis_butler.processor import import_processor
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
    consume.add_argument("--endpoint-url", help="Kinesis endpoint override (e.g. the local emulator)")
    consume.add_argument("--region", help="AWS region (default: the AWS config chain)")
    consume.add_argument("--worker-id", help="this worker's id in the lease table (default host:pid:random)")
    consume.add_argument(
        "--failover-time", type=float, default=10.0, help="lease failover seconds (default 10)"
    )
    consume.add_argument(
        "--max-attempts", type=int, default=5, help="processor attempts per batch before the shard stops"
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

    demo = commands.add_parser("demo", help="an end-to-end demo on the local emulator")
    demo.add_argument(
        "--records", type=int, default=3000, help="records to write per run (default %(default)s)"
    )
    demo.add_argument("--shards", type=int, default=4, help="shards of the demo stream (default %(default)s)")
    demo.add_argument("--dir", default=".demo", help="where the demo keeps its emulator data and leases")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "consume":
            return asyncio.run(_consume(args))
        if args.command == "local":
            return _local(args)
        if args.command == "demo":
            from kinesis_butler.demo import run_demo  # noqa: PLC0415 - only the demo needs it

            return run_demo(records=args.records, shards=args.shards, directory=args.dir)
    except KeyboardInterrupt:
        return 130
    except ButlerError as exc:
        print(f"kinesis-butler: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


async def _consume(args: argparse.Namespace) -> int:
    sys.path.insert(0, "")  # so `--processor mymodule:func` finds modules in the current directory
    start = StartPosition.parse(args.start_at)
    processor = import_processor(args.processor)
    config = ConsumerConfig(failover_time=args.failover_time, processor_max_attempts=args.max_attempts)
    progress = None if args.quiet else ProgressBar(None)
    consumer = AsyncConsumer(
        args.stream[0] if len(args.stream) == 1 else args.stream,
        args.app,
        processor,
        store=args.store,
        start_at=start,
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

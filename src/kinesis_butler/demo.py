"""``kinesis-butler demo``: a real stream on the local emulator, a real worker, the SQLite store.

Each run writes new records, consumes with checkpoints in SQLite, prints a table of shards and
checkpoints, and ends with ``processed N of N records``. The emulator persists its data in the
demo folder, so a second run resumes from the checkpoints and reads only the new records.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from kinesis_butler.aws.kinesis import KinesisClient, PutRecordsEntry
from kinesis_butler.config import ConsumerConfig
from kinesis_butler.consumer import AsyncConsumer
from kinesis_butler.errors import ConfigError, ResourceNotFound
from kinesis_butler.models import Record
from kinesis_butler.progress import ProgressBar
from kinesis_butler.stores import open_store
from kinesis_butler.testing.emulator import KinesisEmulator

__all__ = ["run_demo"]

STREAM = "kinesis-butler-demo"
APP = "demo-app"
PERSIST_INTERVAL_MS = 200


def run_demo(*, records: int, shards: int, directory: str) -> int:
    """Run the demo; returns the process exit code."""
    if records < 1 or not 1 <= shards <= 50:
        raise ConfigError("--records must be >= 1 and --shards within 1..50")
    root = Path(directory).resolve()
    data_dir = root / "kinesis-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    working, snapshot = data_dir / "kinesis-data.json", root / "kinesis-snapshot.json"
    # The emulator rewrites its file in place on a timer, so stopping it can leave the file
    # half written; each run starts from the last snapshot known to be complete.
    if snapshot.exists():
        shutil.copyfile(snapshot, working)
    else:
        working.unlink(missing_ok=True)
    # Dummy credentials: the emulator checks the signature's shape, not the keys.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    emulator = KinesisEmulator(
        extra_env={
            "SHOULD_PERSIST_DATA": "true",
            "PERSIST_PATH": str(data_dir),
            "PERSIST_INTERVAL": f"{PERSIST_INTERVAL_MS}ms",
        },
        log_path=root / "kinesis-local.log",
    )
    print(f"starting the Kinesis emulator (data in {data_dir}) ...")
    with emulator:
        code = asyncio.run(_demo(emulator.endpoint_url, root, records, shards))
        _save_snapshot(working, snapshot, since=time.time())
    return code


def _save_snapshot(working: Path, snapshot: Path, *, since: float, timeout: float = 10.0) -> None:
    """Wait for a complete save made after ``since`` (a condition, not a fixed sleep), then
    copy it aside, so that the next run finds every record this one wrote."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if working.stat().st_mtime > since:
                content = working.read_bytes()
                json.loads(content)  # a save still being written does not parse
                snapshot.write_bytes(content)
                return
        except (OSError, ValueError):
            pass
        time.sleep(PERSIST_INTERVAL_MS / 4000)
    print(
        f"warning: the emulator did not save {working} in time; the next run may start over", file=sys.stderr
    )


async def _demo(endpoint: str, root: Path, count: int, shard_count: int) -> int:
    store_url = f"sqlite:///{root / 'leases.db'}"
    run_id = uuid.uuid4().hex[:8]
    async with KinesisClient(endpoint_url=endpoint, region="us-east-1") as client:
        first_run = await _ensure_stream(client, root, shard_count)
        print(f"writing {count} records (run {run_id}) ...")
        await _write(client, run_id, count)
        tally = _Tally(run_id, count)
        consumer = AsyncConsumer(
            STREAM,
            APP,
            tally.process,
            store=store_url,
            client=client,
            config=ConsumerConfig(idle_poll_interval=0.25, failover_time=6.0),
        )
        runner = asyncio.create_task(consumer.run())
        waiter = asyncio.create_task(tally.done.wait())
        await asyncio.wait({runner, waiter}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        consumer.request_stop()
        waiter.cancel()
        await runner
        tally.progress.close()

    await _print_table(store_url, tally.per_shard)
    return tally.report(first_run=first_run)


async def _ensure_stream(client: KinesisClient, root: Path, shard_count: int) -> bool:
    """Create the demo stream unless the emulator kept it from an earlier run. True if created."""
    try:
        summary = await client.describe_stream_summary(STREAM)
    except ResourceNotFound:
        (root / "leases.db").unlink(missing_ok=True)  # checkpoints of a stream that is gone
        await client.create_stream(STREAM, shard_count)
        await client.wait_for_active(STREAM)
        print(f"created stream {STREAM} with {shard_count} shards")
        return True
    print(f"stream {STREAM} exists ({summary.open_shard_count} open shards): resuming from checkpoints")
    return False


async def _write(client: KinesisClient, run_id: str, count: int) -> None:
    for start in range(0, count, 500):
        entries = [
            PutRecordsEntry(data=json.dumps({"run": run_id, "n": n}).encode(), partition_key=f"key-{n % 97}")
            for n in range(start, min(count, start + 500))
        ]
        result = await client.put_records(STREAM, entries)
        if result.failed_record_count:
            raise ConfigError(f"the emulator rejected {result.failed_record_count} records")


class _Tally:
    """Counts what the demo's processor sees: this run's records, earlier ones, duplicates."""

    def __init__(self, run_id: str, count: int) -> None:
        self.run_id = run_id
        self.count = count
        self.seen: set[int] = set()
        self.per_shard: dict[str, int] = {}
        self.earlier = 0
        self.duplicates = 0
        self.progress = ProgressBar(count)
        self.done = asyncio.Event()

    async def process(self, batch: list[Record]) -> None:
        for record in batch:
            body = json.loads(record.data)
            if body["run"] != self.run_id:
                self.earlier += 1
            elif body["n"] in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(body["n"])
        shard = batch[0].shard_id
        self.per_shard[shard] = self.per_shard.get(shard, 0) + len(batch)
        self.progress.update(len(batch))
        if len(self.seen) >= self.count:
            self.done.set()

    def report(self, *, first_run: bool) -> int:
        if first_run:
            print("first run: every shard started at TRIM_HORIZON")
        elif self.earlier == 0:
            print(f"resumed from the checkpoints: read only the {len(self.seen)} new records")
        else:
            print(
                f"resumed from the checkpoints; {self.earlier} records written by an earlier, interrupted "
                "run had never been checkpointed and were read now"
            )
        if self.duplicates:
            print(f"{self.duplicates} records were delivered more than once")
        print(f"processed {len(self.seen)} of {self.count} records")
        return 0 if len(self.seen) == self.count and self.duplicates == 0 else 1


async def _print_table(store_url: str, per_shard: dict[str, int]) -> None:
    store = open_store(store_url, APP)
    try:
        leases = await store.list_leases()
    finally:
        await store.aclose()
    print()
    print(f"{'shard':<22} {'read now':>8}  {'owner':<10}  checkpoint")
    for lease in leases:
        owner = "(released)" if lease.lease_owner is None else lease.lease_owner[:10]
        print(f"{lease.shard:<22} {per_shard.get(lease.shard, 0):>8}  {owner:<10}  {lease.checkpoint}")
    print()

"""A consumer group of real worker processes on the emulator: join, SIGKILL, SIGTERM, reshard.

Each worker is ``python -m kinesis_butler consume`` with a processor that appends one line per
record to its own file. The test asserts what a user relies on: every record processed, order
kept per shard, duplicates only where a killed worker had not checkpointed, children read only
after their parents ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kinesis_butler.aws import KinesisClient, PutRecordsEntry
from kinesis_butler.models import Lease
from kinesis_butler.stores import open_store
from tests.fixtures_dynamodb import unique_table_name
from tests.helpers import wait_until, wait_until_async
from tests.integration.conftest import StreamFactory

pytestmark = pytest.mark.integration

PROCESSOR = textwrap.dedent(
    """
    import json, os, time

    def handle(records):
        with open(os.environ["OUT"], "a") as out:
            for r in records:
                out.write(f"{time.time()} {r.shard_id} {r.sequence_number} {json.loads(r.data)['n']}\\n")
    """
)
FAILOVER = 3.0
PRODUCE_EVERY = 0.1  # seconds between PutRecords of 40 records: steady traffic, not a wait


class Group:
    """Worker processes of one app, and what they wrote."""

    def __init__(self, tmp: Path, stream: str, endpoint: str, store_url: str) -> None:
        self.tmp, self.stream, self.endpoint, self.store_url = tmp, stream, endpoint, store_url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        (tmp / "grp_proc.py").write_text(PROCESSOR)

    def start(self, name: str) -> None:
        argv = [
            sys.executable, "-m", "kinesis_butler", "consume", "--stream", self.stream, "--app", "group",
            "--processor", "grp_proc:handle", "--store", self.store_url, "--endpoint-url", self.endpoint,
            "--region", "us-east-1", "--worker-id", name, "--failover-time", str(FAILOVER), "--quiet",
        ]  # fmt: skip
        log = (self.tmp / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            argv,
            cwd=self.tmp,
            env={**os.environ, "OUT": str(self.tmp / f"{name}.out")},
            stdout=log,
            stderr=log,
        )
        log.close()

    def lines(self) -> list[tuple[float, str, str, int, int]]:
        rows = []
        for name in self.procs:
            path = self.tmp / f"{name}.out"
            if path.exists():
                for line in path.read_text().splitlines():
                    stamp, shard, seq, n = line.split()
                    rows.append((float(stamp), name, shard, int(seq), int(n)))
        return rows

    async def leases(self) -> list[Lease]:
        store = open_store(self.store_url, "group")
        await store.initialize()
        try:
            return await store.list_leases()
        finally:
            await store.aclose()

    async def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            await asyncio.to_thread(proc.wait, 60)


STORES = ["sqlite", "postgres", "redis", "dynamodb"]


def _store_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'leases.db'}"
    if kind == "postgres":
        dsn: str = request.getfixturevalue("postgres_schema_dsn")
        return dsn
    if kind == "redis":
        url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
        return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"
    if kind == "dynamodb":
        endpoint = request.getfixturevalue("dynamodb_moto")
        return f"dynamodb://{unique_table_name()}?region=us-east-1&endpoint_url={endpoint}"
    raise AssertionError(kind)


@pytest.fixture(params=STORES)
async def group(
    request: pytest.FixtureRequest,
    kinesis: KinesisClient,
    kinesis_endpoint: str,
    new_stream: StreamFactory,
    tmp_path: Path,
) -> AsyncIterator[Group]:
    stream = await new_stream(8)
    grp = Group(tmp_path, stream, kinesis_endpoint, _store_url(request.param, request, tmp_path))
    try:
        yield grp
    finally:
        for proc in grp.procs.values():
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


def _active_owners(leases: list[Lease]) -> Counter[str | None]:
    return Counter(lease.lease_owner for lease in leases if not lease.checkpoint.is_shard_end)


async def test_a_group_of_processes_joins_fails_over_hands_off_and_reshards(  # noqa: PLR0915 - one story
    group: Group, kinesis: KinesisClient
) -> None:
    written = 0
    producing = True

    async def produce() -> None:
        nonlocal written
        while producing:
            entries = [
                PutRecordsEntry(data=json.dumps({"n": n}).encode(), partition_key=f"k{n % 61}")
                for n in range(written, written + 40)
            ]
            result = await kinesis.put_records(group.stream, entries)
            assert result.failed_record_count == 0
            written += 40
            await asyncio.sleep(PRODUCE_EVERY)

    producer = asyncio.create_task(produce())
    try:
        group.start("w1")
        await wait_until(lambda: len(group.lines()) > 50, timeout=60, what="w1 processing")
        for name in ("w2", "w3", "w4"):
            group.start(name)

        async def balanced() -> bool:
            owners = _active_owners(await group.leases())
            return (
                set(owners) == {"w1", "w2", "w3", "w4"} and max(owners.values()) - min(owners.values()) <= 1
            )

        await wait_until_async(balanced, timeout=60, what="4 workers balanced within one lease")

        group.procs["w2"].kill()  # SIGKILL: no shutdown, leases left owned

        async def w2_gone() -> bool:
            owners = _active_owners(await group.leases())
            return "w2" not in owners and None not in owners

        await wait_until_async(w2_gone, timeout=FAILOVER * 6, what="w2's shards taken over")

        group.procs["w3"].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(group.procs["w3"].wait, 60) == 0

        async def w3_gone() -> bool:
            owners = _active_owners(await group.leases())
            return "w3" not in owners and None not in owners

        await wait_until_async(w3_gone, timeout=30, what="w3's shards handed to the others")

        shards = {s.shard_id: s for s in await kinesis.list_shards(group.stream)}
        first, second, third = sorted(shards)[:3]
        middle = (shards[first].starting_hash_key + shards[first].ending_hash_key) // 2
        await kinesis.split_shard(group.stream, first, middle)
        await kinesis.wait_for_active(group.stream)
        await kinesis.merge_shards(group.stream, second, third)
        await kinesis.wait_for_active(group.stream)
        children = {s.shard_id for s in await kinesis.list_shards(group.stream)} - set(shards)
        await wait_until(
            lambda: len({shard for _, _, shard, _, _ in group.lines()} & children) >= 2,
            timeout=60,
            what="records read from the new child shards",
        )
    finally:
        producing = False
        await producer
    await wait_until(
        lambda: {n for *_, n in group.lines()} >= set(range(written)),
        timeout=90,
        what="every record processed",
    )
    await group.stop_all()
    for name, proc in group.procs.items():
        if name != "w2":
            assert proc.returncode == 0, (group.tmp / f"{name}.log").read_text()

    rows = group.lines()
    counts = Counter(n for *_, n in rows)
    assert set(counts) == set(range(written))  # every record, at least once
    by_worker_shard: dict[tuple[str, str], list[int]] = defaultdict(list)
    for _, worker, shard, seq, _ in sorted(rows):
        by_worker_shard[(worker, shard)].append(seq)
    for key, seqs in by_worker_shard.items():
        assert seqs == sorted(seqs), f"order broken on {key}"
    duplicated = {n for n, c in counts.items() if c > 1}
    killed = {n for _, worker, *_, n in rows if worker == "w2"}
    assert duplicated <= killed, (
        f"duplicates outside the killed worker's work: {sorted(duplicated - killed)[:10]}"
    )
    leases = {lease.lease_key: lease for lease in await group.leases()}
    first_read = {shard: min(t for t, _, s, _, _ in rows if s == shard) for _, _, shard, _, _ in rows}
    last_read = {shard: max(t for t, _, s, _, _ in rows if s == shard) for _, _, shard, _, _ in rows}
    checked = 0
    for lease in leases.values():
        for parent in lease.parent_shard_ids:
            assert leases[parent].checkpoint.is_shard_end
            if lease.lease_key in first_read and parent in last_read:
                assert last_read[parent] <= first_read[lease.lease_key], f"{lease.lease_key} before {parent}"
                checked += 1
    assert checked >= 2
    print(
        f"\n{written} records, {len(duplicated)} duplicated (all by the killed worker), "
        f"{checked} parent/child pairs"
    )

"""Several OS processes hammering one SQLite lease file keep every fencing guarantee.

Run by pytest, this module starts worker processes that run this same file as a script.
Each worker opens its own store on the shared file, creates the same leases, waits for a
common "go", then for a few hundred iterations reads a random lease and writes it from the
counter it read: take it if someone else holds it, else renew, checkpoint or evict it. It
records every attempt; the test then checks the records against the final file.
"""

from __future__ import annotations

import asyncio
import json
import random
import select
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from kinesis_butler.errors import StaleLease
from kinesis_butler.models import ExtendedSequenceNumber, Lease
from kinesis_butler.stores import SqliteLeaseStore

WORKERS = 4
LEASES = 8
ITERATIONS = 300
DEADLINE_SECONDS = 20.0
KEYS = [f"shardId-{i:012d}" for i in range(LEASES)]


def _position(lease: Lease) -> int:
    """The checkpoint as a number; -1 before the first checkpoint (TRIM_HORIZON)."""
    return -1 if lease.checkpoint.is_sentinel else int(lease.checkpoint.sequence)


async def _work(db: str, worker: str, seed: int, out: Path) -> None:
    store = SqliteLeaseStore(db, "multiprocess-app")
    await store.initialize()
    created = [await store.create_lease_if_absent(Lease(key)) for key in KEYS]
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # the go signal: all workers start together
    rng = random.Random(seed)
    attempts: list[dict[str, Any]] = []
    seen: list[tuple[str, int, int]] = []  # (key, counter, checkpoint) of every lease observed
    errors: list[str] = []
    for _ in range(ITERATIONS):
        key = rng.choice(KEYS)
        lease = await store.get_lease(key)
        assert lease is not None
        seen.append((key, lease.lease_counter, _position(lease)))
        if lease.lease_owner != worker:
            kind = "take"
        else:
            kind = rng.choices(["renew", "checkpoint", "evict"], weights=[4, 4, 1])[0]
        try:
            if kind == "take":
                result = await store.take_lease(lease, worker)
            elif kind == "renew":
                result = await store.renew_lease(lease)
            elif kind == "evict":
                result = await store.evict_lease(lease)
            else:
                # The checkpoint is the counter it will be stored with, so a checkpoint from an
                # old counter overwriting a newer one would show as the checkpoint going back.
                position = ExtendedSequenceNumber(str(lease.lease_counter + 1), rng.randrange(3))
                result = await store.checkpoint(lease, position)
        except StaleLease:
            attempts.append({"key": key, "from": lease.lease_counter, "kind": kind, "won": False})
            continue
        except Exception as exc:
            errors.append(f"{kind} {key}: {type(exc).__name__}: {exc}")
            continue
        attempts.append({"key": key, "from": lease.lease_counter, "kind": kind, "won": True})
        seen.append((key, result.lease_counter, _position(result)))
    await store.aclose()
    report = {"worker": worker, "created": sum(created), "attempts": attempts, "seen": seen, "errors": errors}
    _write(out, json.dumps(report))


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _wait_for_line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
    return proc.stdout.readline().strip() if ready else ""


@pytest.mark.integration
def test_processes_sharing_one_file_never_lose_or_duplicate_a_write(tmp_path: Path) -> None:
    db = tmp_path / "shared" / "leases.db"
    deadline = time.monotonic() + DEADLINE_SECONDS
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(WORKERS):
            stderr = (tmp_path / f"worker-{i}.err").open("w")
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        str(db),
                        f"worker-{i}",
                        str(1000 + i),
                        str(tmp_path / f"worker-{i}.json"),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                )
            )
            stderr.close()
        for i, proc in enumerate(procs):
            assert _wait_for_line(proc, deadline) == "ready", (tmp_path / f"worker-{i}.err").read_text()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.close()
        for i, proc in enumerate(procs):
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            assert code == 0, (tmp_path / f"worker-{i}.err").read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    reports = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(WORKERS)]
    _check(reports, asyncio.run(_final_leases(str(db))))


async def _final_leases(db: str) -> dict[str, Lease]:
    store = SqliteLeaseStore(db, "multiprocess-app")
    leases = {lease.lease_key: lease for lease in await store.list_leases()}
    await store.aclose()
    return leases


def _check(reports: list[dict[str, Any]], final: dict[str, Lease]) -> None:
    assert [error for report in reports for error in report["errors"]] == []
    assert sorted(final) == KEYS
    assert sum(report["created"] for report in reports) == LEASES  # each lease created once

    wins: dict[str, list[int]] = defaultdict(list)
    last_win: dict[str, tuple[int, str, str]] = {}
    takers: Counter[tuple[str, int]] = Counter()
    for report in reports:
        for attempt in report["attempts"]:
            if attempt["kind"] == "take":
                takers[attempt["key"], attempt["from"]] += 1
            if attempt["won"]:
                wins[attempt["key"]].append(attempt["from"])
                if attempt["from"] + 1 == final[attempt["key"]].lease_counter:
                    last_win[attempt["key"]] = (attempt["from"], attempt["kind"], report["worker"])
    for key, lease in final.items():
        # Exactly one successful write from every counter value the lease went through:
        # nothing lost (final counter == writes counted), nothing won twice.
        assert sorted(wins[key]) == list(range(lease.lease_counter)), key
    contested = [k for k, n in takers.items() if n > 1]
    print(f"{sum(map(len, wins.values()))} writes won, {len(contested)} takes contested")
    assert contested, "no take was contested; the test did not exercise the race"

    # Checkpoints never go backwards: ordered by counter, every observed state agrees and the
    # checkpoint never decreases; it is never ahead of the counter that wrote it.
    states: dict[str, dict[int, int]] = defaultdict(dict)
    for report in reports:
        for key, counter, position in report["seen"]:
            assert states[key].setdefault(counter, position) == position, (key, counter)
            assert position <= counter
    for key, by_counter in states.items():
        positions = [by_counter[c] for c in sorted(by_counter)]
        assert positions == sorted(positions), key
        final_position = -1 if final[key].checkpoint.is_sentinel else int(final[key].checkpoint.sequence)
        assert final_position >= max(positions), key
    for key, (_, kind, worker) in last_win.items():
        expected_owner = None if kind == "evict" else worker
        assert final[key].lease_owner == expected_owner, key


if __name__ == "__main__":
    asyncio.run(_work(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])))

"""Several OS processes hammering the same leases of one lease-store backing.

:func:`run_store_hammer` starts worker processes, each running this module as a script. Each
worker opens its own store on the shared backing, creates the same leases, waits for a common
"go", then for a few hundred iterations reads a random lease and writes it from the counter it
read: take it if someone else holds it, else renew, checkpoint or evict it. It records every
attempt; :func:`check_hammer_reports` then checks the records against the final leases:

* no lost or duplicated write: exactly one successful write from every counter value a lease
  went through;
* at least one take was contested (the test raced);
* checkpoints never go backwards, and the last winner owns the lease (or nobody, after an evict).

The store is described so a child process can rebuild it: an importable store class or function
(``module:qualname``) and JSON-serialisable arguments::

    import pytest
    pytest.register_assert_rewrite("kinesis_butler.testing.store_hammer")  # detailed messages
    from kinesis_butler.stores import SqliteLeaseStore
    from kinesis_butler.testing.store_hammer import run_store_hammer

    def test_processes_never_lose_a_write(tmp_path):
        run_store_hammer(SqliteLeaseStore, [str(tmp_path / "leases.db"), "app"], workdir=tmp_path)

Requires pytest only for its assertion messages; the checks are plain ``assert`` statements.
"""

# ruff: noqa: S101 - this module is a test harness; assert is how it checks.

from __future__ import annotations

import asyncio
import importlib
import json
import random
import select
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kinesis_butler.errors import StaleLease
from kinesis_butler.models import ExtendedSequenceNumber, Lease
from kinesis_butler.stores.base import LeaseStore

__all__ = ["ITERATIONS", "LEASES", "WORKERS", "StoreRecipe", "check_hammer_reports", "run_store_hammer"]

WORKERS = 4
LEASES = 8
ITERATIONS = 300


@dataclass(frozen=True)
class StoreRecipe:
    """How a worker process builds its store: ``factory(*args, **kwargs)``.

    ``factory`` is ``"module:qualname"`` of an importable callable returning a new,
    uninitialized :class:`~kinesis_butler.stores.LeaseStore`; the arguments must be JSON values.
    """

    factory: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        factory: Callable[..., LeaseStore],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> StoreRecipe:
        """The recipe for an importable callable (a store class, a module-level function)."""
        recipe = cls(f"{factory.__module__}:{factory.__qualname__}", list(args), dict(kwargs or {}))
        if recipe.resolve() is not factory:
            raise ValueError(f"{factory!r} cannot be imported as {recipe.factory!r} by a worker process")
        return recipe

    def resolve(self) -> Callable[..., LeaseStore]:
        module, _, qualname = self.factory.partition(":")
        target: Any = importlib.import_module(module)
        for name in qualname.split("."):
            target = getattr(target, name)
        return target  # type: ignore[no-any-return]

    def build(self) -> LeaseStore:
        return self.resolve()(*self.args, **self.kwargs)


def _keys(leases: int) -> list[str]:
    return [f"shardId-{i:012d}" for i in range(leases)]


def _position(lease: Lease) -> int:
    """The checkpoint as a number; -1 before the first checkpoint (TRIM_HORIZON)."""
    return -1 if lease.checkpoint.is_sentinel else int(lease.checkpoint.sequence)


def run_store_hammer(
    factory: Callable[..., LeaseStore],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    workdir: Path,
    workers: int = WORKERS,
    leases: int = LEASES,
    iterations: int = ITERATIONS,
    deadline_seconds: float = 20.0,
) -> None:
    """Hammer the backing ``factory(*args, **kwargs)`` opens from ``workers`` processes, then check.

    Each worker writes its stderr and report to ``workdir`` (``worker-N.err``, ``worker-N.json``);
    the whole run must finish within ``deadline_seconds``. Fails with ``AssertionError``.
    """
    recipe = StoreRecipe.of(factory, args, kwargs)
    spec = json.dumps({"store": asdict(recipe), "leases": leases, "iterations": iterations})
    deadline = time.monotonic() + deadline_seconds
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(workers):
            with (workdir / f"worker-{i}.err").open("w") as stderr:
                argv = [spec, f"worker-{i}", str(1000 + i), str(workdir / f"worker-{i}.json")]
                procs.append(
                    subprocess.Popen(  # noqa: S603 - our own interpreter running this module
                        [sys.executable, "-m", __name__, *argv],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=stderr,
                        text=True,
                    )
                )
        for i, proc in enumerate(procs):
            assert _wait_for_line(proc, deadline) == "ready", (workdir / f"worker-{i}.err").read_text()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.close()
        for i, proc in enumerate(procs):
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            assert code == 0, (workdir / f"worker-{i}.err").read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    reports = [json.loads((workdir / f"worker-{i}.json").read_text()) for i in range(workers)]
    check_hammer_reports(reports, asyncio.run(_final_leases(recipe)), leases=leases)


def _wait_for_line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
    return proc.stdout.readline().strip() if ready else ""


async def _final_leases(recipe: StoreRecipe) -> dict[str, Lease]:
    store = recipe.build()
    leases = {lease.lease_key: lease for lease in await store.list_leases()}
    await store.aclose()
    return leases


def check_hammer_reports(
    reports: list[dict[str, Any]], final: dict[str, Lease], *, leases: int = LEASES
) -> None:
    """Check the workers' reports against the leases the backing holds at the end."""
    assert [error for report in reports for error in report["errors"]] == []
    assert sorted(final) == _keys(leases)
    assert sum(report["created"] for report in reports) == leases  # each lease created once

    wins: dict[str, list[int]] = defaultdict(list)
    last_win: dict[str, tuple[str, str]] = {}
    takers: Counter[tuple[str, int]] = Counter()
    for report in reports:
        for attempt in report["attempts"]:
            if attempt["kind"] == "take":
                takers[attempt["key"], attempt["from"]] += 1
            if attempt["won"]:
                wins[attempt["key"]].append(attempt["from"])
                if attempt["from"] + 1 == final[attempt["key"]].lease_counter:
                    last_win[attempt["key"]] = (attempt["kind"], report["worker"])
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
        assert _position(final[key]) >= max(positions), key
    for key, (kind, worker) in last_win.items():
        assert final[key].lease_owner == (None if kind == "evict" else worker), key


async def _work(
    recipe: StoreRecipe, keys: list[str], iterations: int, worker: str, seed: int
) -> dict[str, Any]:
    store = recipe.build()
    await store.initialize()
    created = [await store.create_lease_if_absent(Lease(key)) for key in keys]
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # the go signal: all workers start together
    rng = random.Random(seed)
    attempts: list[dict[str, Any]] = []
    seen: list[tuple[str, int, int]] = []  # (key, counter, checkpoint) of every lease observed
    errors: list[str] = []
    for _ in range(iterations):
        key = rng.choice(keys)
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
        except Exception as exc:  # noqa: BLE001 - every other failure is recorded and fails the check
            errors.append(f"{kind} {key}: {type(exc).__name__}: {exc}")
            continue
        attempts.append({"key": key, "from": lease.lease_counter, "kind": kind, "won": True})
        seen.append((key, result.lease_counter, _position(result)))
    await store.aclose()
    return {"worker": worker, "created": sum(created), "attempts": attempts, "seen": seen, "errors": errors}


def _main(argv: list[str]) -> None:
    spec, worker, seed, out = argv
    parsed = json.loads(spec)
    recipe = StoreRecipe(**parsed["store"])
    report = asyncio.run(_work(recipe, _keys(parsed["leases"]), parsed["iterations"], worker, int(seed)))
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    _main(sys.argv[1:])

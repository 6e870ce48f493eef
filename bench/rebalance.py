"""How long 64 shards take to balance when a group grows from 1 to 8 workers.

kinesis-butler's defaults against the same library run with KCL-like settings (take and steal
every 2 x failover, at most one lease stolen per round: KCL's maxLeasesToStealAtOneTime), on
the deterministic simulation of kinesis_butler.testing.simulation: the numbers are virtual
seconds, the same on every machine and every run. A worker counts as balanced when it holds
ceil(64 / 8) = 8 leases, plus or minus one, with no handoff still under way; the time is from
the join to the moment the table became balanced for good.

Run: ``python bench/rebalance.py [--seeds 5]`` (about 20 s of CPU for five seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from kinesis_butler import balancing, leasing
from kinesis_butler.config import ConsumerConfig
from kinesis_butler.testing.simulation import Event, Simulation, Snapshot

SHARDS, WORKERS, JOIN_AT = 64, 8, 30.0
FAILOVER = 10.0


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    config: ConsumerConfig
    kcl_steal: bool = False  # steal at most one lease per round, as the KCL does


_KCL_LIKE = ConsumerConfig(failover_time=FAILOVER, take_interval=2 * FAILOVER)
SETTINGS = [
    Setting("kinesis-butler defaults", ConsumerConfig(failover_time=FAILOVER)),
    Setting(
        "defaults, take every failover/2", ConsumerConfig(failover_time=FAILOVER, take_interval=FAILOVER / 2)
    ),
    Setting("KCL-like (take 2 x failover, steal 1)", _KCL_LIKE, kcl_steal=True),
]


@contextlib.contextmanager
def kcl_stealing(enabled: bool) -> Iterator[None]:
    """Emulate the KCL's maxLeasesToStealAtOneTime = 1: balancing.plan_takes has no knob for
    it, so the coordinator's reference to it is wrapped to keep only the first planned steal
    (plan_takes lists steals most-loaded victim first, as the KCL picks them)."""
    if not enabled:
        yield
        return
    original: Callable[..., balancing.TakePlan] = balancing.plan_takes

    def one_steal(*args: Any, **kwargs: Any) -> balancing.TakePlan:
        plan = original(*args, **kwargs)
        return dataclasses.replace(plan, steal=plan.steal[:1])

    # leasing imported the function by name: replace that reference, where the coordinator looks.
    setattr(leasing, "plan_takes", one_steal)  # noqa: B010 - not a public attribute of leasing
    try:
        yield
    finally:
        setattr(leasing, "plan_takes", original)  # noqa: B010


def within_one(snapshot: Snapshot, workers: list[str]) -> bool:
    """Every worker within one of ceil(active / workers), every active lease owned, no handoff."""
    active = [owner for key, owner in snapshot.owners.items() if key not in snapshot.finished]
    if snapshot.handoffs or any(owner not in workers for owner in active):
        return False
    target, counts = math.ceil(len(active) / len(workers)), Counter(active)
    return all(abs(counts[worker] - target) <= 1 for worker in workers)


def settled_at(sim: Simulation, after: float, workers: list[str]) -> float:
    """When the lease table became balanced for good (infinite if it never did)."""
    since = math.inf
    for snapshot in sim.snapshots:
        if not within_one(snapshot, workers):
            since = math.inf
        elif since == math.inf and snapshot.at >= after:
            since = snapshot.at
    return since


def joins(seed: int) -> list[float]:
    """When w1..w7 join: within one second after JOIN_AT, at offsets drawn from ``seed``.
    Not all at one instant: timers of workers that start in the same instant stay aligned
    forever in a simulation (no jitter), so every steal would race the victim's renewal."""
    draw = random.Random(seed)
    return [JOIN_AT + draw.random() for _ in range(WORKERS - 1)]


def run(setting: Setting, seed: int, *, quiet: float) -> tuple[float, int, int]:
    """Seconds from the first join to balance, lease moves, records delivered twice."""
    names = [f"w{i}" for i in range(WORKERS)]
    events = [
        Event(0, "join", names[0]),
        *(Event(at, "join", name) for at, name in zip(joins(seed), names[1:], strict=True)),
    ]
    sim = Simulation(events, shards=SHARDS, config=setting.config, quiet=quiet, seed=seed)
    with kcl_stealing(setting.kcl_steal):
        sim.run()
    joined = min(event.at for event in sim.applied if event.worker != names[0])
    moves = sum(
        1
        for before, after in zip(sim.snapshots, sim.snapshots[1:], strict=False)
        for key, owner in after.owners.items()
        if after.at >= joined and before.owners.get(key) not in (None, owner) and owner is not None
    )
    twice = sum(n - 1 for n in Counter((d.shard, s) for d in sim.deliveries for s in d.sequences).values())
    return settled_at(sim, joined, names) - joined, moves, twice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="runs per setting (each seed is deterministic)")
    parser.add_argument(
        "--quiet", type=float, default=400.0, help="virtual seconds simulated after the joins"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the library logs every move; the table is the output
    print(f"{SHARDS} shards, 1 -> {WORKERS} workers (7 join within 1 s); virtual seconds until every worker")
    print(f"holds ceil({SHARDS}/{WORKERS}) +- 1 leases for good ({args.seeds} seeds: median [min-max])\n")
    print(f"{'setting':42} {'to balance':>22} {'moves':>6} {'twice':>6} {'vs defaults':>12}")
    baseline = None
    started = time.process_time()
    for setting in SETTINGS:
        results = [run(setting, seed, quiet=args.quiet) for seed in range(args.seeds)]
        times = [seconds for seconds, _, _ in results]
        median = statistics.median(times)
        baseline = baseline or median
        spread = f"{median:6.1f} [{min(times):.1f}-{max(times):.1f}]"
        moves = statistics.median(m for _, m, _ in results)
        twice = max(t for _, _, t in results)
        print(f"{setting.name:42} {spread:>22} {moves:>6.0f} {twice:>6} {median / baseline:>11.1f}x")
    print(f"\n(moves: lease owner changes after the joins; twice: records delivered twice; "
          f"{time.process_time() - started:.0f} s of CPU)")  # fmt: skip


if __name__ == "__main__":
    main()

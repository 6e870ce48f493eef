"""How long a crashed worker's shards stay unprocessed: 8 workers share 64 shards, one is killed
(SIGKILL: no graceful release, its leases must expire), and we time until every shard it held
was taken and started again by a survivor (its processor initialized) and until each of them
delivered its first record again.

kinesis-butler's defaults against the same library with KCL-like settings (take every
2 x failover, at most one steal per round), on the deterministic simulation: virtual seconds.
Expiry is judged from when a survivor first *saw* a lease's counter, so the floor is the
failover time (10 s) and the rest is how often survivors read the lease table.

Run: ``python bench/failover.py [--seeds 5]`` (about 40 s of CPU for five seeds).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import time

from rebalance import SETTINGS, SHARDS, WORKERS, Setting, joins, kcl_stealing, settled_at

from kinesis_butler.testing.simulation import Event, Simulation

CRASH_AT = 300.0  # long after even the KCL-like group balanced (about 140 s)
VICTIM = "w3"


def run(setting: Setting, seed: int) -> tuple[float, float, float, int]:
    """Seconds from the crash until its shards were all started elsewhere, until they all
    delivered again, until the survivors were balanced again; and how many shards it held."""
    names = [f"w{i}" for i in range(WORKERS)]
    crash = CRASH_AT + random.Random(seed).uniform(0, setting.config.failover_time)  # any phase
    events = [
        Event(0, "join", names[0]),
        *(Event(at, "join", name) for at, name in zip(joins(seed), names[1:], strict=True)),
    ]
    events.append(Event(crash, "crash", VICTIM))
    sim = Simulation(events, shards=SHARDS, config=setting.config, quiet=120.0, seed=seed)
    with kcl_stealing(setting.kcl_steal):
        sim.run()
    held = sim.workers[VICTIM].held_at_crash
    started, delivered = [], []
    for shard in held:
        starts = [t.started for t in sim.tenures.values() if t.shard == shard and t.started >= crash]
        firsts = [d.at for d in sim.deliveries if d.shard == shard and d.worker != VICTIM and d.at >= crash]
        started.append(min(starts, default=math.inf))
        delivered.append(min(firsts, default=math.inf))
    survivors = [name for name in names if name != VICTIM]
    balanced = settled_at(sim, crash, survivors)
    return max(started) - crash, max(delivered) - crash, balanced - crash, len(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="runs per setting (each seed is deterministic)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # every expiry and take is logged; the table is the output
    print(f"{SHARDS} shards on {WORKERS} workers, {VICTIM} killed; virtual seconds after the kill, ")
    print(f"{args.seeds} seeds (the kill lands at a different phase of the timers): median [min-max]\n")
    print(
        f"{'setting':42} {'all restarted':>20} {'all delivering':>20} {'rebalanced':>20} {'vs defaults':>12}"
    )
    baseline = None
    cpu = time.process_time()
    for setting in SETTINGS:
        results = [run(setting, seed) for seed in range(args.seeds)]
        cells = []
        for column in range(3):
            values = [result[column] for result in results]
            cells.append(f"{statistics.median(values):6.1f} [{min(values):.1f}-{max(values):.1f}]")
        median = statistics.median(result[1] for result in results)
        baseline = baseline or median
        print(f"{setting.name:42} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} {median / baseline:>11.1f}x")
    cpu = time.process_time() - cpu
    print(f"\n(the victim held {results[-1][3]} shards; ratio on 'all delivering'; {cpu:.0f} s of CPU)")


if __name__ == "__main__":
    main()

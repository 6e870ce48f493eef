"""Which leases a worker should take or steal: a pure function, no I/O, unit-tested alone.

The fair share is ``ceil(active leases / live workers)``, where live workers are the owners
of unexpired leases plus the planning worker. One round:

1. take expired leases (their owner stopped renewing), then unassigned ones, up to the share;
2. only when there are none left, *steal* from workers above the share, most loaded first.

Stealing converges fast without flapping:

* several leases per round when far from balance, but never more than half the gap between
  the victim and the thief, so two workers never overshoot past each other;
* hysteresis: a victim must hold more than ``floor(leases / workers)`` *and* at least two
  more leases than the thief; a difference of one is balanced;
* a worker never steals while it is itself at or above the share.

The KCL steals one lease per round (``maxLeasesToStealAtOneTime`` = 1) every 2 x failover,
which is why its users wait minutes for a new worker to get its share.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Collection, Sequence

from kinesis_butler.models import Lease

__all__ = ["TakePlan", "plan_takes"]


@dataclasses.dataclass(frozen=True, slots=True)
class TakePlan:
    """The outcome of one balancing round for one worker."""

    take: tuple[Lease, ...]  # expired or unassigned leases, as last seen (their counters fence the take)
    steal: tuple[Lease, ...]  # leases of live, overloaded workers: moved by graceful handoff
    target: int  # this worker's fair share
    live_workers: int  # workers counted, this one included


def plan_takes(
    leases: Sequence[Lease],
    worker_id: str,
    expired: Collection[str],
    *,
    max_leases: int | None = None,
    rng: random.Random | None = None,
) -> TakePlan:
    """Plan what ``worker_id`` takes and steals this round.

    Args:
        leases: every lease of the application, as last read.
        worker_id: the planning worker.
        expired: keys of leases whose counter this worker saw unchanged for the failover time.
        max_leases: a cap on what this worker holds.
        rng: randomness for the order among equally good candidates (so workers that start
            together do not all race for the same lease).

    Finished leases (checkpoint SHARD_END) are neither counted nor taken. Leases in a handoff
    (``checkpoint_owner`` set) count for their new owner and are never stolen again.
    """
    shuffle = (rng or random).shuffle
    active = [lease for lease in leases if not lease.checkpoint.is_shard_end]
    live_leases = [
        lease for lease in active if lease.lease_owner is not None and lease.lease_key not in expired
    ]
    load: Counter[str] = Counter(lease.lease_owner for lease in live_leases if lease.lease_owner is not None)
    workers = set(load) | {worker_id}
    target = math.ceil(len(active) / len(workers)) if active else 0
    if max_leases is not None:
        target = min(target, max_leases)
    mine = load.get(worker_id, 0)
    need = target - mine
    if need <= 0:
        return TakePlan((), (), target, len(workers))

    unassigned = [lease for lease in active if lease.lease_owner is None]
    stale = [lease for lease in active if lease.lease_owner is not None and lease.lease_key in expired]
    shuffle(unassigned)
    shuffle(stale)
    # Expired leases first: their shards are not being processed by anyone right now.
    take = (stale + unassigned)[:need]
    if take:
        return TakePlan(tuple(take), (), target, len(workers))

    steal: list[Lease] = []
    by_owner: dict[str, list[Lease]] = {}
    for lease in live_leases:
        if lease.checkpoint_owner is None:  # not already being handed off
            by_owner.setdefault(lease.lease_owner or "", []).append(lease)
    floor_share = len(active) // len(workers)
    for victim, count in sorted(load.items(), key=lambda item: (-item[1], item[0])):
        if need <= 0:
            break
        if victim == worker_id or count <= floor_share or count - mine < 2:
            continue
        budget = min(need, count - floor_share, (count - mine) // 2)
        candidates = by_owner.get(victim, [])
        shuffle(candidates)
        chosen = candidates[:budget]
        steal.extend(chosen)
        need -= len(chosen)
        mine += len(chosen)
    return TakePlan((), tuple(steal), target, len(workers))

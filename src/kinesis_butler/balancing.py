"""Which leases a worker should take: a pure function, no I/O, unit-tested alone.

The walking skeleton takes unassigned and expired leases up to the fair share
``ceil(active leases / live workers)``; stealing from overloaded workers belongs to the
consumer-group work and plugs in here.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Collection, Sequence

from kinesis_butler.models import Lease

__all__ = ["TakePlan", "plan_takes"]


@dataclasses.dataclass(frozen=True, slots=True)
class TakePlan:
    """The outcome of one balancing round for one worker."""

    take: tuple[Lease, ...]  # leases to take, as last seen (their counters fence the take)
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
    """Plan which leases ``worker_id`` takes this round.

    Args:
        leases: every lease of the application, as last read.
        worker_id: the planning worker.
        expired: keys of leases whose counter this worker saw unchanged for the failover time.
        max_leases: a cap on what this worker holds.
        rng: randomness for the order among equally good candidates (so workers that start
            together do not all race for the same lease).

    Finished leases (checkpoint SHARD_END) are neither counted nor taken.
    """
    active = [lease for lease in leases if not lease.checkpoint.is_shard_end]
    live = {
        lease.lease_owner
        for lease in active
        if lease.lease_owner is not None and lease.lease_key not in expired
    }
    live.add(worker_id)
    target = math.ceil(len(active) / len(live)) if active else 0
    if max_leases is not None:
        target = min(target, max_leases)
    mine = sum(1 for lease in active if lease.lease_owner == worker_id and lease.lease_key not in expired)
    need = target - mine
    if need <= 0:
        return TakePlan((), target, len(live))
    unassigned = [lease for lease in active if lease.lease_owner is None]
    stale = [lease for lease in active if lease.lease_owner is not None and lease.lease_key in expired]
    shuffle = (rng or random).shuffle
    shuffle(unassigned)
    shuffle(stale)
    # Expired leases first: their shards are not being processed by anyone right now.
    return TakePlan(tuple((stale + unassigned)[:need]), target, len(live))

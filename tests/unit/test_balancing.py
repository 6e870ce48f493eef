"""plan_takes: the pure balancing function."""

from __future__ import annotations

import random

from kinesis_butler.balancing import plan_takes
from kinesis_butler.models import SHARD_END, Lease


def _leases(owners: list[str | None]) -> list[Lease]:
    return [Lease(f"shard-{i}", lease_owner=owner) for i, owner in enumerate(owners)]


def test_a_lone_worker_takes_every_unassigned_lease() -> None:
    plan = plan_takes(_leases([None] * 5), "me", set())
    assert len(plan.take) == 5 and plan.target == 5 and plan.live_workers == 1


def test_takes_only_up_to_the_fair_share() -> None:
    leases = _leases(["a", "a", None, None, None, None])
    plan = plan_takes(leases, "me", set(), rng=random.Random(1))
    assert plan.live_workers == 2 and plan.target == 3
    assert len(plan.take) == 3
    assert all(lease.lease_owner is None for lease in plan.take)


def test_expired_leases_are_taken_before_unassigned_ones() -> None:
    leases = _leases(["dead", None, None])
    plan = plan_takes(leases, "me", {"shard-0"}, max_leases=1)
    assert [lease.lease_key for lease in plan.take] == ["shard-0"]


def test_live_owners_leases_are_not_taken() -> None:
    plan = plan_takes(_leases(["a", "b"]), "me", set())
    assert plan.take == ()


def test_finished_shards_are_neither_counted_nor_taken() -> None:
    leases = [Lease("done", checkpoint=SHARD_END), Lease("open")]
    plan = plan_takes(leases, "me", set())
    assert [lease.lease_key for lease in plan.take] == ["open"] and plan.target == 1


def test_max_leases_caps_the_share() -> None:
    plan = plan_takes(_leases([None] * 10), "me", set(), max_leases=3)
    assert len(plan.take) == 3

"""plan_takes: the pure balancing function, alone and iterated as a whole group would run it."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from kinesis_butler.balancing import plan_takes
from kinesis_butler.models import SHARD_END, Lease


def _leases(owners: list[str | None]) -> list[Lease]:
    return [Lease(f"shard-{i:03d}", lease_owner=owner) for i, owner in enumerate(owners)]


def test_a_lone_worker_takes_every_unassigned_lease() -> None:
    plan = plan_takes(_leases([None] * 5), "me", set())
    assert len(plan.take) == 5
    assert (plan.target, plan.live_workers, plan.steal) == (5, 1, ())


def test_takes_only_up_to_the_fair_share() -> None:
    leases = _leases(["a", "a", None, None, None, None])
    plan = plan_takes(leases, "me", set(), rng=random.Random(1))
    assert (plan.live_workers, plan.target) == (2, 3)
    assert len(plan.take) == 3
    assert all(lease.lease_owner is None for lease in plan.take)


def test_expired_leases_are_taken_before_unassigned_ones() -> None:
    leases = _leases(["dead", None, None])
    plan = plan_takes(leases, "me", {"shard-000"}, max_leases=1)
    assert [lease.lease_key for lease in plan.take] == ["shard-000"]


def test_an_expired_owner_is_not_counted_as_a_live_worker() -> None:
    plan = plan_takes(_leases(["dead", "dead", "a", "a"]), "me", {"shard-000", "shard-001"})
    assert plan.live_workers == 2
    assert {lease.lease_key for lease in plan.take} == {"shard-000", "shard-001"}


def test_finished_shards_are_neither_counted_nor_taken() -> None:
    leases = [Lease("done", checkpoint=SHARD_END), Lease("open")]
    plan = plan_takes(leases, "me", set())
    assert [lease.lease_key for lease in plan.take] == ["open"]
    assert plan.target == 1


def test_max_leases_caps_the_share() -> None:
    plan = plan_takes(_leases([None] * 10), "me", set(), max_leases=3)
    assert len(plan.take) == 3


def test_a_new_worker_steals_several_leases_at_once_but_at_most_half_the_gap() -> None:
    plan = plan_takes(_leases(["a"] * 64), "me", set(), rng=random.Random(0))
    assert plan.take == ()
    assert len(plan.steal) == 32  # target 32, gap 64: half the gap
    assert all(lease.lease_owner == "a" for lease in plan.steal)


def test_balanced_workers_never_steal_from_each_other() -> None:
    # 64 over 7 workers: shares of 9 and 10 are balanced.
    owners = [w for w, n in zip("abcdefg", [10, 9, 9, 9, 9, 9, 9], strict=True) for _ in range(n)]
    for me in "abcdefg":
        plan = plan_takes(_leases(list(owners)), me, set())
        assert plan.take == ()
        assert plan.steal == (), me


def test_a_short_worker_steals_from_workers_at_the_ceiling_share() -> None:
    owners = [w for w, n in zip("abcdefg", [10, 10, 10, 10, 10, 10, 4], strict=True) for _ in range(n)]
    plan = plan_takes(_leases(owners), "g", set())
    # One from each of five victims: then g holds 9, the sixth victim 10, and all are within one.
    assert len(plan.steal) == 5
    assert len({lease.lease_owner for lease in plan.steal}) == 5


def test_leases_in_a_handoff_are_not_stolen_again() -> None:
    leases = [Lease(f"s{i}", lease_owner="a", checkpoint_owner="x" if i < 4 else None) for i in range(8)]
    plan = plan_takes(leases, "me", set())
    assert plan.steal
    assert all(lease.checkpoint_owner is None for lease in plan.steal)


def _round(owners: dict[str, str | None], workers: list[str], rng: random.Random) -> int:
    """One take round of every worker, in random order, each seeing the latest table (as
    fenced writes serialize them). Returns how many leases moved."""
    moved = 0
    order = list(workers)
    rng.shuffle(order)
    for worker in order:
        leases = [Lease(key, lease_owner=owner) for key, owner in sorted(owners.items())]
        plan = plan_takes(leases, worker, set(), rng=rng)
        for lease in plan.take + plan.steal:
            owners[lease.lease_key] = worker
            moved += 1
    return moved


def _spread(owners: dict[str, str | None], workers: list[str]) -> tuple[int, int]:
    load = Counter(owners.values())
    counts = [load.get(worker, 0) for worker in workers]
    return min(counts), max(counts)


def test_64_shards_one_to_eight_workers_balance_within_a_few_rounds_and_then_stay() -> None:
    rng = random.Random(7)
    owners: dict[str, str | None] = {f"shard-{i:03d}": "w0" for i in range(64)}
    workers = [f"w{i}" for i in range(8)]
    rounds = 0
    while _spread(owners, workers)[1] - _spread(owners, workers)[0] > 1:
        rounds += 1
        _round(owners, workers, rng)
        assert rounds <= 6, f"not balanced after 6 rounds: {Counter(owners.values())}"
    assert _spread(owners, workers) == (8, 8)
    for _ in range(5):
        assert _round(owners, workers, rng) == 0  # no flapping once balanced


@settings(max_examples=150, deadline=None)
@given(
    leases=st.integers(min_value=1, max_value=120),
    workers=st.integers(min_value=1, max_value=12),
    seed=st.integers(min_value=0, max_value=2**32),
    assigned=st.floats(min_value=0.0, max_value=1.0),
)
def test_any_start_converges_to_within_one_and_stays(
    leases: int, workers: int, seed: int, assigned: float
) -> None:
    rng = random.Random(seed)
    names = [f"w{i}" for i in range(workers)]
    owners: dict[str, str | None] = {
        f"shard-{i:03d}": (rng.choice(names[: max(1, workers // 2)]) if rng.random() < assigned else None)
        for i in range(leases)
    }
    for _ in range(12):
        _round(owners, names, rng)
    low, high = _spread(owners, names)
    assert None not in owners.values()
    assert high - low <= 1, Counter(owners.values())
    assert _round(owners, names, rng) == 0

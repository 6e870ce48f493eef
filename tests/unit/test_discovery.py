"""new_leases: which shards get leases, where they start, parents before children."""

from __future__ import annotations

from kinesis_butler.discovery import ShardGraph, new_leases
from kinesis_butler.models import AT_TIMESTAMP, LATEST, TRIM_HORIZON, Shard, StartPosition

PARENT = Shard("p", ending_sequence_number="100")
LEFT = Shard("l", parent_shard_id="p")
RIGHT = Shard("r", parent_shard_id="p")
OTHER = Shard("o", ending_sequence_number="200")
MERGED = Shard("m", parent_shard_id="o", adjacent_parent_shard_id="r")


def test_topological_order_puts_parents_first() -> None:
    order = [s.shard_id for s in ShardGraph.of([MERGED, RIGHT, LEFT, OTHER, PARENT]).topological()]
    assert order.index("p") < order.index("l")
    assert order.index("p") < order.index("r") < order.index("m")
    assert order.index("o") < order.index("m")


def test_trim_horizon_leases_every_shard_descendants_at_trim_horizon() -> None:
    leases = new_leases([PARENT, LEFT, RIGHT], [], StartPosition.parse("trim_horizon"))
    assert {lease.lease_key: lease.checkpoint for lease in leases} == {
        "p": TRIM_HORIZON,
        "l": TRIM_HORIZON,
        "r": TRIM_HORIZON,
    }
    assert next(lease for lease in leases if lease.lease_key == "l").parent_shard_ids == {"p"}


def test_latest_skips_closed_roots_and_starts_their_children_at_latest() -> None:
    leases = new_leases([PARENT, LEFT, RIGHT], [], StartPosition.parse("latest"))
    assert {lease.lease_key: lease.checkpoint for lease in leases} == {"l": LATEST, "r": LATEST}


def test_children_of_leased_parents_start_at_trim_horizon_even_with_latest() -> None:
    leases = new_leases([PARENT, LEFT, RIGHT], ["p"], StartPosition.parse("latest"))
    assert {lease.lease_key: lease.checkpoint for lease in leases} == {"l": TRIM_HORIZON, "r": TRIM_HORIZON}


def test_at_timestamp_descendants_also_start_at_the_timestamp() -> None:
    leases = new_leases([PARENT, LEFT], [], StartPosition.parse("at_timestamp:2026-01-01T00:00:00Z"))
    assert {lease.lease_key: lease.checkpoint for lease in leases} == {"p": AT_TIMESTAMP, "l": AT_TIMESTAMP}


def test_existing_leases_are_not_recreated() -> None:
    assert new_leases([PARENT, LEFT], ["p", "l"], StartPosition()) == []


def test_hash_ranges_are_recorded() -> None:
    shard = Shard("s", starting_hash_key=5, ending_hash_key=10)
    (lease,) = new_leases([shard], [], StartPosition())
    assert (lease.starting_hash_key, lease.ending_hash_key, lease.stream_name) == ("5", "10", None)


def test_multi_stream_keys_are_namespaced_and_only_their_stream_counts_as_existing() -> None:
    ident = "123456789012:orders:1700000000"
    leases = new_leases([PARENT, LEFT], ["p", f"{ident}:p"], StartPosition(), stream_identifier=ident)
    assert [(lease.lease_key, lease.shard_id, lease.stream_name) for lease in leases] == [
        (f"{ident}:l", "l", ident)
    ]
    assert leases[0].parent_shard_ids == {"p"}
    assert leases[0].key_for("p") == f"{ident}:p"

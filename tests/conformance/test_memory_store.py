"""The lease-store conformance suite against MemoryLeaseStore, plus its test-only extras."""

from __future__ import annotations

import pytest

from kinesis_butler.errors import StoreUnavailable
from kinesis_butler.models import Lease
from kinesis_butler.stores import MemoryBacking, MemoryLeaseStore

pytest.register_assert_rewrite("kinesis_butler.testing.store_conformance")

from kinesis_butler.testing.store_conformance import LeaseStoreConformance, StoreFactory  # noqa: E402


class TestMemoryStore(LeaseStoreConformance):
    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        backing = MemoryBacking()
        return lambda app: MemoryLeaseStore(app, backing=backing)


async def test_fail_next_fails_calls_then_recovers_without_side_effects() -> None:
    store = MemoryLeaseStore("app")
    store.backing.fail_next(StoreUnavailable("simulated outage"), times=2)
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="simulated outage"):
            await store.create_lease_if_absent(Lease("shardId-0"))
    assert await store.list_leases() == []
    assert await store.create_lease_if_absent(Lease("shardId-0"))


async def test_backing_snapshot_lists_leases_in_key_order() -> None:
    backing = MemoryBacking()
    store = MemoryLeaseStore("app", backing=backing)
    for key in ("b", "a"):
        await store.create_lease_if_absent(Lease(key))
    assert [lease.lease_key for lease in backing.leases("app")] == ["a", "b"]
    assert backing.leases("other-app") == []

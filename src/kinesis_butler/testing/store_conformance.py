"""The conformance suite every :class:`~kinesis_butler.stores.LeaseStore` backend must pass.

Subclass :class:`LeaseStoreConformance` in a test module and override one fixture,
``store_factory``; pytest then runs every test below against your backend::

    import pytest
    from kinesis_butler.stores import SqliteLeaseStore
    from kinesis_butler.testing.store_conformance import LeaseStoreConformance, StoreFactory

    class TestSqliteStore(LeaseStoreConformance):
        @pytest.fixture
        def store_factory(self, tmp_path) -> StoreFactory:
            return lambda app: SqliteLeaseStore(str(tmp_path / "leases.db"), app)

The factory takes an application name and returns a *new, uninitialized* store instance (its
own connection) over one backing shared by every call within a test, fresh for each test:
several instances stand for several workers. The suite initializes and closes every instance
it opens. The fixture may be async or take other fixtures (a server, a temporary database).

Requires pytest and pytest-asyncio; the tests carry the ``asyncio`` mark, so they run in
pytest-asyncio's strict mode as well as in auto mode. For pytest's detailed assertion
messages, call ``pytest.register_assert_rewrite("kinesis_butler.testing.store_conformance")``
before importing this module (in a ``conftest.py`` or at the top of the test module).
"""

# ruff: noqa: S101 - this module is a pytest suite; assert is how it checks.

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ClassVar, Protocol

import pytest
import pytest_asyncio

from kinesis_butler.errors import ClosedError, StaleLease
from kinesis_butler.models import AT_TIMESTAMP, LATEST, SHARD_END, TRIM_HORIZON, ExtendedSequenceNumber, Lease
from kinesis_butler.stores.base import LeaseStore
from kinesis_butler.stores.memory import MemoryLeaseStore

__all__ = ["ROUND_TRIP_LEASES", "LeaseStoreConformance", "StoreFactory", "StoreOpener"]

StoreFactory = Callable[[str], LeaseStore]
"""Makes a new, uninitialized store instance for an application, over the test's shared backing."""


class StoreOpener(Protocol):
    """Opens a store instance that the suite closes at teardown."""

    def __call__(self, app: str = ..., *, initialize: bool = True) -> Awaitable[LeaseStore]: ...


APP = "conformance-app"
KEY = "shardId-000000000001"
SEQ_56 = "49590338271490256608559692538361571095921575989136588898"  # a real-sized sequence number
MULTI_STREAM_KEY = "123456789012:my-stream:1700000000:shardId-000000000001"

ROUND_TRIP_LEASES: dict[str, Lease] = {
    "defaults": Lease("shardId-000000000000"),
    "every-field": Lease(
        lease_key=MULTI_STREAM_KEY,
        lease_owner="worker-1",
        lease_counter=7,
        checkpoint=ExtendedSequenceNumber(SEQ_56, 3),
        pending_checkpoint=ExtendedSequenceNumber(SEQ_56[:-1] + "9", 12),
        owner_switches_since_checkpoint=2,
        parent_shard_ids=frozenset({"shardId-000000000000"}),
        child_shard_ids=frozenset({"shardId-000000000002", "shardId-000000000003"}),
        starting_hash_key="0",
        ending_hash_key=str(2**128 - 1),
        checkpoint_owner="worker-0",
        stream_name="123456789012:my-stream:1700000000",
        shard_id="shardId-000000000001",
    ),
    "shard-end-merge-child": Lease(
        "shardId-000000000009",
        checkpoint=SHARD_END,
        parent_shard_ids=frozenset({"shardId-000000000004", "shardId-000000000005"}),
    ),
    "latest": Lease("shardId-000000000010", checkpoint=LATEST, lease_counter=2**62),
    "at-timestamp": Lease("shardId-000000000011", checkpoint=AT_TIMESTAMP, pending_checkpoint=SHARD_END),
    "sub-sequence-only": Lease("shardId-000000000012", checkpoint=ExtendedSequenceNumber("1", 2**31)),
    # Characters that trip string-built queries, LIKE / glob scans and path-like keys.
    "odd-key": Lease("odd key/with 'quotes' \"and\" %_*?[x]\\ {braces}:#1", lease_owner="w:1/a"),
}


async def _write(kind: str, store: LeaseStore, lease: Lease) -> object:
    if kind == "renew":
        return await store.renew_lease(lease)
    if kind == "take":
        return await store.take_lease(lease, "intruder")
    if kind == "evict":
        return await store.evict_lease(lease)
    if kind == "checkpoint":
        return await store.checkpoint(lease, ExtendedSequenceNumber("42"))
    if kind == "update_lineage":
        return await store.update_lineage(lease, child_shard_ids=frozenset({"shardId-000000000099"}))
    await store.delete_lease(lease)
    return None


WRITES = ("renew", "take", "evict", "checkpoint", "update_lineage", "delete")
OWNER_FENCED_WRITES = ("renew", "evict", "checkpoint")


def _assert_stale(exc: StaleLease, lease: Lease) -> None:
    assert exc.lease_key == lease.lease_key
    assert exc.expected_counter == lease.lease_counter


class LeaseStoreConformance:
    """The suite. Subclass it, name the subclass ``Test...``, override ``store_factory``."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]

    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        """Override: return a factory of store instances sharing one fresh backing."""
        raise NotImplementedError(f"{type(self).__name__} must override the store_factory fixture")

    @pytest_asyncio.fixture
    async def open_store(self, store_factory: StoreFactory) -> AsyncIterator[StoreOpener]:
        """Opens extra instances (other workers, other apps); all closed at teardown."""
        opened: list[LeaseStore] = []

        async def open_(app: str = APP, *, initialize: bool = True) -> LeaseStore:
            store = store_factory(app)
            opened.append(store)
            if initialize:
                await store.initialize()
            return store

        yield open_
        for store in reversed(opened):
            await store.aclose()

    @pytest_asyncio.fixture
    async def store(self, open_store: StoreOpener) -> LeaseStore:
        """One initialized instance for application ``conformance-app``."""
        return await open_store()

    # -- schema and reads -------------------------------------------------------------------

    async def test_store_satisfies_the_protocol(self, store: LeaseStore) -> None:
        assert isinstance(store, LeaseStore)

    async def test_initialize_is_idempotent_and_keeps_leases(self, store: LeaseStore) -> None:
        await store.initialize()
        assert await store.create_lease_if_absent(Lease(KEY))
        await store.initialize()
        assert await store.list_leases() == [Lease(KEY)]

    async def test_instances_initialize_concurrently(self, open_store: StoreOpener) -> None:
        stores = [await open_store(initialize=False) for _ in range(4)]
        await asyncio.gather(*(s.initialize() for s in stores))
        assert await stores[0].create_lease_if_absent(Lease(KEY))
        assert [await s.get_lease(KEY) for s in stores] == [Lease(KEY)] * 4

    async def test_get_missing_lease_returns_none(self, store: LeaseStore) -> None:
        assert await store.get_lease("shardId-404") is None
        assert await store.list_leases() == []

    async def test_create_if_absent_creates_once_and_never_overwrites(self, store: LeaseStore) -> None:
        first = Lease(KEY, lease_owner="a", lease_counter=3)
        assert await store.create_lease_if_absent(first) is True
        assert await store.create_lease_if_absent(Lease(KEY, lease_owner="b")) is False
        assert await store.get_lease(KEY) == first

    async def test_concurrent_creates_of_one_key_create_it_once(self, open_store: StoreOpener) -> None:
        stores = [await open_store() for _ in range(4)]
        created = await asyncio.gather(
            *(s.create_lease_if_absent(Lease(KEY, lease_owner=f"w{i}")) for i, s in enumerate(stores))
        )
        assert sorted(created) == [False, False, False, True]

    async def test_list_is_in_code_point_order_of_lease_keys(self, store: LeaseStore) -> None:
        # Code-point order, as Python's sorted(): 'B' < 'a', '10' < '9'. A backend with a
        # locale collation (PostgreSQL's default) must order by bytes instead.
        keys = ["shardId-9", "shardId-10", "a", "B", "shardId-000000000002", "Z:1", "z", "0", "_x", "-x"]
        for key in keys:
            assert await store.create_lease_if_absent(Lease(key))
        assert [lease.lease_key for lease in await store.list_leases()] == sorted(keys)

    @pytest.mark.parametrize("name", list(ROUND_TRIP_LEASES))
    async def test_every_field_round_trips(self, store: LeaseStore, name: str) -> None:
        lease = ROUND_TRIP_LEASES[name]
        assert await store.create_lease_if_absent(lease)
        assert await store.get_lease(lease.lease_key) == lease
        assert await store.list_leases() == [lease]

    async def test_empty_sets_and_none_fields_stay_distinct(self, store: LeaseStore) -> None:
        lease = Lease(KEY, parent_shard_ids=frozenset(), child_shard_ids=frozenset({"c"}))
        await store.create_lease_if_absent(lease)
        stored = await store.get_lease(KEY)
        assert stored is not None
        assert stored.parent_shard_ids == frozenset()
        assert stored.child_shard_ids == frozenset({"c"})
        assert (stored.lease_owner, stored.pending_checkpoint, stored.ending_hash_key) == (None, None, None)
        renewed = await store.update_lineage(stored, child_shard_ids=frozenset())
        assert renewed.child_shard_ids == frozenset()
        assert await store.get_lease(KEY) == renewed

    # -- fenced writes ----------------------------------------------------------------------

    async def test_renew_increments_only_the_counter(self, store: LeaseStore) -> None:
        lease = ROUND_TRIP_LEASES["every-field"]
        await store.create_lease_if_absent(lease)
        renewed = await store.renew_lease(lease)
        assert renewed == lease.replace(lease_counter=lease.lease_counter + 1)
        assert await store.get_lease(lease.lease_key) == renewed

    async def test_take_sets_owner_clears_checkpoint_owner_and_counts_a_switch(
        self, store: LeaseStore
    ) -> None:
        lease = ROUND_TRIP_LEASES["every-field"]  # owned by worker-1, checkpoint_owner worker-0
        await store.create_lease_if_absent(lease)
        taken = await store.take_lease(lease, "worker-2")
        assert taken == lease.replace(
            lease_owner="worker-2",
            checkpoint_owner=None,
            lease_counter=lease.lease_counter + 1,
            owner_switches_since_checkpoint=lease.owner_switches_since_checkpoint + 1,
        )
        assert await store.get_lease(lease.lease_key) == taken

    async def test_take_of_unowned_or_own_lease_is_no_owner_switch(self, store: LeaseStore) -> None:
        # As in the KCL: only a change from one worker to another counts.
        await store.create_lease_if_absent(Lease(KEY))
        first = await store.take_lease(Lease(KEY), "a")
        again = await store.take_lease(first, "a")
        assert (first.lease_owner, first.owner_switches_since_checkpoint, first.lease_counter) == ("a", 0, 1)
        assert (again.lease_owner, again.owner_switches_since_checkpoint, again.lease_counter) == ("a", 0, 2)

    async def test_evict_clears_owner_and_checkpoint_owner(self, store: LeaseStore) -> None:
        lease = ROUND_TRIP_LEASES["every-field"]
        await store.create_lease_if_absent(lease)
        evicted = await store.evict_lease(lease)
        expected = lease.replace(
            lease_owner=None, checkpoint_owner=None, lease_counter=lease.lease_counter + 1
        )
        assert evicted == expected
        assert await store.get_lease(lease.lease_key) == expected

    async def test_checkpoint_writes_position_resets_switches_and_replaces_pending(
        self, store: LeaseStore
    ) -> None:
        lease = ROUND_TRIP_LEASES["every-field"]
        await store.create_lease_if_absent(lease)
        position = ExtendedSequenceNumber(SEQ_56[:-2] + "77", 5)
        done = await store.checkpoint(lease, position, pending_checkpoint=ExtendedSequenceNumber(SEQ_56, 6))
        assert done == lease.replace(
            checkpoint=position,
            pending_checkpoint=ExtendedSequenceNumber(SEQ_56, 6),
            owner_switches_since_checkpoint=0,
            lease_counter=lease.lease_counter + 1,
        )
        ended = await store.checkpoint(done, SHARD_END)
        assert ended.checkpoint == SHARD_END
        assert ended.pending_checkpoint is None
        assert await store.get_lease(lease.lease_key) == ended

    async def test_handoff_moves_ownership_and_keeps_the_old_owner_as_checkpoint_owner(
        self, store: LeaseStore
    ) -> None:
        lease = Lease(KEY, lease_owner="old", lease_counter=3, owner_switches_since_checkpoint=1)
        await store.create_lease_if_absent(lease)
        started = await store.initiate_handoff(lease, "new")
        assert started == lease.replace(
            lease_owner="new", checkpoint_owner="old", lease_counter=4, owner_switches_since_checkpoint=2
        )
        final = ExtendedSequenceNumber(SEQ_56, 2)
        done = await store.complete_handoff(started, final)
        assert done == started.replace(
            checkpoint=final, checkpoint_owner=None, lease_counter=5, owner_switches_since_checkpoint=0
        )
        assert await store.get_lease(KEY) == done

    async def test_complete_handoff_without_a_checkpoint_keeps_the_position(self, store: LeaseStore) -> None:
        lease = Lease(KEY, lease_owner="old", checkpoint=ExtendedSequenceNumber("9"))
        await store.create_lease_if_absent(lease)
        started = await store.initiate_handoff(lease, "new")
        done = await store.complete_handoff(started, None)
        assert done == started.replace(checkpoint_owner=None, lease_counter=started.lease_counter + 1)

    async def test_handoff_needs_an_owner_no_handoff_under_way_and_a_fresh_counter(
        self, store: LeaseStore
    ) -> None:
        await store.create_lease_if_absent(Lease("unowned"))
        with pytest.raises(StaleLease):
            await store.initiate_handoff(Lease("unowned"), "new")
        lease = Lease(KEY, lease_owner="old")
        await store.create_lease_if_absent(lease)
        with pytest.raises(StaleLease):
            await store.complete_handoff(lease, None)  # no handoff under way
        started = await store.initiate_handoff(lease, "new")
        with pytest.raises(StaleLease):
            await store.initiate_handoff(started, "third")  # one handoff at a time
        with pytest.raises(StaleLease):
            await store.initiate_handoff(lease, "third")  # stale counter
        with pytest.raises(StaleLease):
            await store.complete_handoff(lease, ExtendedSequenceNumber("5"))  # stale counter
        assert await store.get_lease(KEY) == started

    async def test_a_stuck_handoff_can_be_broken_by_a_take(self, store: LeaseStore) -> None:
        lease = Lease(KEY, lease_owner="old")
        await store.create_lease_if_absent(lease)
        started = await store.initiate_handoff(lease, "new")
        taken = await store.take_lease(started, "new")  # the old owner died mid-handoff
        assert (taken.lease_owner, taken.checkpoint_owner) == ("new", None)
        with pytest.raises(StaleLease):
            await store.complete_handoff(started, ExtendedSequenceNumber("5"))

    async def test_update_lineage_replaces_children(self, store: LeaseStore) -> None:
        lease = ROUND_TRIP_LEASES["every-field"]
        await store.create_lease_if_absent(lease)
        children = frozenset({"shardId-000000000007", "shardId-000000000008"})
        updated = await store.update_lineage(lease, child_shard_ids=children)
        assert updated == lease.replace(child_shard_ids=children, lease_counter=lease.lease_counter + 1)
        assert await store.get_lease(lease.lease_key) == updated

    async def test_delete_removes_the_lease(self, store: LeaseStore) -> None:
        lease = Lease(KEY, lease_owner="someone-else", lease_counter=4)
        await store.create_lease_if_absent(lease)
        await store.delete_lease(lease.replace(lease_owner="me"))  # fenced by counter, not owner
        assert await store.get_lease(KEY) is None
        assert await store.create_lease_if_absent(Lease(KEY))

    @pytest.mark.parametrize("kind", WRITES)
    async def test_stale_counter_is_refused_by_every_write(self, store: LeaseStore, kind: str) -> None:
        lease = Lease(KEY, lease_owner="a", lease_counter=5, checkpoint=ExtendedSequenceNumber("7"))
        await store.create_lease_if_absent(lease)
        for counter in (4, 6, 0):
            stale = lease.replace(lease_counter=counter)
            with pytest.raises(StaleLease) as caught:
                await _write(kind, store, stale)
            _assert_stale(caught.value, stale)
        assert await store.get_lease(KEY) == lease

    @pytest.mark.parametrize("kind", OWNER_FENCED_WRITES)
    async def test_owner_mismatch_is_refused(self, store: LeaseStore, kind: str) -> None:
        lease = Lease(KEY, lease_owner="a", lease_counter=5)
        await store.create_lease_if_absent(lease)
        for owner in ("b", None):
            with pytest.raises(StaleLease) as caught:
                await _write(kind, store, lease.replace(lease_owner=owner))
            _assert_stale(caught.value, lease)
        assert await store.get_lease(KEY) == lease

    @pytest.mark.parametrize("kind", WRITES)
    async def test_write_to_missing_lease_says_it_does_not_exist(self, store: LeaseStore, kind: str) -> None:
        lease = Lease(KEY, lease_owner="a", lease_counter=5)
        with pytest.raises(StaleLease, match=r"does not exist|deleted") as caught:
            await _write(kind, store, lease)
        _assert_stale(caught.value, lease)
        assert await store.get_lease(KEY) is None

    async def test_old_holder_cannot_checkpoint_after_a_take(self, open_store: StoreOpener) -> None:
        old, new = await open_store(), await open_store()
        held = await old.take_lease(await _created(old, Lease(KEY)), "old")
        await new.take_lease(held, "new")
        with pytest.raises(StaleLease):
            await old.checkpoint(held, ExtendedSequenceNumber("100"))
        with pytest.raises(StaleLease):
            await old.renew_lease(held)
        stored = await new.get_lease(KEY)
        assert stored is not None
        assert (stored.lease_owner, stored.checkpoint) == ("new", TRIM_HORIZON)

    # -- concurrency and sharing ------------------------------------------------------------

    async def test_concurrent_takers_on_one_instance_exactly_one_wins(self, store: LeaseStore) -> None:
        lease = await _created(store, Lease(KEY, lease_owner="old", lease_counter=5))
        results = await asyncio.gather(
            *(store.take_lease(lease, f"w{i}") for i in range(8)), return_exceptions=True
        )
        await _assert_one_winner(store, results, lease)

    async def test_concurrent_takers_on_many_instances_exactly_one_wins(
        self, open_store: StoreOpener
    ) -> None:
        stores = [await open_store() for _ in range(6)]
        lease = await _created(stores[0], Lease(KEY, lease_owner="old", lease_counter=5))
        results = await asyncio.gather(
            *(s.take_lease(lease, f"w{i}") for i, s in enumerate(stores)), return_exceptions=True
        )
        await _assert_one_winner(stores[0], results, lease)

    async def test_instances_see_each_others_writes(self, open_store: StoreOpener) -> None:
        a, b = await open_store(), await open_store()
        await _created(a, Lease(KEY))
        taken = await b.take_lease(Lease(KEY), "b")
        assert await a.get_lease(KEY) == taken
        done = await a.checkpoint(taken, ExtendedSequenceNumber("12", 1))
        assert await b.list_leases() == [done]
        await b.delete_lease(done)
        assert await a.get_lease(KEY) is None

    async def test_applications_are_isolated(self, open_store: StoreOpener) -> None:
        one, other = await open_store("app-one"), await open_store("app-two")
        await _created(one, Lease(KEY, lease_owner="x"))
        assert await other.get_lease(KEY) is None
        assert await other.list_leases() == []
        await _created(other, Lease(KEY, lease_owner="y", lease_counter=9))
        await other.renew_lease(Lease(KEY, lease_owner="y", lease_counter=9))
        assert await one.list_leases() == [Lease(KEY, lease_owner="x")]

    async def test_random_operations_match_the_reference_store(self, store: LeaseStore) -> None:
        """Replays a seeded mix of fresh, stale and wrong-owner writes on this store and on the
        memory store; results, errors and final contents must agree."""
        reference = MemoryLeaseStore(APP)
        rng = random.Random(20261123)
        keys = [f"shardId-00000000000{i}" for i in range(3)]
        for step in range(300):
            key, kind = rng.choice(keys), rng.choice((*WRITES, "create", "create"))
            seen = await reference.get_lease(key) or Lease(key, lease_owner=rng.choice(("a", "b", None)))
            twist = rng.random()
            if twist < 0.2:
                seen = seen.replace(lease_counter=seen.lease_counter + rng.choice((-1, 1)))
            elif twist < 0.3:
                seen = seen.replace(lease_owner=rng.choice(("a", "b", None)))
            outcomes: list[object] = []
            for target in (reference, store):
                try:
                    if kind == "create":
                        outcomes.append(await target.create_lease_if_absent(seen))
                    else:
                        outcomes.append(await _write(kind, target, seen))
                except StaleLease as exc:
                    outcomes.append(("StaleLease", exc.lease_key, exc.expected_counter))
            assert outcomes[0] == outcomes[1], f"step {step}: {kind} of {seen}"
        assert await store.list_leases() == await reference.list_leases()
        await reference.aclose()

    async def test_aclose_is_idempotent_and_final(self, open_store: StoreOpener) -> None:
        store = await open_store()
        await store.aclose()
        await store.aclose()
        with pytest.raises(ClosedError):
            await store.list_leases()


async def _created(store: LeaseStore, lease: Lease) -> Lease:
    assert await store.create_lease_if_absent(lease)
    return lease


async def _assert_one_winner(store: LeaseStore, results: list[Lease | BaseException], lease: Lease) -> None:
    winners = [r for r in results if isinstance(r, Lease)]
    losers = [r for r in results if not isinstance(r, Lease)]
    assert len(winners) == 1, results
    assert all(isinstance(r, StaleLease) for r in losers), losers
    assert winners[0].lease_counter == lease.lease_counter + 1
    assert await store.get_lease(lease.lease_key) == winners[0]

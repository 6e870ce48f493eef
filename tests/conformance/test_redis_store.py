"""The lease-store conformance suite against RedisLeaseStore, plus Redis-only behaviour."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from kinesis_butler.errors import ConfigError, StaleLease, StoreSchemaError
from kinesis_butler.models import Lease
from kinesis_butler.stores.redis import SCHEMA_VERSION, RedisLeaseStore

pytest.register_assert_rewrite("kinesis_butler.testing.store_conformance")

from kinesis_butler.testing.store_conformance import LeaseStoreConformance, StoreFactory  # noqa: E402


class TestRedisStore(LeaseStoreConformance):
    @pytest.fixture
    def store_factory(self, redis_url: str, redis_prefix: str) -> StoreFactory:
        return lambda app: RedisLeaseStore(redis_url, app, prefix=redis_prefix)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_key_layout_keeps_an_app_in_one_cluster_slot(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    store = RedisLeaseStore(redis_url, "app", prefix=redis_prefix)
    await store.initialize()
    await store.create_lease_if_absent(Lease("shardId-0", lease_owner="w"))
    await store.aclose()
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await raw.keys(f"{redis_prefix}:*"))
    base = f"{redis_prefix}:{{app}}:"
    assert keys == [base + "lease:shardId-0", base + "leases", base + "meta"]
    assert await raw.hgetall(base + "meta") == {b"format": b"kinesis-butler-leases", b"version": b"1"}
    assert await raw.zrange(base + "leases", 0, -1) == [b"shardId-0"]
    stored = await raw.hgetall(base + "lease:shardId-0")
    assert stored[b"leaseOwner"] == b"w"
    assert stored[b"leaseCounter"] == b"0"
    # The app name is the hash tag: one slot, so a script may touch all of an app's keys.
    assert len({key_slot(key.encode()) for key in keys}) == 1
    assert key_slot(base.encode()) != key_slot(f"{redis_prefix}:{{other}}:".encode())


async def test_stale_messages_match_the_sqlite_wording(redis_url: str, redis_prefix: str) -> None:
    store = RedisLeaseStore(redis_url, "app", prefix=redis_prefix)
    await store.create_lease_if_absent(Lease("shardId-0", lease_owner="a", lease_counter=3))
    with pytest.raises(StaleLease, match=r"at counter 2: its counter moved on to 3$"):
        await store.renew_lease(Lease("shardId-0", lease_owner="a", lease_counter=2))
    with pytest.raises(StaleLease, match=r"it is owned by 'a', not 'b'$"):
        await store.checkpoint(Lease("shardId-0", lease_owner="b", lease_counter=3), Lease("x").checkpoint)
    with pytest.raises(StaleLease, match=r"cannot complete the handoff of .*no handoff is under way$"):
        await store.complete_handoff(Lease("shardId-0", lease_owner="a", lease_counter=3), None)
    started = await store.initiate_handoff(Lease("shardId-0", lease_owner="a", lease_counter=3), "b")
    with pytest.raises(StaleLease, match=r"a handoff is already under way$"):
        await store.initiate_handoff(started, "c")
    await store.delete_lease(started)
    with pytest.raises(StaleLease, match=r"does not exist \(it was deleted\)$"):
        await store.renew_lease(started)
    await store.aclose()


async def test_counters_beyond_float_precision_stay_exact(redis_url: str, redis_prefix: str) -> None:
    # Lua numbers are doubles: 2**62 + 1 would round; the store compares strings, uses HINCRBY.
    store = RedisLeaseStore(redis_url, "app", prefix=redis_prefix)
    lease = Lease("shardId-0", lease_owner="a", lease_counter=2**62 + 1)
    await store.create_lease_if_absent(lease)
    with pytest.raises(StaleLease):
        await store.renew_lease(lease.replace(lease_counter=2**62))
    assert (await store.renew_lease(lease)).lease_counter == 2**62 + 2
    await store.aclose()


async def test_newer_schema_version_is_refused(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    store = RedisLeaseStore(redis_url, "app", prefix=redis_prefix)
    await store.initialize()
    await raw.hset(f"{redis_prefix}:{{app}}:meta", "version", "99")
    with pytest.raises(StoreSchemaError, match=r"meta' holds lease schema version 99, not 1"):
        await store.initialize()
    with pytest.raises(StoreSchemaError):
        await store.create_lease_if_absent(Lease("shardId-0"))
    assert SCHEMA_VERSION == 1
    await store.aclose()


async def test_a_client_passed_in_is_used_and_left_open(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    store = RedisLeaseStore(raw, "app", prefix=redis_prefix)
    assert await store.create_lease_if_absent(Lease("shardId-0"))
    await store.aclose()
    assert await raw.ping()  # still open: the caller owns it


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://:hunter2@localhost:6379/0", "or rediss://"),
        ("redis://:hunter2@localhost:notaport/0", "port"),
        ("redis://:hunter2@localhost:6379/zero", "database number"),
        ("redis://:hunter2@:6379/0", "expected redis://host"),
        ("redis://:hunter2@localhost/0?prefx=a", "unknown option 'prefx'"),
        ("redis://:hunter2@localhost/0?socket_timeout=soon", "socket_timeout"),
        ("redis://:hunter2@localhost/0?prefix=a{b}", "prefix"),
        ("redis://localhost/0?password=hunter2", "unknown option 'password'"),
        ("redis://u:hunt@er/2@localhost:6379/0", "percent-encode"),
        ("redis://:pa?hunter2=1@localhost:6379/0", "percent-encode"),
    ],
)
def test_bad_urls_are_config_errors_with_the_password_masked(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        RedisLeaseStore.from_url(url, "app")
    assert "hunter2" not in str(caught.value)
    assert "er/2" not in str(caught.value)


def test_url_options_and_repr_never_show_the_password() -> None:
    store = RedisLeaseStore.from_url("rediss://user:p%40ss-hunter2@cache.example:6380/3?prefix=team.a", "app")
    assert repr(store) == "RedisLeaseStore(address='cache.example:6380/3', app='app', prefix='team.a')"
    assert "hunter2" not in repr(store)


@pytest.mark.parametrize("app", ["", "a{b}", "a:b", "-x"])
def test_bad_app_names_are_refused(app: str) -> None:
    with pytest.raises(ConfigError, match="application name"):
        RedisLeaseStore("redis://localhost:6379/0", app)


def test_conflicting_prefixes_are_refused() -> None:
    with pytest.raises(ConfigError, match="two prefixes"):
        RedisLeaseStore("redis://localhost:6379/0?prefix=a", "app", prefix="b")

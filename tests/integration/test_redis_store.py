"""The Redis lease store against real servers: processes racing, outages, crashes, foreign data.

The multi-process test starts worker processes that run this same file as a script: each
opens its own store on the shared server (under the test's own prefix), creates the same
leases, waits for a common "go", then for a few hundred iterations reads a random lease and
writes it from the counter it read. It records every attempt; the test then checks the
records against the final state, as tests/integration/test_sqlite_multiprocess.py does for
SQLite.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from kinesis_butler.errors import ConfigError, StaleLease, StoreSchemaError, StoreUnavailable
from kinesis_butler.models import ExtendedSequenceNumber, Lease
from kinesis_butler.stores.redis import RedisLeaseStore
from kinesis_butler.testing import redis as redis_testing
from kinesis_butler.testing.emulator import free_port
from kinesis_butler.testing.redis import RedisServer

pytest.register_assert_rewrite("kinesis_butler.testing.store_hammer")

from kinesis_butler.testing.store_hammer import run_store_hammer  # noqa: E402

pytestmark = pytest.mark.integration

APP = "multiprocess-app"
PASSWORD = "hunter2-do-not-leak"
_T = TypeVar("_T")

# -- several processes ------------------------------------------------------------------------


def test_processes_sharing_one_redis_never_lose_or_duplicate_a_write(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    run_store_hammer(
        RedisLeaseStore, [redis_url, APP], {"prefix": redis_prefix}, workdir=tmp_path, deadline_seconds=20.0
    )


# -- outages and crashes ----------------------------------------------------------------------


@pytest.fixture
async def open_store() -> AsyncIterator[Callable[..., RedisLeaseStore]]:
    """Makes stores (RedisLeaseStore arguments) that are closed after the test."""
    stores: list[RedisLeaseStore] = []

    def make(*args: Any, **kwargs: Any) -> RedisLeaseStore:
        stores.append(RedisLeaseStore(*args, **kwargs))
        return stores[-1]

    yield make
    for store in stores:
        await store.aclose()


async def _fails_fast(call: Awaitable[_T], within: float) -> StoreUnavailable:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await asyncio.wait_for(call, timeout=within + 5)  # a hang fails the test instead of blocking it
    assert time.monotonic() - started < within, f"took {time.monotonic() - started:.2f} s"
    assert caught.value.retriable
    return caught.value


async def test_stopped_server_gives_store_unavailable_fast_and_the_store_recovers(
    redis_private: RedisServer, open_store: Callable[..., RedisLeaseStore]
) -> None:
    store = open_store(redis_private.url + "?socket_timeout=1&socket_connect_timeout=1", "app")
    held = await store.take_lease(await _created(store, Lease("shardId-0")), "w")
    redis_private.stop()
    for call in (store.get_lease("shardId-0"), store.renew_lease(held), store.list_leases()):
        error = await _fails_fast(call, within=1.5)
        assert f"127.0.0.1:{redis_private.port}" in str(error)
    redis_private.start()
    # The same instance, no re-initialize: dead pooled connections are replaced and the
    # script is loaded again (NOSCRIPT). Without persistence the restart emptied the server,
    # so the old holder is fenced out as if the lease had been deleted.
    assert await store.list_leases() == []
    with pytest.raises(StaleLease, match="deleted"):
        await store.renew_lease(held)
    assert await store.create_lease_if_absent(Lease("shardId-0"))


async def test_hung_server_cannot_hang_a_call(
    redis_private: RedisServer, open_store: Callable[..., RedisLeaseStore]
) -> None:
    store = open_store(redis_private.url + "?socket_timeout=0.5", "app")
    await _created(store, Lease("shardId-0"))
    redis_private.pause()  # accepts connections, never answers
    try:
        error = await _fails_fast(store.get_lease("shardId-0"), within=1.5)
        assert "Timeout" in str(error)
    finally:
        redis_private.resume()
    assert await store.get_lease("shardId-0") == Lease("shardId-0")


async def test_with_aof_fsync_always_every_acknowledged_write_survives_a_crash(
    redis_private_factory: Callable[..., RedisServer], open_store: Callable[..., RedisLeaseStore]
) -> None:
    server = redis_private_factory(persistent=True)
    store = open_store(server.url, "app")
    lease = await store.take_lease(await _created(store, Lease("shardId-0")), "w")
    lease = await store.checkpoint(lease, ExtendedSequenceNumber("12345", 2))
    server.kill()  # SIGKILL: no shutdown save, only what was fsynced
    server.start()  # blocking: the loop has not yet seen the pooled connection close
    # The write goes out on that dead connection: reported, not retried blindly (it could
    # have landed, in which case a retry would fail as StaleLease for the caller's own write).
    with pytest.raises(StoreUnavailable):
        await store.renew_lease(lease)
    assert await store.list_leases() == [lease]  # it had not landed; the checkpoint survived
    with pytest.raises(StaleLease, match="moved on to 2"):
        await store.renew_lease(lease.replace(lease_counter=1))
    assert (await store.renew_lease(lease)).lease_counter == 3


async def test_a_read_on_a_connection_a_restart_broke_is_retried_once(
    redis_private_factory: Callable[..., RedisServer], open_store: Callable[..., RedisLeaseStore]
) -> None:
    server = redis_private_factory(persistent=True)
    store = open_store(server.url, "app")
    lease = await _created(store, Lease("shardId-0"))
    server.kill()
    server.start()
    assert await store.get_lease("shardId-0") == lease


async def test_without_persistence_a_crash_loses_every_lease_and_resets_counters(
    redis_private: RedisServer, open_store: Callable[..., RedisLeaseStore]
) -> None:
    old, new = open_store(redis_private.url, "app"), open_store(redis_private.url, "app")
    held = await old.checkpoint(
        await old.take_lease(await _created(old, Lease("shardId-0")), "old"), ExtendedSequenceNumber("500")
    )
    redis_private.kill()
    redis_private.start()
    assert await new.list_leases() == []  # checkpoints gone: the shard restarts from its initial position
    # The hazard docs/stores/redis.md describes: counters restart at 0, so once the re-created
    # lease is back at the old holder's counter, the old holder's fenced write passes: here a
    # stale delete of the new lease.
    await _created(new, Lease("shardId-0"))
    await new.renew_lease(await new.take_lease(Lease("shardId-0"), "new"))
    assert held.lease_counter == 2
    await old.delete_lease(held)
    assert await new.get_lease("shardId-0") is None


async def _created(store: RedisLeaseStore, lease: Lease) -> Lease:
    assert await store.create_lease_if_absent(lease)
    return lease


# -- foreign data, secrets --------------------------------------------------------------------


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_string_at_a_lease_key_is_a_schema_error(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis, open_store: Callable[..., RedisLeaseStore]
) -> None:
    store = open_store(redis_url, "app", prefix=redis_prefix)
    await raw.set(store.lease_redis_key("shardId-0"), "someone else's value")
    for call in (
        store.get_lease("shardId-0"),
        store.create_lease_if_absent(Lease("shardId-0")),
        store.renew_lease(Lease("shardId-0")),
        store.delete_lease(Lease("shardId-0")),
    ):
        with pytest.raises(StoreSchemaError, match=r"lease:shardId-0' is a string"):
            await call
    assert await raw.get(store.lease_redis_key("shardId-0")) == b"someone else's value"


async def test_a_hash_with_foreign_fields_is_refused_and_left_alone(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis, open_store: Callable[..., RedisLeaseStore]
) -> None:
    store = open_store(redis_url, "app", prefix=redis_prefix)
    await _created(store, Lease("shardId-0"))
    key = store.lease_redis_key("shardId-0")
    await raw.hset(key, mapping={"holder": "x", "expires": "17"})
    before = await raw.hgetall(key)
    with pytest.raises(StoreSchemaError, match=r"has foreign fields: .*expires"):
        await store.take_lease(Lease("shardId-0"), "w")
    with pytest.raises(StoreSchemaError, match="holder"):
        await store.list_leases()
    assert await raw.hgetall(key) == before


async def test_lease_fields_with_garbage_values_are_a_schema_error(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis, open_store: Callable[..., RedisLeaseStore]
) -> None:
    store = open_store(redis_url, "app", prefix=redis_prefix)
    await _created(store, Lease("shardId-0"))
    await raw.hset(store.lease_redis_key("shardId-0"), "checkpoint", "yesterday")
    with pytest.raises(StoreSchemaError, match=r"not a valid kinesis-butler lease.*yesterday"):
        await store.get_lease("shardId-0")


@pytest.mark.parametrize(
    ("suffix", "foreign", "match"),
    [
        ("leases", ("rpush", "a", "b"), "is a list, not a zset"),
        ("meta", ("hset", "owner", "another-tool"), "is a hash without our format marker"),
        ("meta", ("set", "1"), "is a string, not a hash"),
    ],
)
async def test_foreign_index_or_meta_keys_are_refused(
    redis_url: str,
    redis_prefix: str,
    raw: aioredis.Redis,
    open_store: Callable[..., RedisLeaseStore],
    suffix: str,
    foreign: tuple[str, ...],
    match: str,
) -> None:
    store = open_store(redis_url, "app", prefix=redis_prefix)
    await getattr(raw, foreign[0])(f"{redis_prefix}:{{app}}:{suffix}", *foreign[1:])
    for call in (store.initialize(), store.list_leases(), store.create_lease_if_absent(Lease("shardId-0"))):
        with pytest.raises(StoreSchemaError, match=match):
            await call
    assert await raw.exists(store.lease_redis_key("shardId-0")) == 0


async def test_the_password_never_appears_in_errors_or_repr(
    redis_private_factory: Callable[..., RedisServer], open_store: Callable[..., RedisLeaseStore]
) -> None:
    server = redis_private_factory(password=PASSWORD)
    good = open_store(server.url + "?socket_timeout=1&socket_connect_timeout=1", "app")
    assert await good.create_lease_if_absent(Lease("shardId-0"))
    wrong = open_store(server.url.replace(PASSWORD, "wrong-password"), "app")
    missing = open_store(server.url.replace(f":{PASSWORD}@", ""), "app")
    errors: list[BaseException] = []
    for store in (wrong, missing):
        with pytest.raises(ConfigError, match="password") as caught:
            await store.get_lease("shardId-0")
        errors.append(caught.value)
    server.stop()
    errors.append(await _fails_fast(good.get_lease("shardId-0"), within=1.5))
    with pytest.raises(ConfigError) as bad_url:
        RedisLeaseStore(server.url.replace("127.0.0.1", "127.0.0.1:x"), "app")
    errors.append(bad_url.value)
    shown = [repr(good), str(good)]
    for error in errors:
        shown += [str(error), repr(error), str(error.__cause__), repr(error.__cause__)]
    assert all(PASSWORD not in text for text in shown), shown


# -- the launcher ----------------------------------------------------------------------------


def test_shared_falls_back_to_a_private_server_when_none_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KINESIS_BUTLER_REDIS_URL", raising=False)
    monkeypatch.setattr(redis_testing, "SHARED_PORT", free_port())  # nothing listens there
    monkeypatch.setattr(RedisServer, "_shared_url", None)
    url = RedisServer.shared()
    started = [server for server in RedisServer._live if server.url == url]
    try:
        assert started, url
        assert started[0].running
        assert RedisServer.shared() == url  # started once per process
    finally:
        for server in started:
            server.close()


def test_a_missing_redis_server_binary_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KINESIS_BUTLER_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(ConfigError, match="apt-get install redis-server"):
        RedisServer.private()

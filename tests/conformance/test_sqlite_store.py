"""The lease-store conformance suite against SqliteLeaseStore, plus SQLite-only behaviour."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from kinesis_butler.errors import ConfigError, StaleLease, StoreSchemaError, StoreUnavailable
from kinesis_butler.models import Lease
from kinesis_butler.stores import SqliteLeaseStore

pytest.register_assert_rewrite("kinesis_butler.testing.store_conformance")

from kinesis_butler.testing.store_conformance import LeaseStoreConformance, StoreFactory  # noqa: E402


class TestSqliteStore(LeaseStoreConformance):
    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> StoreFactory:
        path = str(tmp_path / "leases.db")
        return lambda app: SqliteLeaseStore(path, app)


def _sql(path: Path, *statements: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as conn, conn:
        rows: list[tuple[object, ...]] = []
        for statement in statements:
            rows = conn.execute(statement).fetchall()
        return rows


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "leases.db"


async def test_foreign_leases_table_is_refused_naming_file_and_columns(db: Path) -> None:
    _sql(db, "CREATE TABLE leases (id INTEGER PRIMARY KEY, holder TEXT, expires REAL)")
    store = SqliteLeaseStore(str(db), "app")
    with pytest.raises(StoreSchemaError, match="leases") as caught:
        await store.initialize()
    message = str(caught.value)
    for expected in (str(db), "holder", "expires"):
        assert expected in message
    # Usable calls report the same problem instead of failing on a missing column.
    with pytest.raises(StoreSchemaError):
        await store.list_leases()
    await store.aclose()
    assert _sql(db, "SELECT name FROM sqlite_master WHERE type = 'table'") == [("leases",)]


async def test_newer_schema_version_is_refused(db: Path) -> None:
    store = SqliteLeaseStore(str(db), "app")
    await store.initialize()
    await store.aclose()
    _sql(db, "UPDATE schema_meta SET value = '99' WHERE key = 'schema_version'")
    newer = SqliteLeaseStore(str(db), "app")
    with pytest.raises(StoreSchemaError, match="version '99'"):
        await newer.initialize()
    await newer.aclose()


@pytest.fixture
def text_file(db: Path) -> Path:
    db.write_bytes(b"this is a text file, not SQLite\n" * 100)
    return db


async def test_file_that_is_not_a_database_is_a_schema_error(text_file: Path) -> None:
    store = SqliteLeaseStore(str(text_file), "app")
    with pytest.raises(StoreSchemaError, match="not a SQLite database"):
        await store.initialize()
    await store.aclose()


async def test_schema_uses_wal_and_app_keyed_table(db: Path) -> None:
    store = SqliteLeaseStore(str(db), "app")
    await store.initialize()
    await store.create_lease_if_absent(Lease("shardId-0", parent_shard_ids=frozenset({"p2", "p1"})))
    await store.aclose()
    assert _sql(db, "PRAGMA journal_mode") == [("wal",)]
    assert _sql(db, "SELECT value FROM schema_meta WHERE key = 'schema_version'") == [("1",)]
    assert _sql(db, "SELECT app, lease_key, parent_shard_ids FROM leases") == [
        ("app", "shardId-0", '["p1", "p2"]')
    ]


async def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "leases.db"
    store = SqliteLeaseStore(str(path), "app")
    await store.initialize()
    await store.aclose()
    assert path.is_file()


async def test_unwritable_path_is_a_config_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    _sql(blocker, "CREATE TABLE t (x)")  # any regular file where a directory should be
    store = SqliteLeaseStore(str(blocker / "leases.db"), "app")
    with pytest.raises(ConfigError, match="not-a-directory"):
        await store.initialize()
    await store.aclose()


async def test_directory_as_database_path_is_a_config_error(tmp_path: Path) -> None:
    store = SqliteLeaseStore(str(tmp_path), "app")
    with pytest.raises(ConfigError, match="cannot open"):
        await store.initialize()
    await store.aclose()


async def test_store_works_without_explicit_initialize(db: Path) -> None:
    store = SqliteLeaseStore(str(db), "app")
    assert await store.create_lease_if_absent(Lease("shardId-0"))
    assert await store.list_leases() == [Lease("shardId-0")]
    await store.aclose()


async def test_write_lock_held_past_busy_timeout_is_store_unavailable(db: Path) -> None:
    store = SqliteLeaseStore(str(db), "app", busy_timeout=0.05)
    await store.create_lease_if_absent(Lease("shardId-0"))
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(StoreUnavailable, match="busy timeout") as caught:
            await store.renew_lease(Lease("shardId-0"))
        assert caught.value.retriable
        other.execute("ROLLBACK")
    renewed = await store.renew_lease(Lease("shardId-0"))
    assert renewed.lease_counter == 1
    await store.aclose()


async def test_deleted_lease_message_differs_from_a_moved_counter(db: Path) -> None:
    store = SqliteLeaseStore(str(db), "app")
    await store.create_lease_if_absent(Lease("shardId-0", lease_counter=3))
    with pytest.raises(StaleLease, match="moved on to 3"):
        await store.renew_lease(Lease("shardId-0", lease_counter=2))
    await store.delete_lease(Lease("shardId-0", lease_counter=3))
    with pytest.raises(StaleLease, match="deleted"):
        await store.renew_lease(Lease("shardId-0", lease_counter=3))
    await store.aclose()


async def test_two_apps_share_one_file(db: Path) -> None:
    one, two = SqliteLeaseStore(str(db), "one"), SqliteLeaseStore(str(db), "two")
    await one.create_lease_if_absent(Lease("shardId-0", lease_owner="x"))
    await two.create_lease_if_absent(Lease("shardId-0", lease_owner="y"))
    assert [lease.lease_owner for lease in await one.list_leases()] == ["x"]
    assert [lease.lease_owner for lease in await two.list_leases()] == ["y"]
    await one.aclose()
    await two.aclose()

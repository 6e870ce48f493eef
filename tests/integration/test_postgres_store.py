"""PostgresLeaseStore against real servers: racing processes, outages, foreign tables, secrets.

Run by pytest, the multi-process test starts worker processes that run this same file as a
script (as tests/integration/test_sqlite_multiprocess.py does for SQLite): each opens its own
store on one shared schema, waits for a common "go", then reads random leases and writes them
from the counter it read. The outage tests use a private cluster they may stop, restart and
freeze; everything else uses a fresh schema on the shared server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from kinesis_butler.errors import ConfigError, StoreError, StoreSchemaError, StoreUnavailable
from kinesis_butler.models import Lease
from kinesis_butler.stores.postgres import PostgresLeaseStore
from kinesis_butler.testing.emulator import free_port
from kinesis_butler.testing.postgres import PostgresServer, find_postgres_bin

pytest.register_assert_rewrite("kinesis_butler.testing.store_hammer")

from kinesis_butler.testing.store_hammer import run_store_hammer  # noqa: E402

pytestmark = pytest.mark.integration

KEY = "shardId-000000000000"
APP = "pg-app"
SECRET = "s3cr3t-Pa55/x9Qz@rd-Fr4g"  # unencoded, the "/" and "@" make libpq misread a URL


def _sql(dsn: str, *statements: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows: list[tuple[Any, ...]] = []
        for statement in statements:
            cur = conn.execute(statement.encode())
            rows = cur.fetchall() if cur.description else []
        return rows


# -- (a) several processes hammering the same leases --------------------------------------------


def test_processes_sharing_one_table_never_lose_or_duplicate_a_write(
    postgres_schema_dsn: str, tmp_path: Path
) -> None:
    run_store_hammer(PostgresLeaseStore, [postgres_schema_dsn, APP], workdir=tmp_path, deadline_seconds=30.0)


# -- (b) outages: a private server stopped, restarted, frozen ------------------------------------

Opener = Callable[..., PostgresLeaseStore]


@pytest.fixture
async def open_store() -> AsyncIterator[Opener]:
    """Makes stores (``PostgresLeaseStore`` arguments) that are closed at teardown, pass or fail."""
    opened: list[PostgresLeaseStore] = []

    def open_(dsn: str, **options: Any) -> PostgresLeaseStore:
        opened.append(PostgresLeaseStore(dsn, APP, **options))
        return opened[-1]

    yield open_
    for store in opened:
        await store.aclose()


@pytest.fixture
def outage_dsn(postgres_private: PostgresServer) -> Iterator[str]:
    """A fresh schema on the private server; the server is left running whatever the test did."""
    with postgres_private.temporary_schema() as dsn:
        try:
            yield dsn
        finally:
            postgres_private.resume()
            postgres_private.start()


async def _unavailable(call: Callable[[], Awaitable[object]], *, within: float) -> StoreUnavailable:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await call()
    assert time.monotonic() - started < within, f"took {time.monotonic() - started:.1f} s"
    assert caught.value.retriable
    return caught.value


async def _store_with_a_lease(
    open_store: Opener, dsn: str, **options: Any
) -> tuple[PostgresLeaseStore, Lease]:
    store = open_store(dsn, **options)
    await store.initialize()
    assert await store.create_lease_if_absent(Lease(KEY))
    return store, await store.take_lease(Lease(KEY), "w")


async def test_calls_fail_fast_while_the_server_is_down_and_the_same_store_recovers(
    postgres_private: PostgresServer, outage_dsn: str, open_store: Opener
) -> None:
    store, lease = await _store_with_a_lease(open_store, outage_dsn)
    postgres_private.stop()
    calls = (lambda: store.get_lease(KEY), lambda: store.renew_lease(lease), store.list_leases)
    for call in calls:
        error = await _unavailable(call, within=2.0)
        assert f"127.0.0.1:{postgres_private.port}/postgres" in str(error)
    postgres_private.start()
    renewed = await store.renew_lease(lease)  # the same instance; its first call after the restart
    assert renewed == lease.replace(lease_counter=lease.lease_counter + 1)
    assert await store.list_leases() == [renewed]


async def test_first_call_after_a_restart_succeeds_on_a_store_idle_during_the_outage(
    postgres_private: PostgresServer, outage_dsn: str, open_store: Opener
) -> None:
    store, lease = await _store_with_a_lease(open_store, outage_dsn, max_connections=3)
    await asyncio.gather(*(store.get_lease(KEY) for _ in range(3)))  # three idle connections
    postgres_private.stop()
    postgres_private.start()
    assert await store.get_lease(KEY) == lease  # dead idle connections are discarded, not used
    assert await asyncio.gather(*(store.get_lease(KEY) for _ in range(3))) == [lease] * 3


async def test_a_frozen_server_fails_calls_within_the_deadline_then_recovers(
    postgres_private: PostgresServer, outage_dsn: str, open_store: Opener
) -> None:
    store, lease = await _store_with_a_lease(open_store, outage_dsn, connect_timeout=2, statement_timeout=0.5)
    postgres_private.pause()  # accepts TCP connections, never answers
    error = await _unavailable(lambda: store.renew_lease(lease), within=5.0)  # deadline 2.5 s + 1 s grace
    assert "no answer within 2.5 s" in str(error)
    await _unavailable(lambda: store.get_lease(KEY), within=4.0)  # a new connection: connect_timeout
    postgres_private.resume()
    # The frozen server got the renew before it froze and ran it on waking: a call that failed
    # with StoreUnavailable may have been applied. Fencing keeps that safe: re-read, carry on.
    current = await store.get_lease(KEY)
    assert current is not None
    assert current.lease_counter in {lease.lease_counter, lease.lease_counter + 1}
    assert (await store.renew_lease(current)).lease_counter == current.lease_counter + 1


async def test_a_row_lock_held_past_the_statement_timeout_is_unavailable_not_a_hang(
    postgres_schema_dsn: str, open_store: Opener
) -> None:
    store, lease = await _store_with_a_lease(open_store, postgres_schema_dsn, statement_timeout=0.3)
    async with await psycopg.AsyncConnection.connect(postgres_schema_dsn) as other:
        await other.execute("SELECT 1 FROM kinesis_butler_leases FOR UPDATE")  # another writer's lock
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            await store.renew_lease(lease)
        await other.rollback()
    assert (await store.renew_lease(lease)).lease_counter == lease.lease_counter + 1


# -- (c) tables that are not ours ----------------------------------------------------------------


async def test_foreign_table_is_refused_naming_the_table_and_its_columns(
    postgres_schema_dsn: str, open_store: Opener
) -> None:
    _sql(
        postgres_schema_dsn,
        "CREATE TABLE kinesis_butler_leases (id INT PRIMARY KEY, holder TEXT, expires FLOAT)",
    )
    store = open_store(postgres_schema_dsn)
    with pytest.raises(StoreSchemaError) as caught:
        await store.initialize()
    for expected in ("kinesis_butler_leases", "holder", "expires", "127.0.0.1"):
        assert expected in str(caught.value)
    with pytest.raises(StoreSchemaError):  # calls report the same problem, not a missing column
        await store.list_leases()
    tables = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    assert _sql(postgres_schema_dsn, tables) == [("kinesis_butler_leases",)]  # left untouched


async def test_newer_schema_version_is_refused(postgres_schema_dsn: str, open_store: Opener) -> None:
    await open_store(postgres_schema_dsn).initialize()
    _sql(postgres_schema_dsn, "UPDATE kinesis_butler_leases_meta SET value = '99'")
    with pytest.raises(StoreSchemaError, match="version '99'"):
        await open_store(postgres_schema_dsn).initialize()


async def test_schema_layout_and_a_table_dropped_behind_the_stores_back(postgres_schema_dsn: str) -> None:
    store = PostgresLeaseStore.from_url(postgres_schema_dsn + "&table=my_leases", APP)
    assert await store.create_lease_if_absent(Lease(KEY, parent_shard_ids=frozenset({"p2", "p1"})))
    assert _sql(postgres_schema_dsn, "SELECT app, lease_key, parent_shard_ids FROM my_leases") == [
        (APP, KEY, ["p1", "p2"])
    ]
    assert _sql(postgres_schema_dsn, "SELECT key, value FROM my_leases_meta") == [("schema_version", "1")]
    _sql(postgres_schema_dsn, "DROP TABLE my_leases")
    with pytest.raises(StoreSchemaError, match="my_leases"):
        await store.list_leases()
    assert await store.list_leases() == []  # the next call creates the table again
    await store.aclose()


async def test_a_role_with_only_row_privileges_works_and_one_without_is_told_what_to_grant(
    postgres_private: PostgresServer, outage_dsn: str, open_store: Opener
) -> None:
    schema = outage_dsn.rsplit("%3D", 1)[1]
    await _store_with_a_lease(open_store, outage_dsn)  # the owner creates the tables once
    role, stranger = f"{schema}_dml", f"{schema}_none"
    tables = f"{schema}.kinesis_butler_leases, {schema}.kinesis_butler_leases_meta"
    grants = f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables}"
    _sql(postgres_private.dsn, f"CREATE ROLE {role} LOGIN", f"CREATE ROLE {stranger} LOGIN",
         f"GRANT USAGE ON SCHEMA {schema} TO {role}, {stranger}", f"{grants} TO {role}")  # fmt: skip
    try:
        as_role = open_store(outage_dsn.replace("postgres@", f"{role}@"))
        assert (await as_role.renew_lease((await as_role.list_leases())[0])).lease_counter == 2
        await as_role.aclose()  # before DROP OWNED, which waits for the role's sessions' locks
        as_stranger = open_store(outage_dsn.replace("postgres@", f"{stranger}@"))
        with pytest.raises(StoreError, match="SELECT, INSERT, UPDATE and DELETE"):
            await as_stranger.initialize()
        await as_stranger.aclose()
    finally:
        _sql(postgres_private.dsn, f"DROP OWNED BY {role}, {stranger}", f"DROP ROLE {role}, {stranger}")


# -- (d) secrets and URLs ------------------------------------------------------------------------


def _everything_said(error: BaseException) -> str:
    """str and repr of an error and of every error chained to it."""
    said, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        said += [str(current), repr(current), *map(str, current.args)]
        current = current.__cause__ or current.__context__
    return "\n".join(said)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://kb:{quoted}@127.0.0.1:{port}/leases_db?sslmode=disable",
        "host=127.0.0.1 port={port} dbname=leases_db user=kb password='{secret}'",
        "postgresql://kb@127.0.0.1:{port}/leases_db?password={quoted}",
    ],
)
async def test_password_never_appears_in_errors_or_repr(dsn: str, open_store: Opener) -> None:
    port = free_port()  # nothing listens there: connection refused
    store = open_store(dsn.format(secret=SECRET, quoted=quote(SECRET, safe=""), port=port))
    for call in (store.initialize, lambda: store.get_lease(KEY)):
        error = await _unavailable(call, within=3.0)
        assert f"127.0.0.1:{port}/leases_db" in str(error)
        said = _everything_said(error)
        assert SECRET not in said and quote(SECRET, safe="") not in said, said
    assert SECRET not in repr(store) and "kb@127.0.0.1" in repr(store)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("postgresql://kb:{secret}@db.example/leases", "malformed"),  # unencoded: libpq misreads it
        ("postgresql://kb:p@ss{secret}@db.example/leases", "malformed"),
        ("postgresql://kb:{secret}%zz@db.example/leases", "percent-encoded"),
        ("postgresql://kb:{quoted}@db.example:notaport/leases", "malformed"),
        ("postgresql://kb:{quoted}@[::1/leases", "IPv6"),
        ("postgresql://kb:{quoted}@db.example/leases?statement_timeout=soon", "soon"),
        ("postgresql://kb:{quoted}@db.example/leases?no_such_option=1", "no_such_option"),
        ("mysql://kb:{quoted}@db.example/leases", "expected postgresql://"),
        ("postgresql://kb:{quoted}@db.example/leases?table=Bad-Name", "table name"),
    ],
)
def test_bad_urls_are_config_errors_with_the_password_masked(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        PostgresLeaseStore.from_url(url.format(secret=SECRET, quoted=quote(SECRET, safe="")), APP)
    said = _everything_said(caught.value)
    for piece in (SECRET, quote(SECRET, safe=""), *SECRET.replace("@", "/").split("/")):
        assert piece not in said, said


async def test_url_options_reach_the_store_and_libpq(postgres_schema_dsn: str) -> None:
    schema = postgres_schema_dsn.rsplit("%3D", 1)[1]
    url = postgres_schema_dsn.replace("postgresql://", "postgres://").split("?")[0]
    url += f"?table={schema}.t1&statement_timeout=2.5&max_connections=1&application_name=kb%20test"
    store = PostgresLeaseStore.from_url(url, APP)
    assert repr(store).endswith(f"table='{schema}.t1', app='{APP}')")
    assert await store.create_lease_if_absent(Lease(KEY))
    activity = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'kb test'"
    assert _sql(postgres_schema_dsn, activity) == [(1,)]  # one connection, named as asked
    assert _sql(postgres_schema_dsn, f"SELECT lease_key FROM {schema}.t1") == [(KEY,)]  # noqa: S608
    await store.aclose()


# -- the launcher ----------------------------------------------------------------------------------


def test_shared_starts_a_private_cluster_when_nothing_answers() -> None:
    with PostgresServer.shared(f"postgresql://postgres@127.0.0.1:{free_port()}/test") as server:
        assert server.is_private
        with server.temporary_schema() as dsn:
            assert _sql(dsn, "SELECT current_schema()")[0][0].startswith("kb_")
        directory = server.log_path.parent if server.log_path else None
    assert directory is not None and not directory.exists()  # stopped and deleted on exit


def test_missing_server_binaries_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ConfigError, match="apt-get install postgresql"):
        find_postgres_bin(install=False, search="/nonexistent/*/bin")


def test_an_existing_server_cannot_be_stopped_by_the_launcher(postgres_server: PostgresServer) -> None:
    if postgres_server.is_private:
        pytest.skip("no shared server on this machine: the session uses a private one")
    with pytest.raises(ConfigError, match="did not start"):
        postgres_server.stop()

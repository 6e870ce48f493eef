"""The PostgreSQL lease store: one table shared by workers on many hosts.

Applications may share the table: rows are keyed by ``(app, lease_key)``; ``<table>_meta`` beside
it records the schema version. Correctness rests on PostgreSQL:

* every fenced write is one ``UPDATE ... WHERE app = .. AND lease_key = .. AND lease_counter = ..
  [AND lease_owner IS NOT DISTINCT FROM ..] RETURNING ...``. Under READ COMMITTED a second writer
  of the row waits for the first one's row lock, then re-checks its WHERE clause against the
  committed row: of two writers from one counter exactly one gets a row back. No row back is
  :class:`~kinesis_butler.errors.StaleLease`;
* schema creation, the one read-then-write, holds an advisory lock on the table name, so
  processes starting together cannot race ``CREATE TABLE``;
* ``lease_key`` has the ``"C"`` collation: UTF-8 byte order, the code-point order of ``sorted()``.

A server that is down or stops answering surfaces within bounded time as
:class:`~kinesis_butler.errors.StoreUnavailable` (retriable); the next call reconnects. Messages
name host, port and database, never the password.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeAlias, TypeVar

from kinesis_butler.errors import (
    ClosedError,
    ConfigError,
    StaleLease,
    StoreError,
    StoreSchemaError,
    StoreUnavailable,
)
from kinesis_butler.models import ExtendedSequenceNumber, Lease
from kinesis_butler.stores._common import ALL_COLUMNS, META_COLUMNS, UNEXPLAINED, stale_lease, stale_reason
from kinesis_butler.stores._postgres_dsn import flat, parse_dsn, scrub, url_to_dsn
from kinesis_butler.stores._postgres_sql import (
    CHECKPOINT,
    COLUMNS_OF,
    COMPLETE_HANDOFF,
    COMPLETE_HANDOFF_WITH_CHECKPOINT,
    CREATE_LEASES,
    CREATE_META,
    DELETE,
    EVICT,
    EXPLAIN,
    GET,
    HANDOFF,
    INSERT,
    INSERT_VERSION,
    LINEAGE,
    LIST,
    RENEW,
    SELECT_VERSION,
    TAKE,
    to_lease,
    to_row,
)

try:  # the optional 'postgres' extra: importing this module must work without it
    import psycopg
    from psycopg import sql
except ImportError as _missing:  # pragma: no cover - only without the extra
    _IMPORT_ERROR: ImportError | None = _missing
else:
    _IMPORT_ERROR = None

__all__ = ["DEFAULT_TABLE", "SCHEMA_VERSION", "PostgresLeaseStore"]

_T = TypeVar("_T")
_Conn: TypeAlias = "psycopg.AsyncConnection[tuple[Any, ...]]"
_Rows: TypeAlias = "list[tuple[Any, ...]]"

SCHEMA_VERSION: Final = 1
"""The version this code writes into ``<table>_meta``; a table with a newer one is refused."""
DEFAULT_TABLE: Final = "kinesis_butler_leases"

_TABLE_NAME: Final = re.compile(r"(?:([a-z_][a-z0-9_]{0,62})\.)?([a-z_][a-z0-9_]{0,57})")
# The client-side deadline is the server's statement_timeout plus this slack: it catches a server
# or network that stopped answering, which statement_timeout (enforced by the server) cannot.
_NETWORK_SLACK: Final = 2.0
_CANCEL_GRACE: Final = 1.0
_SCHEMA_DEADLINES: Final = 2  # the schema check runs a few statements under one deadline


class PostgresLeaseStore:
    """A :class:`~kinesis_butler.stores.LeaseStore` in a PostgreSQL table.

    Connections are ``psycopg.AsyncConnection`` s opened on demand and kept between calls, at most
    ``max_connections`` at once. Why not ``psycopg_pool``: while the server is down its ``getconn``
    waits out the whole pool timeout, then raises ``PoolTimeout`` without the cause (refused,
    authentication, DNS); and it reconnects from background tasks with exponential backoff, so
    recovery lags the server's return. A lease store wants the opposite: fail at once with the
    cause while the server is away, reconnect on the very next call once it is back. Lease traffic
    is small (a renew per lease every few seconds), so a couple of connections suffice.

    Args:
        dsn: a libpq connection string or ``postgresql://`` URL.
        app: the application whose leases this store holds.
        table: ``name`` or ``schema.name`` of the lease table: lower-case letters, digits, ``_``.
        connect_timeout: seconds per connection attempt (libpq rounds up to whole seconds, >= 2).
        statement_timeout: seconds the server lets one statement run, row-lock waits included.
        max_connections: connections this store opens at most; more calls wait their turn.

    Raises:
        ConfigError: a malformed DSN (the message masks the password) or setting; no psycopg.
    """

    def __init__(
        self,
        dsn: str,
        app: str,
        *,
        table: str = DEFAULT_TABLE,
        connect_timeout: float = 5.0,
        statement_timeout: float = 3.0,
        max_connections: int = 2,
    ) -> None:
        if _IMPORT_ERROR is not None:
            raise ConfigError(
                "the PostgreSQL lease store needs psycopg 3: pip install 'kinesis-butler[postgres]'"
            )
        match = _TABLE_NAME.fullmatch(table)
        if match is None:
            raise ConfigError(
                f"invalid PostgreSQL lease table name {table!r}: use name or schema.name, lower-case "
                "letters, digits and '_', not starting with a digit, the name at most 58 characters"
            )
        if not app or min(connect_timeout, statement_timeout) <= 0 or max_connections < 1:
            raise ConfigError(
                "PostgreSQL lease store: the app name must not be empty, connect_timeout and "
                "statement_timeout must be > 0 and max_connections >= 1"
            )
        self._server, self._user, self._secrets = parse_dsn(dsn)
        self._dsn, self._app, self._table_name, self._max_connections = dsn, app, table, max_connections
        schema, name = match.groups()
        self._table = sql.Identifier(*filter(None, (schema, name)))
        self._meta = sql.Identifier(*filter(None, (schema, f"{name}_meta")))
        digest = hashlib.blake2b(f"kinesis-butler:{table}".encode(), digest_size=8).digest()
        self._lock_id = int.from_bytes(digest, "big", signed=True)
        self._connect_timeout = max(2, -int(-connect_timeout // 1))
        self._statement_timeout = f"{int(statement_timeout * 1000)}ms"
        self._deadline = statement_timeout + _NETWORK_SLACK
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Conn] = []
        self._schema_lock = asyncio.Lock()
        self._schema_checked = self._closed = False

    @classmethod
    def from_url(cls, url: str, app: str) -> PostgresLeaseStore:
        """A store from ``postgresql://user:password@host:port/database?table=name``.

        ``postgres://`` works too. The options ``table``, ``connect_timeout``, ``statement_timeout``
        (seconds) and ``max_connections`` are the store's; others (``sslmode``, ``options``,
        ``application_name`` ...) go to libpq.

        Raises:
            ConfigError: a malformed URL or option; the message masks the password.
        """
        dsn, options = url_to_dsn(url)
        return cls(dsn, app, **options)

    @property
    def app(self) -> str:
        """The application whose leases this store holds."""
        return self._app

    def __repr__(self) -> str:
        server = f"{self._user}@{self._server}" if self._user else self._server
        return f"PostgresLeaseStore(server={server!r}, table={self._table_name!r}, app={self._app!r})"

    async def initialize(self) -> None:
        """Create the tables if missing; verify them if present.

        Raises:
            StoreSchemaError: the table exists with other columns, or has a newer schema version.
            StoreUnavailable: the server cannot be reached.
        """
        async with self._schema_lock:
            seconds = self._deadline * _SCHEMA_DEADLINES
            await self._run(self._create_or_verify, "create the schema", check_schema=False, seconds=seconds)
            self._schema_checked = True

    async def list_leases(self) -> list[Lease]:
        """Every lease of this application, in lease-key order."""
        return [to_lease(row) for row in await self._query("list leases", LIST, self._key(""))]

    async def get_lease(self, lease_key: str) -> Lease | None:
        """One lease, or None."""
        rows = await self._query(f"read lease {lease_key!r}", GET, self._key(lease_key))
        return to_lease(rows[0]) if rows else None

    async def create_lease_if_absent(self, lease: Lease) -> bool:
        """Insert ``lease`` unless its key exists. True if it was created."""
        return bool(await self._query(f"create lease {lease.lease_key!r}", INSERT, to_row(self._app, lease)))

    async def renew_lease(self, lease: Lease) -> Lease:
        """counter+1; requires the stored counter and owner to match ``lease``."""
        return await self._fenced("renew", RENEW, lease, owner=lease.lease_owner)

    async def take_lease(self, lease: Lease, owner: str) -> Lease:
        """Become the owner; requires the stored counter to match ``lease``."""
        return await self._fenced("take", TAKE, lease, new_owner=owner)

    async def evict_lease(self, lease: Lease) -> Lease:
        """Release the lease; requires the stored counter and owner to match ``lease``."""
        return await self._fenced("evict", EVICT, lease, owner=lease.lease_owner)

    async def checkpoint(
        self,
        lease: Lease,
        checkpoint: ExtendedSequenceNumber,
        *,
        pending_checkpoint: ExtendedSequenceNumber | None = None,
    ) -> Lease:
        """Write the checkpoint; requires the stored counter and owner to match ``lease``."""
        pending = pending_checkpoint
        return await self._fenced(
            "checkpoint", CHECKPOINT, lease, owner=lease.lease_owner, checkpoint=checkpoint.sequence,
            sub=checkpoint.sub_sequence, pending=pending and pending.sequence,
            pending_sub=pending and pending.sub_sequence,
        )  # fmt: skip

    async def initiate_handoff(self, lease: Lease, new_owner: str) -> Lease:
        """Planned move to ``new_owner``; see :meth:`LeaseStore.initiate_handoff`."""
        return await self._fenced("hand off", HANDOFF, lease, owner=lease.lease_owner, new_owner=new_owner)

    async def complete_handoff(self, lease: Lease, checkpoint: ExtendedSequenceNumber | None) -> Lease:
        """The old owner's final write; see :meth:`LeaseStore.complete_handoff`."""
        if checkpoint is None:
            return await self._fenced("complete the handoff of", COMPLETE_HANDOFF, lease)
        return await self._fenced(
            "complete the handoff of", COMPLETE_HANDOFF_WITH_CHECKPOINT, lease,
            checkpoint=checkpoint.sequence, sub=checkpoint.sub_sequence,
        )  # fmt: skip

    async def update_lineage(self, lease: Lease, *, child_shard_ids: frozenset[str]) -> Lease:
        """Record the children of a shard; requires the stored counter to match ``lease``."""
        return await self._fenced("update lineage of", LINEAGE, lease, children=sorted(child_shard_ids))

    async def delete_lease(self, lease: Lease) -> None:
        """Delete the lease; requires the stored counter to match ``lease``."""
        params = {**self._key(lease.lease_key), "counter": lease.lease_counter}
        if not await self._query(f"delete lease {lease.lease_key!r}", DELETE, params):
            raise await self._stale("delete", lease, check_owner=False)

    async def aclose(self) -> None:
        """Close every connection once the calls in flight finish. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for _ in range(self._max_connections):
            await self._slots.acquire()  # every slot back: no call is in flight any more
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    # -- plumbing --------------------------------------------------------------------------------

    def _sql(self, template: str) -> sql.Composed:
        return sql.SQL(template).format(table=self._table, meta=self._meta)

    def _key(self, lease_key: str) -> dict[str, object]:
        return {"app": self._app, "key": lease_key}

    async def _query(self, what: str, template: str, params: Sequence[object] | dict[str, object]) -> _Rows:
        """Run one statement; its rows (every statement here returns rows, RETURNING if need be)."""

        async def op(conn: _Conn) -> _Rows:
            return await (await conn.execute(self._sql(template), params)).fetchall()

        return await self._run(op, what)

    async def _fenced(self, op: str, template: str, lease: Lease, **values: object) -> Lease:
        """One fenced UPDATE; the owner is part of the fence when ``values`` has ``owner``."""
        params = {**self._key(lease.lease_key), "counter": lease.lease_counter, **values}
        rows = await self._query(f"{op} lease {lease.lease_key!r}", template, params)
        if not rows:
            raise await self._stale(op, lease, check_owner="owner" in values)
        return to_lease(rows[0])

    async def _stale(self, op: str, lease: Lease, *, check_owner: bool) -> StaleLease:
        try:
            # Only to explain the failure: the failed write above already decided the outcome.
            rows = await self._query(f"read lease {lease.lease_key!r}", EXPLAIN, self._key(lease.lease_key))
        except StoreError:
            reason = UNEXPLAINED
        else:
            reason = stale_reason(op, lease, rows[0] if rows else None, check_owner=check_owner)
        return stale_lease(op, lease, reason)

    async def _create_or_verify(self, conn: _Conn) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_id,))
            leases, meta = [
                frozenset(row[0] for row in await (await conn.execute(COLUMNS_OF, (name,))).fetchall())
                for name in (self._table.as_string(conn), self._meta.as_string(conn))
            ]
            where = f"{self._label()}: table {self._table_name!r}"
            if (leases and leases != ALL_COLUMNS) or (meta and meta != META_COLUMNS) or (leases and not meta):
                raise StoreSchemaError(
                    f"{where} is not a kinesis-butler lease table (found columns "
                    f"{', '.join(sorted(leases)) or 'none'}; its {self._table_name}_meta table has "
                    f"{', '.join(sorted(meta)) or 'none'}; expected "
                    f"{', '.join(sorted(ALL_COLUMNS))}); name another table with ?table=..."
                )
            # Created only when missing: CREATE TABLE IF NOT EXISTS needs the CREATE privilege on
            # the schema even when the table exists.
            for template, missing in ((CREATE_META, not meta), (CREATE_LEASES, not leases)):
                if missing:
                    await conn.execute(self._sql(template))
            row = await (await conn.execute(self._sql(SELECT_VERSION))).fetchone()
            if row is None:
                await conn.execute(self._sql(INSERT_VERSION), (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreSchemaError(
                    f"{where}: lease schema version {row[0]!r}, this kinesis-butler reads version "
                    f"{SCHEMA_VERSION}; upgrade kinesis-butler or name another table"
                )

    async def _run(
        self,
        fn: Callable[[_Conn], Awaitable[_T]],
        what: str,
        *,
        check_schema: bool = True,
        seconds: float = 0,
    ) -> _T:
        if self._closed:
            raise ClosedError(f"{self!r} was closed and cannot be used again")
        if check_schema and not self._schema_checked:
            await self.initialize()  # a store used without initialize() checks on its first call
        seconds = seconds or self._deadline
        try:
            async with self._connection() as conn, _bounded(seconds):
                return await fn(conn)
        except TimeoutError:
            message = f"{self._label()}: could not {what}: no answer within {seconds:g} s"
            raise StoreUnavailable(message) from None
        except psycopg.Error as exc:
            raise self._error(exc, what) from exc

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Conn]:
        async with self._slots:
            if self._closed:
                raise ClosedError(f"{self!r} was closed and cannot be used again")
            conn = await self._idle_connection() or await self._connect()
            try:
                yield conn
            finally:
                if conn.closed:  # the server or the network failed: the idle siblings likely died too
                    idle, self._idle = self._idle, []
                    for other in idle:
                        await other.close()
                if (
                    self._closed
                    or conn.closed
                    or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
                ):
                    await conn.close()
                else:
                    self._idle.append(conn)

    async def _idle_connection(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not _has_input(conn.fileno()):
                return conn
            # Unprompted input on an idle connection means the server ended it (shutdown, restart,
            # idle timeout): discard it rather than fail the caller's statement on it, so the first
            # call after a server restart already succeeds.
            await conn.close()
        return None

    async def _connect(self) -> _Conn:
        conn = await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, connect_timeout=self._connect_timeout
        )
        try:
            async with _bounded(self._deadline):
                await conn.execute(
                    "SELECT set_config('statement_timeout', %s, false)", (self._statement_timeout,)
                )
        except BaseException:
            await conn.close()
            raise
        return conn

    def _label(self) -> str:
        return f"PostgreSQL lease store {self._server}"

    def _error(self, exc: psycopg.Error, what: str) -> StoreError:
        message = f"{self._label()}: could not {what}: {self._scrub(flat(exc))}"
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return StoreError(
                f"{message}; the role needs SELECT, INSERT, UPDATE and DELETE on {self._table_name} "
                "(and CREATE on its schema the first time); see docs/stores/postgres.md"
            )
        if isinstance(exc, psycopg.errors.UndefinedTable):
            self._schema_checked = False  # dropped behind our back: the next call creates it again
            return StoreSchemaError(message)
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return StoreUnavailable(message)
        return StoreError(message)

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)


@asynccontextmanager
async def _bounded(seconds: float) -> AsyncIterator[None]:
    """Raise TimeoutError when the block runs longer than ``seconds``.

    psycopg answers an interrupted query by asking the server to cancel it and waiting up to 10 s
    more, which a hung server never grants; the second, outer deadline interrupts that wait too,
    and psycopg then drops the connection at once.
    """
    async with asyncio.timeout(seconds + _CANCEL_GRACE), asyncio.timeout(seconds):
        yield


def _has_input(fd: int) -> bool:
    if hasattr(select, "poll"):  # poll() has no FD_SETSIZE limit, unlike select()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # pragma: no cover - Windows

"""The embedded default lease store: one SQLite file, shared by worker processes on one host.

Several applications may share a file: the one ``leases`` table is keyed by
``(app, lease_key)``. A ``schema_meta`` table records the schema version.

Correctness across processes rests on SQLite itself, not on anything in this process:

* every fenced write is one ``UPDATE ... WHERE app = ? AND lease_key = ? AND lease_counter = ?
  [AND lease_owner IS ?] RETURNING ...`` statement. A single statement is atomic, so two
  processes writing from the same counter cannot both succeed; no row back means the fence
  failed and the caller gets :class:`~kinesis_butler.errors.StaleLease`;
* WAL mode lets readers run while one process writes; ``busy_timeout`` makes a writer wait
  for the write lock instead of failing at once. A lock held longer than that surfaces as
  :class:`~kinesis_butler.errors.StoreUnavailable` (retriable), never as a crash;
* schema creation, the one read-then-write, runs inside ``BEGIN IMMEDIATE`` so two processes
  starting together cannot both decide to create the tables.

``synchronous=NORMAL`` in WAL mode may lose the last commits on power loss (never on a process
crash) but keeps the file consistent; a lost renew or checkpoint is then re-done, as after
any other failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, NoReturn, TypeVar

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
from kinesis_butler.stores._sqlite_sql import (
    CHECKPOINT,
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
    columns,
    position,
    to_json,
    to_lease,
    to_params,
)

__all__ = ["SCHEMA_VERSION", "SqliteLeaseStore"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

SCHEMA_VERSION: Final = 1
"""The version this code writes into ``schema_meta``; a file with a newer one is refused."""


class SqliteLeaseStore:
    """A :class:`~kinesis_butler.stores.LeaseStore` in a SQLite file.

    Each store owns one connection on one dedicated worker thread. Why a single-thread
    executor rather than ``asyncio.to_thread`` plus a lock: a sqlite3 connection belongs to
    the thread that opened it and must not be used by two threads at once, and a private
    FIFO queue gives both for free, without holding an asyncio lock across awaits. It also
    keeps a write waiting out ``busy_timeout`` off the loop's shared default executor, where
    it would delay DNS lookups and other ``to_thread`` work.

    A call whose awaiting task is cancelled still finishes on the worker thread; the caller
    just does not learn the outcome. Fencing makes that safe: its next write from the old
    counter gets StaleLease.

    Args:
        path: the database file; its directory is created if missing.
        app: the application whose leases this store holds.
        busy_timeout: seconds a write waits for another process's write lock before the call
            fails with StoreUnavailable.
    """

    def __init__(self, path: str, app: str, *, busy_timeout: float = 5.0) -> None:
        if not path:
            raise ConfigError("the SQLite lease store needs a file path")
        if not app:
            raise ConfigError("the SQLite lease store needs a non-empty application name")
        self._path = path
        self._app = app
        self._busy_timeout = busy_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        # Touched only on the worker thread.
        self._conn: sqlite3.Connection | None = None
        self._schema_checked = False

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    @property
    def app(self) -> str:
        """The application whose leases this store holds."""
        return self._app

    def __repr__(self) -> str:
        return f"SqliteLeaseStore(path={self._path!r}, app={self._app!r})"

    async def initialize(self) -> None:
        """Create the tables if missing; verify them if present.

        Raises:
            StoreSchemaError: the file holds a ``leases`` table that is not ours, a newer schema
                version, or is not a SQLite database.
            ConfigError: the file or its directory cannot be created or written.
        """
        await self._run(self._ensure_schema, "initialize", check_schema=False)

    async def list_leases(self) -> list[Lease]:
        """Every lease of this application, in lease-key order."""

        def op(conn: sqlite3.Connection) -> list[Lease]:
            return [to_lease(row) for row in conn.execute(LIST, (self._app,))]

        return await self._run(op, "list leases")

    async def get_lease(self, lease_key: str) -> Lease | None:
        """One lease, or None."""

        def op(conn: sqlite3.Connection) -> Lease | None:
            row = conn.execute(GET, (self._app, lease_key)).fetchone()
            return None if row is None else to_lease(row)

        return await self._run(op, f"read lease {lease_key!r}")

    async def create_lease_if_absent(self, lease: Lease) -> bool:
        """Insert ``lease`` unless its key exists. True if it was created."""
        params = to_params(self._app, lease)
        return await self._run(
            lambda conn: conn.execute(INSERT, params).rowcount == 1, f"create lease {lease.lease_key!r}"
        )

    async def renew_lease(self, lease: Lease) -> Lease:
        """counter+1; requires the stored counter and owner to match ``lease``."""
        return await self._fenced("renew", RENEW, lease, check_owner=True)

    async def take_lease(self, lease: Lease, owner: str) -> Lease:
        """Become the owner; requires the stored counter to match ``lease``."""
        return await self._fenced("take", TAKE, lease, check_owner=False, new_owner=owner)

    async def evict_lease(self, lease: Lease) -> Lease:
        """Release the lease; requires the stored counter and owner to match ``lease``."""
        return await self._fenced("evict", EVICT, lease, check_owner=True)

    async def checkpoint(
        self,
        lease: Lease,
        checkpoint: ExtendedSequenceNumber,
        *,
        pending_checkpoint: ExtendedSequenceNumber | None = None,
    ) -> Lease:
        """Write the checkpoint; requires the stored counter and owner to match ``lease``."""
        positions = {
            **position("checkpoint", checkpoint),
            **position("pending_checkpoint", pending_checkpoint),
        }
        return await self._fenced("checkpoint", CHECKPOINT, lease, check_owner=True, **positions)

    async def initiate_handoff(self, lease: Lease, new_owner: str) -> Lease:
        """Planned move to ``new_owner``; see :meth:`LeaseStore.initiate_handoff`."""
        return await self._fenced("hand off", HANDOFF, lease, check_owner=True, new_owner=new_owner)

    async def complete_handoff(self, lease: Lease, checkpoint: ExtendedSequenceNumber | None) -> Lease:
        """The old owner's final write; see :meth:`LeaseStore.complete_handoff`."""
        if checkpoint is None:
            return await self._fenced("complete the handoff of", COMPLETE_HANDOFF, lease, check_owner=False)
        return await self._fenced(
            "complete the handoff of",
            COMPLETE_HANDOFF_WITH_CHECKPOINT,
            lease,
            check_owner=False,
            checkpoint=checkpoint.sequence,
            checkpoint_sub=checkpoint.sub_sequence,
        )

    async def update_lineage(self, lease: Lease, *, child_shard_ids: frozenset[str]) -> Lease:
        """Record the children of a shard; requires the stored counter to match ``lease``."""
        return await self._fenced(
            "update lineage of", LINEAGE, lease, check_owner=False, child_shard_ids=to_json(child_shard_ids)
        )

    async def delete_lease(self, lease: Lease) -> None:
        """Delete the lease; requires the stored counter to match ``lease``."""
        params = {"app": self._app, "key": lease.lease_key, "counter": lease.lease_counter}

        def op(conn: sqlite3.Connection) -> None:
            if conn.execute(DELETE, params).rowcount != 1:
                raise self._stale(conn, "delete", lease, check_owner=False)

        await self._run(op, f"delete lease {lease.lease_key!r}")

    async def aclose(self) -> None:
        """Close the connection and stop the worker thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        executor = self._executor
        if executor is None:
            return
        try:
            # Queued behind any call still in flight, so those finish first.
            await asyncio.get_running_loop().run_in_executor(executor, self._close_connection)
        finally:
            executor.shutdown(wait=False)

    # -- plumbing: everything below except _run executes on the worker thread ---------------

    async def _fenced(self, op: str, sql: str, lease: Lease, *, check_owner: bool, **values: object) -> Lease:
        params = {
            "app": self._app,
            "key": lease.lease_key,
            "counter": lease.lease_counter,
            "owner": lease.lease_owner,
            **values,
        }

        def run(conn: sqlite3.Connection) -> Lease:
            # fetchall() also steps the statement to completion, which ends its implicit
            # transaction; an unfinished RETURNING statement would keep the write lock.
            rows = conn.execute(sql, params).fetchall()
            if not rows:
                raise self._stale(conn, op, lease, check_owner=check_owner)
            return to_lease(rows[0])

        return await self._run(run, f"{op} lease {lease.lease_key!r}")

    async def _run(
        self, fn: Callable[[sqlite3.Connection], _T], what: str, *, check_schema: bool = True
    ) -> _T:
        if self._closed:
            raise ClosedError(f"{self!r} was closed and cannot be used again")
        if self._executor is None:
            # Created on first use, so constructing a store does no I/O and needs no loop.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kinesis-butler-sqlite")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, what, check_schema)

    def _call(self, fn: Callable[[sqlite3.Connection], _T], what: str, check_schema: bool) -> _T:
        conn = self._conn if self._conn is not None else self._connect()
        if check_schema and not self._schema_checked:
            # A store used without initialize() verifies the schema on its first call.
            self._ensure_schema(conn)
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            self._raise(exc, what)

    def _connect(self) -> sqlite3.Connection:
        if self._path != ":memory:":
            directory = os.path.dirname(os.path.abspath(self._path))
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create directory {directory!r} for the SQLite lease store {self._path!r}: "
                    f"{exc.strerror or exc}"
                ) from exc
        try:
            # isolation_level=None: the module opens no transactions behind our back; each
            # statement commits on its own unless we say BEGIN.
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            self._raise(exc, "open the database", opening=True)
        try:
            # busy_timeout first, so switching to WAL waits for a process doing the same.
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            conn.close()
            self._raise(exc, "open the database", opening=True)
        if mode != "wal":
            _log.warning("SQLite lease store %s runs in journal mode %r, not WAL", self._path, mode)
        self._conn = conn
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._create_or_verify(conn)
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            self._raise(exc, "create the schema", opening=True)
        self._schema_checked = True

    def _create_or_verify(self, conn: sqlite3.Connection) -> None:
        leases, meta = columns(conn, "leases"), columns(conn, "schema_meta")
        if leases and leases != ALL_COLUMNS:
            raise StoreSchemaError(
                f"{self._path}: its 'leases' table is not a kinesis-butler lease table "
                f"(found columns {', '.join(sorted(leases))}; "
                f"missing {', '.join(sorted(ALL_COLUMNS - leases))}); use another file for the lease store"
            )
        if (meta and meta != META_COLUMNS) or (leases and not meta):
            raise StoreSchemaError(
                f"{self._path}: found a 'leases' table but no kinesis-butler 'schema_meta' table "
                f"(schema_meta columns: {', '.join(sorted(meta)) or 'none'}); "
                "use another file for the lease store"
            )
        if not meta:
            conn.execute(CREATE_META)
        if not leases:
            conn.execute(CREATE_LEASES)
        conn.execute(INSERT_VERSION, (str(SCHEMA_VERSION),))
        (version,) = conn.execute(SELECT_VERSION).fetchone()
        if version != str(SCHEMA_VERSION):
            raise StoreSchemaError(
                f"{self._path}: lease schema version {version!r}, this kinesis-butler reads version "
                f"{SCHEMA_VERSION}; upgrade kinesis-butler or use another file"
            )

    def _stale(self, conn: sqlite3.Connection, op: str, lease: Lease, *, check_owner: bool) -> StaleLease:
        try:
            # Only to explain the failure: the failed write above already decided the outcome.
            row = conn.execute(EXPLAIN, (self._app, lease.lease_key)).fetchone()
        except sqlite3.Error:
            reason = UNEXPLAINED
        else:
            reason = stale_reason(op, lease, row, check_owner=check_owner)
        return stale_lease(op, lease, reason)

    def _raise(self, exc: sqlite3.Error, what: str, *, opening: bool = False) -> NoReturn:
        """Re-raise a sqlite3 error as ours; a programming error surfaces unchanged."""
        primary = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        error: Exception
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            error = StoreUnavailable(
                f"SQLite lease store {self._path}: could not {what}: the database stayed locked by "
                f"another connection longer than the {self._busy_timeout:g} s busy timeout"
            )
        elif primary == sqlite3.SQLITE_NOTADB:
            error = StoreSchemaError(
                f"{self._path} is not a SQLite database; use another file for the lease store"
            )
        elif primary == sqlite3.SQLITE_CORRUPT:
            error = StoreError(f"SQLite lease store {self._path} is corrupt: {exc}")
        elif opening and primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
            error = ConfigError(
                f"cannot open the SQLite lease store {self._path!r} for writing ({exc}); "
                "check that the path names a file in a writable directory"
            )
        elif isinstance(exc, sqlite3.OperationalError):
            error = StoreUnavailable(f"SQLite lease store {self._path}: could not {what}: {exc}")
        else:
            raise exc
        raise error from exc

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

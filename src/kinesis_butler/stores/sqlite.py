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
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, NoReturn, TypeVar

from kinesis_butler.errors import (
    ClosedError,
    ConfigError,
    StaleLease,
    StoreError,
    StoreSchemaError,
    StoreUnavailable,
)
from kinesis_butler.models import ExtendedSequenceNumber, Lease

__all__ = ["SCHEMA_VERSION", "SqliteLeaseStore"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

SCHEMA_VERSION: Final = 1
"""The version this code writes into ``schema_meta``; a file with a newer one is refused."""

# Column -> declaration. Hash keys are decimal TEXT: 128-bit values overflow INTEGER.
# Shard-id sets are sorted JSON arrays. Positions are (sequence TEXT, sub-sequence INTEGER).
_LEASE_COLUMN_TYPES: Final = {
    "lease_key": "TEXT NOT NULL",
    "lease_owner": "TEXT",
    "lease_counter": "INTEGER NOT NULL",
    "checkpoint": "TEXT NOT NULL",
    "checkpoint_sub": "INTEGER NOT NULL",
    "pending_checkpoint": "TEXT",
    "pending_checkpoint_sub": "INTEGER",
    "owner_switches": "INTEGER NOT NULL",
    "parent_shard_ids": "TEXT NOT NULL",
    "child_shard_ids": "TEXT NOT NULL",
    "starting_hash_key": "TEXT",
    "ending_hash_key": "TEXT",
    "checkpoint_owner": "TEXT",
    "stream_name": "TEXT",
    "shard_id": "TEXT",
}
_LEASE_COLUMNS: Final = tuple(_LEASE_COLUMN_TYPES)
_ALL_COLUMNS: Final = frozenset({"app", *_LEASE_COLUMNS})
_META_COLUMNS: Final = frozenset({"key", "value"})
_SELECT: Final = ", ".join(_LEASE_COLUMNS)
# WITHOUT ROWID clusters rows by (app, lease_key): listing an app is one range scan that is
# already in lease-key order. The default BINARY collation orders UTF-8 bytes, which is the
# code-point order Python's sorted() uses.
_CREATE_LEASES: Final = (
    "CREATE TABLE leases (app TEXT NOT NULL, "
    + ", ".join(f"{name} {decl}" for name, decl in _LEASE_COLUMN_TYPES.items())
    + ", PRIMARY KEY (app, lease_key)) WITHOUT ROWID"
)
_CREATE_META: Final = "CREATE TABLE schema_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_INSERT: Final = (
    f"INSERT INTO leases (app, {_SELECT}) VALUES (:app, {', '.join(':' + c for c in _LEASE_COLUMNS)}) "  # noqa: S608
    "ON CONFLICT (app, lease_key) DO NOTHING"
)


def _fenced_update(assignments: str, *, check_owner: bool) -> str:
    owner = " AND lease_owner IS :owner" if check_owner else ""
    return (
        f"UPDATE leases SET lease_counter = lease_counter + 1{assignments} "  # noqa: S608 - constants only
        f"WHERE app = :app AND lease_key = :key AND lease_counter = :counter{owner} "
        f"RETURNING {_SELECT}"
    )


_RENEW: Final = _fenced_update("", check_owner=True)
# Right-hand sides see the row as it was, so owner_switches compares against the old owner.
# As in the KCL, taking an unowned lease (or one already ours) is not an owner switch.
_TAKE: Final = _fenced_update(
    ", owner_switches = owner_switches + (lease_owner IS NOT NULL AND lease_owner IS NOT :new_owner),"
    " lease_owner = :new_owner, checkpoint_owner = NULL",
    check_owner=False,
)
_EVICT: Final = _fenced_update(", lease_owner = NULL, checkpoint_owner = NULL", check_owner=True)
_CHECKPOINT: Final = _fenced_update(
    ", checkpoint = :checkpoint, checkpoint_sub = :checkpoint_sub, owner_switches = 0,"
    " pending_checkpoint = :pending_checkpoint, pending_checkpoint_sub = :pending_checkpoint_sub",
    check_owner=True,
)
# Handoff start: the current owner becomes checkpoint_owner; only when none is set.
_HANDOFF: Final = _fenced_update(
    ", checkpoint_owner = lease_owner, lease_owner = :new_owner, owner_switches = owner_switches + 1",
    check_owner=True,
).replace(" RETURNING", " AND lease_owner IS NOT NULL AND checkpoint_owner IS NULL RETURNING")
_COMPLETE_HANDOFF: Final = _fenced_update(", checkpoint_owner = NULL", check_owner=False).replace(
    " RETURNING", " AND checkpoint_owner IS NOT NULL RETURNING"
)
_COMPLETE_HANDOFF_WITH_CHECKPOINT: Final = _fenced_update(
    ", checkpoint_owner = NULL, checkpoint = :checkpoint, checkpoint_sub = :checkpoint_sub,"
    " owner_switches = 0, pending_checkpoint = NULL, pending_checkpoint_sub = NULL",
    check_owner=False,
).replace(" RETURNING", " AND checkpoint_owner IS NOT NULL RETURNING")
_LINEAGE: Final = _fenced_update(", child_shard_ids = :child_shard_ids", check_owner=False)
_DELETE: Final = "DELETE FROM leases WHERE app = :app AND lease_key = :key AND lease_counter = :counter"


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
            sql = f"SELECT {_SELECT} FROM leases WHERE app = ? ORDER BY lease_key"  # noqa: S608
            return [_to_lease(row) for row in conn.execute(sql, (self._app,))]

        return await self._run(op, "list leases")

    async def get_lease(self, lease_key: str) -> Lease | None:
        """One lease, or None."""

        def op(conn: sqlite3.Connection) -> Lease | None:
            sql = f"SELECT {_SELECT} FROM leases WHERE app = ? AND lease_key = ?"  # noqa: S608
            row = conn.execute(sql, (self._app, lease_key)).fetchone()
            return None if row is None else _to_lease(row)

        return await self._run(op, f"read lease {lease_key!r}")

    async def create_lease_if_absent(self, lease: Lease) -> bool:
        """Insert ``lease`` unless its key exists. True if it was created."""
        params = _to_params(self._app, lease)
        return await self._run(
            lambda conn: conn.execute(_INSERT, params).rowcount == 1, f"create lease {lease.lease_key!r}"
        )

    async def renew_lease(self, lease: Lease) -> Lease:
        """counter+1; requires the stored counter and owner to match ``lease``."""
        return await self._fenced("renew", _RENEW, lease, check_owner=True)

    async def take_lease(self, lease: Lease, owner: str) -> Lease:
        """Become the owner; requires the stored counter to match ``lease``."""
        return await self._fenced("take", _TAKE, lease, check_owner=False, new_owner=owner)

    async def evict_lease(self, lease: Lease) -> Lease:
        """Release the lease; requires the stored counter and owner to match ``lease``."""
        return await self._fenced("evict", _EVICT, lease, check_owner=True)

    async def checkpoint(
        self,
        lease: Lease,
        checkpoint: ExtendedSequenceNumber,
        *,
        pending_checkpoint: ExtendedSequenceNumber | None = None,
    ) -> Lease:
        """Write the checkpoint; requires the stored counter and owner to match ``lease``."""
        positions = {
            **_position("checkpoint", checkpoint),
            **_position("pending_checkpoint", pending_checkpoint),
        }
        return await self._fenced("checkpoint", _CHECKPOINT, lease, check_owner=True, **positions)

    async def initiate_handoff(self, lease: Lease, new_owner: str) -> Lease:
        """Planned move to ``new_owner``; see :meth:`LeaseStore.initiate_handoff`."""
        return await self._fenced("hand off", _HANDOFF, lease, check_owner=True, new_owner=new_owner)

    async def complete_handoff(self, lease: Lease, checkpoint: ExtendedSequenceNumber | None) -> Lease:
        """The old owner's final write; see :meth:`LeaseStore.complete_handoff`."""
        if checkpoint is None:
            return await self._fenced("complete the handoff of", _COMPLETE_HANDOFF, lease, check_owner=False)
        return await self._fenced(
            "complete the handoff of",
            _COMPLETE_HANDOFF_WITH_CHECKPOINT,
            lease,
            check_owner=False,
            checkpoint=checkpoint.sequence,
            checkpoint_sub=checkpoint.sub_sequence,
        )

    async def update_lineage(self, lease: Lease, *, child_shard_ids: frozenset[str]) -> Lease:
        """Record the children of a shard; requires the stored counter to match ``lease``."""
        return await self._fenced(
            "update lineage of", _LINEAGE, lease, check_owner=False, child_shard_ids=_to_json(child_shard_ids)
        )

    async def delete_lease(self, lease: Lease) -> None:
        """Delete the lease; requires the stored counter to match ``lease``."""
        params = {"app": self._app, "key": lease.lease_key, "counter": lease.lease_counter}

        def op(conn: sqlite3.Connection) -> None:
            if conn.execute(_DELETE, params).rowcount != 1:
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
            return _to_lease(rows[0])

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
        leases, meta = _columns(conn, "leases"), _columns(conn, "schema_meta")
        if leases and leases != _ALL_COLUMNS:
            raise StoreSchemaError(
                f"{self._path}: its 'leases' table is not a kinesis-butler lease table "
                f"(found columns {', '.join(sorted(leases))}; "
                f"missing {', '.join(sorted(_ALL_COLUMNS - leases))}); use another file for the lease store"
            )
        if (meta and meta != _META_COLUMNS) or (leases and not meta):
            raise StoreSchemaError(
                f"{self._path}: found a 'leases' table but no kinesis-butler 'schema_meta' table "
                f"(schema_meta columns: {', '.join(sorted(meta)) or 'none'}); "
                "use another file for the lease store"
            )
        if not meta:
            conn.execute(_CREATE_META)
        if not leases:
            conn.execute(_CREATE_LEASES)
        conn.execute(
            "INSERT INTO schema_meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
            (str(SCHEMA_VERSION),),
        )
        (version,) = conn.execute("SELECT value FROM schema_meta WHERE key = 'schema_version'").fetchone()
        if version != str(SCHEMA_VERSION):
            raise StoreSchemaError(
                f"{self._path}: lease schema version {version!r}, this kinesis-butler reads version "
                f"{SCHEMA_VERSION}; upgrade kinesis-butler or use another file"
            )

    def _stale(self, conn: sqlite3.Connection, op: str, lease: Lease, *, check_owner: bool) -> StaleLease:
        key, counter = lease.lease_key, lease.lease_counter
        try:
            # Only to explain the failure: the failed write above already decided the outcome.
            row = conn.execute(
                "SELECT lease_counter, lease_owner FROM leases WHERE app = ? AND lease_key = ?",
                (self._app, key),
            ).fetchone()
        except sqlite3.Error:
            reason = "its counter or owner changed"
        else:
            if row is None:
                reason = "the lease does not exist (it was deleted)"
            elif row[0] != counter:
                reason = f"its counter moved on to {row[0]}"
            elif check_owner and row[1] != lease.lease_owner:
                reason = f"it is owned by {row[1]!r}, not {lease.lease_owner!r}"
            elif op.endswith("hand off"):
                reason = "it has no owner or a handoff is already under way"
            elif "handoff" in op:
                reason = "no handoff is under way"
            else:
                reason = "it changed and changed back"
        return StaleLease(
            f"cannot {op} lease {key!r} at counter {counter}: {reason}",
            lease_key=key,
            expected_counter=counter,
        )

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


def _columns(conn: sqlite3.Connection, table: str) -> frozenset[str]:
    return frozenset(row[0] for row in conn.execute("SELECT name FROM pragma_table_info(?)", (table,)))


def _to_json(ids: frozenset[str]) -> str:
    return json.dumps(sorted(ids))


def _position(column: str, position: ExtendedSequenceNumber | None) -> dict[str, object]:
    if position is None:
        return {column: None, f"{column}_sub": None}
    return {column: position.sequence, f"{column}_sub": position.sub_sequence}


def _to_params(app: str, lease: Lease) -> dict[str, object]:
    return {
        "app": app,
        "lease_key": lease.lease_key,
        "lease_owner": lease.lease_owner,
        "lease_counter": lease.lease_counter,
        **_position("checkpoint", lease.checkpoint),
        **_position("pending_checkpoint", lease.pending_checkpoint),
        "owner_switches": lease.owner_switches_since_checkpoint,
        "parent_shard_ids": _to_json(lease.parent_shard_ids),
        "child_shard_ids": _to_json(lease.child_shard_ids),
        "starting_hash_key": lease.starting_hash_key,
        "ending_hash_key": lease.ending_hash_key,
        "checkpoint_owner": lease.checkpoint_owner,
        "stream_name": lease.stream_name,
        "shard_id": lease.shard_id,
    }


def _to_lease(row: Sequence[Any]) -> Lease:
    (key, owner, counter, cp, cp_sub, pending, pending_sub, switches, parents, children, start, end, cp_owner,
     stream, shard) = row  # fmt: skip
    return Lease(
        lease_key=key,
        lease_owner=owner,
        lease_counter=counter,
        checkpoint=ExtendedSequenceNumber(cp, cp_sub),
        pending_checkpoint=None if pending is None else ExtendedSequenceNumber(pending, pending_sub or 0),
        owner_switches_since_checkpoint=switches,
        parent_shard_ids=frozenset(json.loads(parents)),
        child_shard_ids=frozenset(json.loads(children)),
        starting_hash_key=start,
        ending_hash_key=end,
        checkpoint_owner=cp_owner,
        stream_name=stream,
        shard_id=shard,
    )

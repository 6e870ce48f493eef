"""An on-disk spool for a producer: records accepted but not yet written survive a crash.

One SQLite file per stream (the stream's name is stored in it; opening it for another stream is
refused). ``append`` commits a batch of records in one transaction, ``pending`` returns what is
left in append order, ``remove`` deletes records once PutRecords wrote them.

Durability. The file runs in WAL mode. A COMMIT appends the transaction's pages to the ``-wal``
file with ``write()`` before it returns; with ``synchronous=NORMAL`` (the default here) there is
no ``fsync`` at commit, only at checkpoints. Once ``write()`` returned the bytes are in the
kernel's page cache, which outlives the process: ``kill -9``, a segfault or the OOM killer lose
nothing committed, and the next opener replays the WAL. Only an OS crash or a power loss can lose
the last commits (the file stays consistent). ``fsync=True`` (``synchronous=FULL``) syncs the WAL
at every commit and survives those too, for an ``fsync`` per batch.

Exclusivity. A spool is used by one producer at a time: opening takes an exclusive ``flock`` on
``<path>-lock`` (released by the kernel when the holder dies, even by ``kill -9``); a second
opener gets :class:`SpoolLocked` at once.

:class:`AsyncSpool` keeps every SQLite call on one dedicated thread and group-commits: appends and
removals that arrive while a transaction runs go into the next one, so the event loop never
blocks on SQLite and concurrent puts share a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, NamedTuple

from kinesis_butler.errors import ButlerError, ConfigError

__all__ = ["AsyncSpool", "Spool", "SpoolCorrupt", "SpoolError", "SpoolLocked", "SpooledRecord"]

SCHEMA_VERSION: Final = "1"

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS spool_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS spool_records ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " data BLOB NOT NULL,"
    " partition_key TEXT NOT NULL,"
    " explicit_hash_key TEXT)",
)


class SpoolError(ButlerError):
    """The producer's spool could not be opened, read or written."""


class SpoolLocked(SpoolError):
    """Another producer (in this or another process) has the spool open."""


class SpoolCorrupt(SpoolError):
    """The spool file is not a SQLite database, is damaged, or is not a kinesis-butler spool."""


class SpooledRecord(NamedTuple):
    """A record in the spool; ``id`` grows in append order."""

    id: int
    data: bytes
    partition_key: str
    explicit_hash_key: str | None


class Spool:
    """The blocking spool. Not thread-safe: use it from one thread at a time
    (:class:`AsyncSpool` runs it on a dedicated thread).

    Raises:
        SpoolLocked: another producer holds the spool.
        SpoolCorrupt: the file is not a spool, is damaged, or belongs to another stream.
        ConfigError: the file or its directory cannot be created or written.
    """

    def __init__(self, path: str | os.PathLike[str], stream: str, *, fsync: bool = False) -> None:
        self.path = os.fspath(path)
        self.stream = stream
        self._lock_fd = self._lock()
        try:
            self._conn = self._connect(fsync)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _lock(self) -> int:
        directory = os.path.dirname(os.path.abspath(self.path))
        lock_path = f"{self.path}-lock"
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the producer spool {self.path!r}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolLocked(
                f"the producer spool {self.path!r} is in use by another producer (pid {holder}); "
                "each producer needs its own spool file"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _connect(self, fsync: bool) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; check_same_thread=False: AsyncSpool
            # opens it on its worker thread, tests may open it anywhere; one user at a time.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc, "open") from exc
        try:
            self._wal(conn)
            conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._create_or_verify(conn)
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc, "open") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _wal(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise SpoolError(f"the producer spool {self.path!r} cannot use WAL mode (got {mode!r})")

    def _create_or_verify(self, conn: sqlite3.Connection) -> None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        ours = {"spool_meta", "spool_records"}
        if tables - {"sqlite_sequence"} and not ours <= tables:
            raise SpoolCorrupt(
                f"{self.path!r} is a SQLite database but not a kinesis-butler producer spool "
                f"(tables: {', '.join(sorted(tables))}); use another file"
            )
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT OR IGNORE INTO spool_meta VALUES ('version', ?)", (SCHEMA_VERSION,))
        conn.execute("INSERT OR IGNORE INTO spool_meta VALUES ('stream', ?)", (self.stream,))
        meta = dict(conn.execute("SELECT key, value FROM spool_meta").fetchall())
        if meta.get("version") != SCHEMA_VERSION:
            raise SpoolCorrupt(
                f"producer spool {self.path!r} has schema version {meta.get('version')!r}; "
                f"this kinesis-butler reads version {SCHEMA_VERSION}"
            )
        if meta.get("stream") != self.stream:
            raise SpoolCorrupt(
                f"producer spool {self.path!r} belongs to stream {meta.get('stream')!r}, "
                f"not {self.stream!r}; use one spool file per stream"
            )

    def _error(self, exc: sqlite3.Error, what: str) -> SpoolError:
        primary = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if primary in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            return SpoolCorrupt(
                f"the producer spool {self.path!r} is not a readable SQLite database ({exc}); "
                "move it aside to start an empty spool (its unsent records are lost)"
            )
        if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
            return SpoolError(f"cannot {what} the producer spool {self.path!r} for writing: {exc}")
        return SpoolError(f"producer spool {self.path!r}: could not {what}: {exc}")

    def apply(
        self, records: Sequence[tuple[bytes, str, str | None]], written: Iterable[int] = ()
    ) -> list[int]:
        """Append ``records`` and delete the ``written`` ids in one transaction; returns the new
        records' ids, in order. Durable (see the module docstring) once it returns."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = [
                    conn.execute(
                        "INSERT INTO spool_records (data, partition_key, explicit_hash_key) VALUES (?, ?, ?)",
                        record,
                    ).lastrowid
                    or 0
                    for record in records
                ]
                conn.executemany("DELETE FROM spool_records WHERE id = ?", ((i,) for i in written))
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise self._error(exc, "write") from exc
        return ids

    def append(self, records: Sequence[tuple[bytes, str, str | None]]) -> list[int]:
        """Append ``(data, partition_key, explicit_hash_key)`` records in one transaction."""
        return self.apply(records)

    def remove(self, ids: Iterable[int]) -> None:
        """Delete records (once written to the stream) in one transaction."""
        self.apply((), ids)

    def pending(self) -> list[SpooledRecord]:
        """Every record still in the spool, in append order."""
        try:
            rows = self._conn.execute(
                "SELECT id, data, partition_key, explicit_hash_key FROM spool_records ORDER BY id"
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc, "read") from exc
        return [SpooledRecord(int(i), bytes(d), str(k), h) for i, d, k, h in rows]

    def close(self) -> None:
        """Close the file and release the lock. Idempotent."""
        if self._lock_fd < 0:
            return
        try:
            self._conn.close()
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSpool:
    """A :class:`Spool` on a dedicated thread, with group commit.

    ``append`` returns a future of the record's id, resolved once its transaction committed;
    ``mark_written`` queues a deletion (fire and forget: a deletion lost in a crash only means
    the record is sent again on the next start). Both go into the next transaction.
    """

    def __init__(self, spool: Spool, executor: ThreadPoolExecutor) -> None:
        self.spool = spool
        self._executor = executor
        self._appends: list[tuple[bytes, str, str | None]] = []
        self._waiters: list[asyncio.Future[int]] = []
        self._written: list[int] = []
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: str, stream: str, *, fsync: bool = False) -> AsyncSpool:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kinesis-butler-spool")
        try:
            spool = await asyncio.get_running_loop().run_in_executor(
                executor, lambda: Spool(path, stream, fsync=fsync)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(spool, executor)

    async def pending(self) -> list[SpooledRecord]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.spool.pending)

    def append(self, data: bytes, partition_key: str, explicit_hash_key: str | None) -> asyncio.Future[int]:
        """Queue a record for the next commit; the future gives its id once durable."""
        if self._closed:
            raise SpoolError(f"the producer spool {self.spool.path!r} is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._appends.append((data, partition_key, explicit_hash_key))
        self._waiters.append(future)
        self._kick()
        return future

    def mark_written(self, ids: Iterable[int]) -> None:
        """Queue the deletion of records PutRecords wrote."""
        self._written.extend(ids)
        if not self._closed:
            self._kick()

    def _kick(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write(), name="producer-spool")

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._appends or self._written:
                appends, waiters, written = self._appends, self._waiters, self._written
                self._appends, self._waiters, self._written = [], [], []
                try:
                    ids = await loop.run_in_executor(self._executor, self.spool.apply, appends, written)
                except BaseException as exc:
                    error = exc if isinstance(exc, SpoolError) else SpoolError(f"spool write failed: {exc!r}")
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for waiter, record_id in zip(waiters, ids, strict=True):
                    if not waiter.done():
                        waiter.set_result(record_id)
        finally:
            self._writer = None

    async def aclose(self) -> None:
        """Commit what is queued, then close the file and its thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                await asyncio.shield(self._writer)
            if self._written:  # queued after the writer's last round
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.spool.remove, self._written
                )
        finally:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.spool.close)
            self._executor.shutdown(wait=False)

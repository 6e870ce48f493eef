"""PostgreSQL servers for tests and scripts: the machine's own, or a private throw-away cluster.

:meth:`PostgresServer.shared` uses the server at ``127.0.0.1:5432`` (trust authentication,
database ``test``) when one answers, and otherwise starts a private cluster.
:meth:`PostgresServer.private` always starts a private cluster, so a test may stop, restart or
freeze it without touching a server others use::

    with PostgresServer.private() as server:
        store = PostgresLeaseStore(server.dsn, "app")
        server.stop()   # ... outage ...
        server.start()  # same port, same data

A private cluster is ``initdb``-ed into a temporary directory and served on a free loopback port
with trust authentication and durability off (fsync, full-page writes: a test server needs
speed, not crash safety). ``initdb`` refuses to run as root, so under root the cluster belongs to
the ``postgres`` OS user and every server command runs through ``runuser``. Without the server
binaries, root with ``apt-get`` installs the ``postgresql`` package; anyone else gets a
:class:`~kinesis_butler.errors.ConfigError` saying what to install.

:meth:`PostgresServer.temporary_schema` gives each test an empty schema of its own (a DSN whose
``search_path`` points at it), dropped afterwards, so parallel and repeated runs never collide.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

from kinesis_butler.errors import ConfigError
from kinesis_butler.testing.emulator import free_port

__all__ = ["SHARED_DSN", "PostgresServer", "find_postgres_bin"]

SHARED_DSN = "postgresql://postgres@127.0.0.1:5432/test"
"""Where :meth:`PostgresServer.shared` looks first: this machine kind's server (trust auth)."""

_INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found; install them with "
    "`apt-get install postgresql` (Debian/Ubuntu), `dnf install postgresql-server` or "
    "`brew install postgresql`, or point the tests at a server you run"
)
# A test server needs speed, not durability: no fsync, no full-page writes. Small shared memory,
# so several private clusters fit on a small machine.
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "'16MB'",
    "max_connections": "100",
    "log_min_messages": "warning",
}
_TIMEOUT = 60.0  # seconds any pg_ctl command or install step may take


def find_postgres_bin(*, install: bool = True, search: str = "/usr/lib/postgresql/*/bin") -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``, installing PostgreSQL if allowed.

    Args:
        install: when the binaries are missing and this process is root with ``apt-get``, run
            ``apt-get update && apt-get install -y postgresql``.
        search: a glob of candidate directories (Debian's layout); the newest version wins,
            then ``initdb`` on ``PATH``.

    Raises:
        ConfigError: the binaries are missing and could not be installed; says how to.
    """
    for _ in range(2):
        candidates = sorted(
            (p for p in Path("/").glob(search.lstrip("/")) if (p / "initdb").is_file()),
            key=lambda p: [int(part) for part in re.findall(r"\d+", str(p))],
        )
        if candidates:
            return candidates[-1]
        initdb = shutil.which("initdb")
        if initdb is not None and shutil.which("pg_ctl", path=str(Path(initdb).parent)):
            return Path(initdb).parent
        apt = shutil.which("apt-get")
        if not (install and apt and os.geteuid() == 0):
            break
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in ([apt, "update"], [apt, "install", "-y", "postgresql"]):
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)  # noqa: S603
            if done.returncode != 0:
                tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
                raise ConfigError(f"{' '.join(argv)} failed ({tail}); {_INSTALL_HINT}")
        install = False  # installed: look once more, never install twice
    raise ConfigError(_INSTALL_HINT)


class PostgresServer:
    """A PostgreSQL server for tests: an existing one, or a private cluster this object owns.

    Use :meth:`shared` or :meth:`private` rather than the constructor. As a context manager it
    starts a private cluster on entry and stops and deletes it on exit; an existing server is
    left alone.

    Args:
        dsn: an existing server to use as is; None for a private cluster.
        install: allow :func:`find_postgres_bin` to install PostgreSQL (root with apt-get only).
    """

    def __init__(self, dsn: str | None = None, *, install: bool = True) -> None:
        self._external_dsn = dsn
        self._install = install
        self.port = 0
        self._dir: Path | None = None
        self._bin: Path | None = None
        self._running = False

    @classmethod
    def shared(cls, dsn: str = SHARED_DSN, *, install: bool = True) -> PostgresServer:
        """The server at ``dsn`` if it answers, else a private cluster (started on ``start()``)."""
        try:
            with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return cls(install=install)
        return cls(dsn, install=install)

    @classmethod
    def private(cls, *, install: bool = True) -> PostgresServer:
        """A private cluster on a free loopback port (started on ``start()`` or ``with``)."""
        return cls(install=install)

    @property
    def is_private(self) -> bool:
        """True if this object runs the server (and may stop, restart or freeze it)."""
        return self._external_dsn is None

    @property
    def dsn(self) -> str:
        """A ``postgresql://`` URL to the server as superuser ``postgres`` (no password)."""
        if self._external_dsn is not None:
            return self._external_dsn
        if not self.port:
            raise ConfigError("the private PostgreSQL server was never started; call start() first")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def log_path(self) -> Path | None:
        """The private server's log file."""
        return None if self._dir is None else self._dir / "server.log"

    def start(self) -> PostgresServer:
        """Start the private cluster (creating it the first time); same port and data on restart."""
        if not self.is_private or self._running:
            return self
        if self._dir is None:
            self._create()
        self._pg_ctl("start", "-l", str(self.log_path))
        self._running = True
        atexit.register(self.close)  # a test run that dies early still stops its servers
        return self

    def stop(self) -> None:
        """Stop the private server (fast shutdown: sessions are ended); its data stays. Idempotent."""
        self._require_private("stop")
        if self._running:
            self.resume()  # a frozen server cannot shut down
            self._pg_ctl("stop", "-m", "fast")
            self._running = False

    def pause(self) -> None:
        """Freeze the private server (SIGSTOP to every process): it accepts TCP but never answers."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze a server :meth:`pause` froze."""
        self._signal_all(signal.SIGCONT)

    def close(self) -> None:
        """Stop a private server and delete its directory. Idempotent."""
        atexit.unregister(self.close)
        if self._dir is None:
            return
        with contextlib.suppress(ConfigError, subprocess.SubprocessError):
            self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    @contextlib.contextmanager
    def temporary_schema(self) -> Iterator[str]:
        """A DSN whose ``search_path`` is a new, empty schema; the schema is dropped afterwards."""
        schema = f"kb_{uuid.uuid4().hex[:12]}"
        self._admin(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            separator = "&" if "?" in self.dsn else "?"
            yield f"{self.dsn}{separator}options=-csearch_path%3D{schema}"
        finally:
            self._admin(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if not self.is_private:
            return "PostgresServer(existing)"
        return f"PostgresServer(private, port={self.port or None}, running={self._running})"

    # -- private cluster plumbing -----------------------------------------------------------------

    @property
    def _data(self) -> Path:
        assert self._dir is not None  # noqa: S101 - set by _create before any use
        return self._dir / "data"

    def _create(self) -> None:
        self._bin = find_postgres_bin(install=self._install)
        self._dir = Path(tempfile.mkdtemp(prefix="kinesis-butler-pg-"))
        owner = _server_user()
        if owner is not None:
            os.chown(self._dir, owner.pw_uid, owner.pw_gid)
        initdb = [str(self._bin / "initdb"), "-D", str(self._data), "-A", "trust", "-U", "postgres"]
        self._as_server_user([*initdb, "-E", "UTF8", "--locale=C", "--no-sync"])
        self.port = free_port()
        settings = {**_SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self._dir}'"}
        with (self._data / "postgresql.conf").open("a") as conf:
            conf.write("".join(f"{name} = {value}\n" for name, value in settings.items()))

    def _pg_ctl(self, *args: str) -> None:
        assert self._bin is not None  # noqa: S101 - set by _create
        self._as_server_user(
            [str(self._bin / "pg_ctl"), "-D", str(self._data), "-w", "-t", "30", "-s", *args]
        )

    def _as_server_user(self, argv: list[str]) -> None:
        owner, command = _server_user(), argv
        if owner is not None and shutil.which("runuser"):
            command = ["runuser", "-u", owner.pw_name, "--", *argv]
        elif owner is not None:  # no util-linux runuser (busybox, some minimal images): su
            command = ["su", owner.pw_name, "-s", "/bin/sh", "-c", shlex.join(argv)]
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            command, cwd=self._dir, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
        if done.returncode != 0:
            log = (
                self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
            )
            tail = " | ".join((done.stderr + done.stdout + log).strip().splitlines()[-6:])
            raise ConfigError(f"{' '.join(argv[:2])} ... failed: {tail}")

    def _signal_all(self, signum: signal.Signals) -> None:
        self._require_private("freeze or unfreeze")
        if not self._running:
            return
        pid_file = self._data / "postmaster.pid"
        postmaster = int(pid_file.read_text().split()[0])
        for pid in [postmaster, *_children(postmaster)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _require_private(self, action: str) -> None:
        if not self.is_private:
            raise ConfigError(f"cannot {action} a PostgreSQL server this launcher did not start")

    def _admin(self, statement: sql.Composed) -> None:
        # lock_timeout: a teardown must not hang behind a session a crashed test left in a transaction.
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SET lock_timeout = '5s'")
            conn.execute(statement)


def _server_user() -> pwd.struct_passwd | None:
    """The OS user a private cluster runs as: ``postgres`` under root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError(
            "running as root, but there is no 'postgres' OS user to own a private PostgreSQL cluster "
            "(initdb refuses root); create one with `useradd --system postgres` or install the "
            "postgresql package"
        ) from None


def _children(parent: int) -> list[int]:
    """The PIDs whose parent is ``parent`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Fields after the parenthesised command name: state, ppid, ...
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found

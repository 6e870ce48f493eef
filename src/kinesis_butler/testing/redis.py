"""Redis servers for tests: the machine's shared one, or a private ``redis-server`` process.

* :meth:`RedisServer.shared` returns a URL: ``$KINESIS_BUTLER_REDIS_URL`` if set, else the
  machine's Redis at 127.0.0.1:6379 if it answers, else a private server started once per
  process. A shared server is never flushed or reconfigured: give every test its own key
  prefix or application name (``unique_prefix()``) so runs never collide.
* :meth:`RedisServer.private` starts a server on a free loopback port that a test may stop,
  kill, pause and start again (same port, same data directory) without touching anyone else.

Private servers run in the foreground (``--daemonize no``) in their own process group and are
stopped at interpreter exit. ``redis-server`` comes from the system (``apt-get install
redis-server``; ``$KINESIS_BUTLER_REDIS_SERVER`` names another binary); when it is missing and
we run as root with apt-get available, it is installed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kinesis_butler.errors import ConfigError
from kinesis_butler.testing.emulator import free_port

__all__ = ["RedisServer", "redis_server_binary", "unique_prefix"]

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 6379


def unique_prefix(label: str = "kbtest") -> str:
    """A key prefix no other run uses, for tests on a shared server."""
    return f"{label}-{uuid.uuid4().hex[:12]}"


def redis_server_binary() -> str:
    """The ``redis-server`` path, installing it with apt-get when root and possible.

    Raises:
        ConfigError: it is not installed and could not be installed.
    """
    named = os.environ.get("KINESIS_BUTLER_REDIS_SERVER")
    found = named or shutil.which("redis-server") or "/usr/bin/redis-server"
    if os.access(found, os.X_OK):
        return found
    apt = shutil.which("apt-get")
    if not named and apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = [apt, "install", "-y", "-q", "redis-server"]
        # Install; if the package lists are stale or missing, update them and try once more.
        for argv in (install, [apt, "update", "-q"], install):
            subprocess.run(argv, env=env, capture_output=True, check=False, timeout=600)  # noqa: S603
            if installed := shutil.which("redis-server"):
                return installed
    raise ConfigError(
        f"redis-server was not found ({found}): install it with `apt-get install redis-server` "
        "(or your system's package), or name the binary in $KINESIS_BUTLER_REDIS_SERVER"
    )


def _answers(host: str, port: int, password: str | None = None, timeout: float = 0.5) -> int | None:
    """The server's process id if a Redis at host:port answers, else None."""
    client = redis.Redis(
        host=host,
        port=port,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),  # one probe: the default retries take seconds on a closed port
    )
    try:
        return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None
    finally:
        client.close()


class RedisServer:
    """A private ``redis-server`` on a free loopback port.

    Example::

        with RedisServer.private() as server:
            store = RedisLeaseStore(server.url, "app")
            ...
            server.stop()   # an outage; server.start() brings it back on the same port

    Args:
        port: the port (a free one by default).
        password: set ``requirepass``; the URL then carries it.
        persistent: AOF on with ``appendfsync always`` in the server's data directory, so
            every acknowledged write survives :meth:`kill` and restart. Off by default: no RDB
            or AOF at all, so a restart empties the server.
        extra_args: more ``redis-server`` options, e.g. ``["--maxmemory", "10mb"]``.
    """

    _live: ClassVar[set[RedisServer]] = set()
    _shared_url: ClassVar[str | None] = None

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        persistent: bool = False,
        extra_args: list[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.persistent = persistent
        self.extra_args = list(extra_args or [])
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"kb-redis-{self.port}-"))
        self._process: subprocess.Popen[bytes] | None = None
        RedisServer._live.add(self)  # so the data directory goes at exit even if never started

    @classmethod
    def shared(cls) -> str:
        """A URL of a Redis every test in this process may share (see the module docstring)."""
        if url := os.environ.get("KINESIS_BUTLER_REDIS_URL"):
            return url
        if cls._shared_url is None:
            if _answers(SHARED_HOST, SHARED_PORT) is not None:
                cls._shared_url = f"redis://{SHARED_HOST}:{SHARED_PORT}/0"
            else:
                cls._shared_url = cls.private().url  # stopped at exit like every private server
        return cls._shared_url

    @classmethod
    def private(
        cls, *, password: str | None = None, persistent: bool = False, extra_args: list[str] | None = None
    ) -> RedisServer:
        """Start a private server and return it."""
        return cls(password=password, persistent=persistent, extra_args=extra_args).start()

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:<port>/0``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, timeout: float = 10.0) -> RedisServer:
        """Start the server (again, on the same port and data directory) and wait until it
        serves; an AOF is loaded first. No-op if running."""
        if self.running:
            return self
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--daemonize", "no", "--save", "", "--dir", str(self.data_dir), "--logfile", ""]
        argv += (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        )
        argv += ["--requirepass", self.password] if self.password else []
        with (self.data_dir / "redis.log").open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [*argv, *self.extra_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigError(
                    f"redis-server exited with code {self._process.returncode}: {self._log_tail()}"
                )
            # Our own pid answering: not another server that happens to hold the port.
            if _answers("127.0.0.1", self.port, self.password, timeout=0.2) == self._process.pid:
                return self
            time.sleep(0.02)
        self.stop()
        raise ConfigError(f"redis-server on port {self.port} did not serve within {timeout:g} s")

    def stop(self) -> None:
        """A clean shutdown (SIGTERM). Idempotent; the data directory stays for start()."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """A crash (SIGKILL): only what was fsynced survives. Idempotent."""
        self._signal_and_wait(signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections but never answers."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and delete its data directory."""
        self.kill()
        RedisServer._live.discard(self)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _signal_and_wait(self, signum: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def _log_tail(self) -> str:
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:])

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, persistent={self.persistent}, running={self.running})"

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for server in list(RedisServer._live):
        server.close()

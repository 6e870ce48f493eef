"""Plumbing the local-server launchers share: the cache folder, free ports, npm installs, and a
server child process in its own process group that is ready once it answers HTTP."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self, TypeVar

from kinesis_butler.errors import ConfigError

__all__ = ["LocalServer", "ServerProcess", "cache_dir", "free_port", "npm_install"]

_T = TypeVar("_T")


def cache_dir() -> Path:
    """Where downloaded tools live: ``$KINESIS_BUTLER_CACHE`` or ``~/.cache/kinesis-butler``."""
    root = os.environ.get("KINESIS_BUTLER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "kinesis-butler"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def npm_install(
    prefix: Path,
    package: str,
    version: str,
    *,
    find: Callable[[Path], _T | None],
    purpose: str,
    failure: str = "",
    timeout: float,
) -> _T:
    """Install npm ``package@version`` under ``prefix`` unless it is there already.

    ``find`` looks in the package's folder and returns what the caller needs from it (``None``
    while the package is missing or incomplete); its answer is returned.

    Raises:
        ConfigError: npm is missing (the message ends with ``purpose``), or the install failed
            (``failure`` follows the package name in the message).
    """
    folder = prefix / "node_modules" / package
    found = find(folder)
    if found is not None:
        return found
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError(f"npm was not found: install Node.js 18+ (with npm) {purpose}")
    prefix.mkdir(parents=True, exist_ok=True)
    # Two test sessions starting together must not run npm into one folder at once.
    with (prefix / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find(folder)
        if found is not None:
            return found
        argv = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund"]
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [*argv, f"{package}@{version}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    found = find(folder)
    if result.returncode != 0 or found is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise ConfigError(f"npm install {package} failed{failure}: " + " | ".join(tail))
    return found


class LocalServer:
    """A server on a loopback port, started on entering a ``with`` block and stopped on leaving."""

    port: int

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 60.0) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ServerProcess(LocalServer):
    """A server run as a child process in its own process group, its output in ``log_path``.

    Subclasses set ``_DISPLAY_NAME`` (for error messages) and ``_STOP_TIMEOUT``, and start the
    server with :meth:`_launch`; :meth:`stop` ends its whole process group.
    """

    _DISPLAY_NAME: ClassVar[str]
    _STOP_TIMEOUT: ClassVar[float] = 5.0

    log_path: Path
    _process: subprocess.Popen[bytes] | None = None

    def _launch(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Start ``argv`` and wait until the server answers HTTP on :attr:`endpoint_url`."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                argv,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group, so stop() reaches every child
            )
        self._wait_ready(self._process, timeout)

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                raise ConfigError(
                    f"{self._DISPLAY_NAME} exited with code {process.returncode}; see {self.log_path}"
                )
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=1)  # noqa: S310 - loopback URL we built
            except urllib.error.HTTPError:
                return  # any HTTP answer (404 or 400 to a bare GET) means it is serving
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
            else:
                return
        self.stop()
        raise ConfigError(f"{self._DISPLAY_NAME} did not answer within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        """Stop the server and its process group. Idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=self._STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=self._STOP_TIMEOUT)

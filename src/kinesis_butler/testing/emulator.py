"""Start and stop the local Kinesis emulator (npm ``kinesis-local``, kinesis-mock on Node).

Used by the tests, the demo and ``kinesis-butler local``. The package is installed with npm
into a cache folder the first time (``$KINESIS_BUTLER_CACHE`` or ``~/.cache/kinesis-butler``);
the server is started directly with ``node main.js`` because ``npx kinesis-local`` looks for
its certificate in the current directory. It listens on a free loopback port and is stopped
by PID (its whole process group) on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from kinesis_butler.errors import ConfigError

KINESIS_LOCAL_VERSION = "0.6.2"

__all__ = ["KINESIS_LOCAL_VERSION", "KinesisEmulator", "cache_dir", "free_port"]


def cache_dir() -> Path:
    """Where downloaded tools live: ``$KINESIS_BUTLER_CACHE`` or ``~/.cache/kinesis-butler``."""
    root = os.environ.get("KINESIS_BUTLER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "kinesis-butler"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _install(prefix: Path) -> Path:
    package = prefix / "node_modules" / "kinesis-local"
    if (package / "main.js").exists() and (package / "server.json").exists():
        return package
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError(
            "npm was not found: install Node.js 18+ (with npm) to run the local Kinesis emulator"
        )
    prefix.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [
            npm,
            "install",
            "--prefix",
            str(prefix),
            "--no-audit",
            "--no-fund",
            f"kinesis-local@{KINESIS_LOCAL_VERSION}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0 or not (package / "main.js").exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise ConfigError("npm install kinesis-local failed: " + " | ".join(tail))
    return package


class KinesisEmulator:
    """A kinesis-local server on a free loopback port.

    Example::

        with KinesisEmulator() as emu:
            client = KinesisClient(endpoint_url=emu.endpoint_url, region="us-east-1")

    Args:
        port: the plain-HTTP port; a free one by default.
        shard_limit: the emulator's per-account shard cap (its default is 50).
        log_path: where the emulator's output goes (default: a file in the cache folder).
        operation_delay_ms: how long stream create/delete/reshard operations take.
        extra_env: more kinesis-mock settings (e.g. ``SHOULD_PERSIST_DATA``).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        shard_limit: int = 1000,
        log_path: Path | None = None,
        operation_delay_ms: int = 100,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.tls_port = free_port()
        self.shard_limit = shard_limit
        self.operation_delay_ms = operation_delay_ms
        self.log_path = log_path or cache_dir() / "logs" / f"kinesis-local-{self.port}.log"
        self.extra_env = dict(extra_env or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 60.0) -> KinesisEmulator:
        """Install if needed, start, and wait until the server answers HTTP."""
        if self._process is not None:
            return self
        package = _install(cache_dir() / "npm")
        node = shutil.which("node")
        if node is None:
            raise ConfigError("node was not found: install Node.js 18+ to run the local Kinesis emulator")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        delay = f"{self.operation_delay_ms}ms"
        env = {
            **os.environ,
            "KINESIS_MOCK_CERT_PATH": str(package / "server.json"),
            "KINESIS_MOCK_PLAIN_PORT": str(self.port),
            "KINESIS_MOCK_TLS_PORT": str(self.tls_port),
            "SHARD_LIMIT": str(self.shard_limit),
            "LOG_LEVEL": "WARN",
            **{
                name: delay
                for name in (
                    "CREATE_STREAM_DURATION",
                    "DELETE_STREAM_DURATION",
                    "MERGE_SHARDS_DURATION",
                    "SPLIT_SHARD_DURATION",
                    "UPDATE_SHARD_COUNT_DURATION",
                    "REGISTER_STREAM_CONSUMER_DURATION",
                    "DEREGISTER_STREAM_CONSUMER_DURATION",
                )
            },
            **self.extra_env,
        }
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [node, str(package / "main.js")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group, so stop() reaches every child
            )
        self._wait_ready(self._process, timeout)
        return self

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ConfigError(
                    f"the Kinesis emulator exited with code {process.returncode}; see {self.log_path}"
                )
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=1)  # noqa: S310 - loopback URL we built
            except urllib.error.HTTPError:
                return  # any HTTP answer (it says 404 to GET /) means it is serving
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
            else:
                return
        self.stop()
        raise ConfigError(f"the Kinesis emulator did not answer within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        """Stop the server and its process group. Idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)

    def __enter__(self) -> KinesisEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""Start and stop the local Kinesis emulator (npm ``kinesis-local``, kinesis-mock on Node).

Used by the tests, the demo and ``kinesis-butler local``. The package is installed with npm
into a cache folder the first time (``$KINESIS_BUTLER_CACHE`` or ``~/.cache/kinesis-butler``);
the server is started directly with ``node main.js`` because ``npx kinesis-local`` looks for
its certificate in the current directory. It listens on a free loopback port and is stopped
by PID (its whole process group) on exit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Self

from kinesis_butler.errors import ConfigError
from kinesis_butler.testing._process import ServerProcess, cache_dir, free_port, npm_install

KINESIS_LOCAL_VERSION = "0.6.2"

__all__ = ["KINESIS_LOCAL_VERSION", "KinesisEmulator", "cache_dir", "free_port"]


def _find_package(package: Path) -> Path | None:
    return package if (package / "main.js").exists() and (package / "server.json").exists() else None


class KinesisEmulator(ServerProcess):
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

    _DISPLAY_NAME = "the Kinesis emulator"
    _STOP_TIMEOUT = 5.0

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
        self._process = None

    def start(self, *, timeout: float = 60.0) -> Self:
        """Install if needed, start, and wait until the server answers HTTP."""
        if self._process is not None:
            return self
        package = npm_install(
            cache_dir() / "npm",
            "kinesis-local",
            KINESIS_LOCAL_VERSION,
            find=_find_package,
            purpose="to run the local Kinesis emulator",
            timeout=600,
        )
        node = shutil.which("node")
        if node is None:
            raise ConfigError("node was not found: install Node.js 18+ to run the local Kinesis emulator")
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
        self._launch([node, str(package / "main.js")], timeout=timeout, env=env)
        return self

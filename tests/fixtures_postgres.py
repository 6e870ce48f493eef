"""Pytest fixtures for the postgres lease store (registered in tests/conftest.py).

``postgres_dsn`` is the machine's server at 127.0.0.1:5432 when it answers, else a private
cluster started for the session. Tests never write to it directly: ``postgres_schema_dsn`` gives
each test an empty schema of its own (dropped afterwards), so parallel and repeated runs never
collide. ``postgres_private`` is a cluster of the module's own, for tests that stop, restart or
freeze the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kinesis_butler.testing.postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The shared server (or a private stand-in when none answers at 127.0.0.1:5432)."""
    from kinesis_butler.testing.postgres import PostgresServer  # psycopg only when used

    with PostgresServer.shared() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A DSN to the shared server as a superuser; create your own schema or database on it."""
    return postgres_server.dsn


@pytest.fixture
def postgres_schema_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A DSN whose search_path is a fresh, empty schema, dropped after the test."""
    with postgres_server.temporary_schema() as dsn:
        yield dsn


@pytest.fixture(scope="module")
def postgres_private() -> Iterator[PostgresServer]:
    """A private cluster on a free port for this module: stop, restart and freeze it at will."""
    from kinesis_butler.testing.postgres import PostgresServer

    with PostgresServer.private() as server:
        yield server

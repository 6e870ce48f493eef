"""Pytest fixtures for the redis lease store (registered in tests/conftest.py).

``redis_url`` is shared by the whole session (the machine's Redis when it answers); tests on it
keep to their own ``redis_prefix``, whose keys are deleted afterwards (never FLUSHDB: other
people use that server). ``redis_private`` is a server of the test's own, for outages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from kinesis_butler.testing.redis import RedisServer, unique_prefix

PrivateFactory = Callable[..., RedisServer]


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis URL shared by every test of the session."""
    return RedisServer.shared()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own on the shared server; its keys are deleted afterwards."""
    prefix = unique_prefix()
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_private_factory() -> Iterator[PrivateFactory]:
    """Starts private servers (``RedisServer.private`` arguments); all closed after the test."""
    servers: list[RedisServer] = []

    def start(**options: object) -> RedisServer:
        server = RedisServer.private(**options)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def redis_private(redis_private_factory: PrivateFactory) -> RedisServer:
    """A private server (no persistence) this test may stop, kill, pause and restart."""
    return redis_private_factory()

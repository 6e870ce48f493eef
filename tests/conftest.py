"""Session fixtures shared by every test folder."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kinesis_butler.testing.emulator import KinesisEmulator

pytest_plugins = ["tests.fixtures_postgres", "tests.fixtures_redis", "tests.fixtures_dynamodb"]

# Dummy credentials for the local emulator; the real chain is never consulted in tests.
# Letters and digits only: DynamoDB Local 2+ rejects other access key ids.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testAccessKey")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testSecretKey")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_REGION", "us-east-1")


@pytest.fixture(scope="session")
def kinesis_endpoint() -> Iterator[str]:
    """A kinesis-local emulator on a free loopback port for the whole session."""
    with KinesisEmulator() as emulator:
        yield emulator.endpoint_url

"""Pytest fixtures for the dynamodb lease store (registered in tests/conftest.py).

Two servers per session, both on free loopback ports: moto (in this process) and DynamoDB Local
(Java). Tests get unique table names, so they never see each other's leases.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kinesis_butler.aws import AwsCredentials
from kinesis_butler.stores.dynamodb import DynamoDbLeaseStore
from kinesis_butler.testing.dynamodb import DynamoDbLocal, MotoDynamoDb

REGION = "us-east-1"
# DynamoDB Local 2+ refuses access key ids with anything but letters and digits.
CREDENTIALS = AwsCredentials("kinesisButlerTest", "test-secret-key")
DYNAMODB_SERVERS = ("moto", "local")


@pytest.fixture(scope="session")
def dynamodb_moto() -> Iterator[str]:
    """The endpoint URL of moto's DynamoDB, for the whole session."""
    with MotoDynamoDb() as server:
        yield server.endpoint_url


@pytest.fixture(scope="session")
def dynamodb_local() -> Iterator[str]:
    """The endpoint URL of DynamoDB Local (in memory), for the whole session."""
    with DynamoDbLocal() as server:
        yield server.endpoint_url


@pytest.fixture(params=DYNAMODB_SERVERS)
def dynamodb_endpoint(request: pytest.FixtureRequest) -> str:
    """Each DynamoDB server in turn: the test runs once against moto, once against DynamoDB Local."""
    endpoint: str = request.getfixturevalue(f"dynamodb_{request.param}")
    return endpoint


def unique_table_name(prefix: str = "kb") -> str:
    """A table name no other test uses (3-255 of ``[A-Za-z0-9_.-]``)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def dynamodb_table() -> str:
    """A table name unique to this test."""
    return unique_table_name()


def dynamodb_store(endpoint: str, table: str | None, app: str = "app", **options: Any) -> DynamoDbLeaseStore:
    """A store on a test server, with the test credentials and region."""
    return DynamoDbLeaseStore(
        table,
        app,
        region=REGION,
        endpoint_url=endpoint,
        credentials=CREDENTIALS,
        **options,
    )

"""The lease-store conformance suite against DynamoDbLeaseStore, on moto and on DynamoDB Local.

Each application gets its own table (as with the KCL); every test gets fresh table names.
DynamoDB-only behaviour (KCL item layout, schema checks, outages) is in
tests/integration/test_dynamodb_store.py.
"""

from __future__ import annotations

from typing import ClassVar

import pytest

from tests.fixtures_dynamodb import dynamodb_store, unique_table_name

pytest.register_assert_rewrite("kinesis_butler.testing.store_conformance")

from kinesis_butler.testing.store_conformance import LeaseStoreConformance, StoreFactory  # noqa: E402


class _DynamoDbConformance(LeaseStoreConformance):
    server: ClassVar[str]

    @pytest.fixture
    def store_factory(self, request: pytest.FixtureRequest) -> StoreFactory:
        endpoint: str = request.getfixturevalue(f"dynamodb_{self.server}")
        prefix = unique_table_name("kb-conf")
        return lambda app: dynamodb_store(endpoint, f"{prefix}-{app}", app)


class TestDynamoDbStoreOnMoto(_DynamoDbConformance):
    server = "moto"


class TestDynamoDbStoreOnDynamoDbLocal(_DynamoDbConformance):
    server = "local"

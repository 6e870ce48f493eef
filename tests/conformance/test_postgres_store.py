"""The lease-store conformance suite against PostgresLeaseStore (one fresh schema per test).

PostgreSQL-only behaviour (outages, schema checks, URLs, password masking) is tested in
tests/integration/test_postgres_store.py.
"""

from __future__ import annotations

import pytest

from kinesis_butler.stores.postgres import PostgresLeaseStore

pytest.register_assert_rewrite("kinesis_butler.testing.store_conformance")

from kinesis_butler.testing.store_conformance import LeaseStoreConformance, StoreFactory  # noqa: E402


class TestPostgresStore(LeaseStoreConformance):
    @pytest.fixture
    def store_factory(self, postgres_schema_dsn: str) -> StoreFactory:
        return lambda app: PostgresLeaseStore(postgres_schema_dsn, app)

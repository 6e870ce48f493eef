"""Several OS processes hammering one SQLite lease file keep every fencing guarantee.

The harness, :func:`kinesis_butler.testing.store_hammer.run_store_hammer`, starts worker
processes that each open their own store on the shared file, create the same leases, wait for a
common "go", then for a few hundred iterations read a random lease and write it from the counter
they read: take it if someone else holds it, else renew, checkpoint or evict it. They record
every attempt; the harness then checks the records against the final file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kinesis_butler.stores import SqliteLeaseStore

pytest.register_assert_rewrite("kinesis_butler.testing.store_hammer")

from kinesis_butler.testing.store_hammer import run_store_hammer  # noqa: E402


@pytest.mark.integration
def test_processes_sharing_one_file_never_lose_or_duplicate_a_write(tmp_path: Path) -> None:
    db = tmp_path / "shared" / "leases.db"
    run_store_hammer(SqliteLeaseStore, [str(db), "multiprocess-app"], workdir=tmp_path, deadline_seconds=20.0)

"""open_store: which URL gives which store, and how a bad URL or app name is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from kinesis_butler.errors import ConfigError
from kinesis_butler.stores import (
    LeaseStore,
    MemoryLeaseStore,
    SqliteLeaseStore,
    open_store,
    redact_url,
    validate_app_name,
)


def test_memory_url_gives_a_fresh_memory_store_each_time() -> None:
    first, second = open_store("memory://", "app"), open_store("MEMORY://", "app")
    assert isinstance(first, MemoryLeaseStore)
    assert isinstance(first, LeaseStore)
    assert isinstance(second, MemoryLeaseStore)
    assert first.backing is not second.backing
    assert first.app == "app"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///leases.db", "leases.db"),
        ("sqlite:///data/leases.db", "data/leases.db"),
        ("sqlite:////var/lib/app/leases.db", "/var/lib/app/leases.db"),
        ("SQLite:////srv/x.db", "/srv/x.db"),
    ],
)
def test_sqlite_url_takes_the_path_after_three_slashes(url: str, path: str) -> None:
    store = open_store(url, "my-app")
    assert isinstance(store, SqliteLeaseStore)
    assert isinstance(store, LeaseStore)
    assert (store.path, store.app) == (path, "my-app")


async def test_relative_sqlite_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///state/leases.db", "app")
    await store.initialize()
    await store.aclose()
    assert (tmp_path / "state" / "leases.db").is_file()


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("postgresql://u:pw@db:5432/leases", "PostgresLeaseStore"),
        ("postgres://db/leases", "PostgresLeaseStore"),
        ("redis://:pw@cache:6379/0", "RedisLeaseStore"),
        ("rediss://cache:6380/1", "RedisLeaseStore"),
        ("dynamodb://leases?region=eu-west-1", "DynamoDbLeaseStore"),
    ],
)
async def test_each_scheme_opens_its_backend_without_connecting(url: str, kind: str) -> None:
    store = open_store(url, "app")
    assert type(store).__name__ == kind
    assert "pw" not in repr(store)
    await store.aclose()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mysql://db/leases", "unknown scheme 'mysql'"),
        ("leases.db", r"no scheme \(did you mean sqlite:///leases.db\?\)"),
        ("", "no scheme"),
        ("://x", "no scheme"),
        ("sqlite://leases.db", "three slashes"),
        ("sqlite:///", "names no file"),
        ("sqlite:///data/", "names a directory"),
        ("sqlite:///x.db?mode=ro", "options"),
        ("memory://somewhere", "takes no host or path"),
    ],
)
def test_malformed_urls_are_one_clear_line(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        open_store(url, "app")
    message = str(caught.value)
    assert "\n" not in message
    assert repr(url) in message
    assert "supported: memory://, sqlite:///path/to/leases.db" in message


@pytest.mark.parametrize(
    "url",
    [
        "mysql://butler:s3cret@db.internal/leases",
        "sqlite://butler:s3cret@db.internal/leases",
        "memory://butler:s3/cr@t@db.internal/leases",
        "unknown://db.internal/leases?user=butler&password=s3cret",
        "butler:s3cret@db.internal",
    ],
)
def test_errors_never_echo_a_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_store(url, "app")
    message = str(caught.value)
    assert "s3" not in message
    assert "***" in message


def test_redact_url_keeps_user_and_host() -> None:
    assert redact_url("postgresql://butler:s3cret@db:5432/x") == "postgresql://butler:***@db:5432/x"
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"
    assert redact_url("sqlite:////srv/x.db") == "sqlite:////srv/x.db"
    assert redact_url("x://h/db?sslmode=require&password=pw") == "x://h/db?sslmode=require&password=***"


@pytest.mark.parametrize("app", ["", " ", "my app", "app/x", "a:b", "-leading-dash", "x" * 256, "naïve"])
def test_bad_app_names_are_refused_by_name(app: str) -> None:
    with pytest.raises(ConfigError, match="invalid application name"):
        open_store("memory://", app)


@pytest.mark.parametrize("app", ["a", "my-app", "Orders_v2.prod", "0", "x" * 255])
def test_good_app_names_are_accepted(app: str) -> None:
    assert validate_app_name(app) == app

"""Lease stores: the Protocol, its backends, and :func:`open_store` to pick one by URL.

Store URLs:

========================================  ==================================================
``memory://``                             a fresh in-process store (tests, demos)
``sqlite:///leases.db``                   a SQLite file relative to the current directory
``sqlite:////var/lib/app/leases.db``      an absolute path: four slashes, as in SQLAlchemy
``postgresql://user:pw@host:5432/db``     PostgreSQL (``pip install kinesis-butler[postgres]``)
``redis://[:pw@]host:6379/0``             Redis (``pip install kinesis-butler[redis]``)
``dynamodb://TABLE?region=..``            DynamoDB, the Java KCL's lease table layout
========================================  ==================================================

Backends with optional dependencies are imported only when their URL is used.
"""

from __future__ import annotations

import re
from typing import Final

from kinesis_butler.errors import ConfigError
from kinesis_butler.stores.base import LeaseStore
from kinesis_butler.stores.memory import MemoryBacking, MemoryLeaseStore
from kinesis_butler.stores.sqlite import SqliteLeaseStore

__all__ = [
    "LeaseStore",
    "MemoryBacking",
    "MemoryLeaseStore",
    "SqliteLeaseStore",
    "open_store",
    "redact_url",
    "validate_app_name",
]

_SUPPORTED: Final = (
    "memory://, sqlite:///path/to/leases.db, postgresql://host/db, redis://host:6379/0, dynamodb://TABLE"
)
# Up to 255 characters, DynamoDB's table-name limit, so a name that works here works with
# every backend; no ':' or '/' so names embed safely in keys, paths and table names.
_APP_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SECRET_PARAM: Final = re.compile(r"(?i)\b(password|passwd|pwd|secret|token)=[^&#]*")


def open_store(url: str, app: str) -> LeaseStore:
    """Make the lease store a URL names, for application ``app``.

    The store is returned uninitialized and unconnected: call ``await store.initialize()``
    before use and ``await store.aclose()`` at the end.

    ``sqlite://`` URLs follow SQLAlchemy: three slashes, then the path, so ``sqlite:///x.db``
    is ``x.db`` relative to the current directory and ``sqlite:////srv/x.db`` is the absolute
    ``/srv/x.db``. The directory is created on first use. The path is used as written (no
    percent-decoding, no ``~`` expansion); query options are not supported.

    Args:
        url: ``memory://`` or ``sqlite:///path``; see the module docstring.
        app: the application name: 1-255 letters, digits, ``.``, ``_`` or ``-``, starting with
            a letter or digit.

    Returns:
        A store bound to ``app``.

    Raises:
        ConfigError: a malformed URL, an unknown or not-yet-available scheme, or a bad app
            name. The message names the URL with any password masked.
    """
    validate_app_name(app)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or not scheme:
        hint = f" (did you mean sqlite:///{url}?)" if url.endswith((".db", ".sqlite", ".sqlite3")) else ""
        raise _bad_url(url, f"no scheme{hint}")
    if scheme == "memory":
        if rest:
            raise _bad_url(url, "memory:// takes no host or path")
        return MemoryLeaseStore(app)
    if scheme == "sqlite":
        return SqliteLeaseStore(_sqlite_path(url, rest), app)
    base = scheme.partition("+")[0]
    try:
        if base in ("postgresql", "postgres"):
            from kinesis_butler.stores.postgres import PostgresLeaseStore  # noqa: PLC0415 - optional dependency

            return PostgresLeaseStore.from_url(url, app)
        if base in ("redis", "rediss"):
            from kinesis_butler.stores.redis import RedisLeaseStore  # noqa: PLC0415 - optional dependency

            return RedisLeaseStore.from_url(url, app)
        if base == "dynamodb":
            from kinesis_butler.stores.dynamodb import DynamoDbLeaseStore  # noqa: PLC0415

            return DynamoDbLeaseStore.from_url(url, app)
    except ImportError as exc:
        extra = "postgres" if base.startswith("postgres") else "redis"
        raise ConfigError(
            f"lease store URL {redact_url(url)!r} needs a driver that is not installed ({exc.name}): "
            f"pip install 'kinesis-butler[{extra}]'"
        ) from None
    raise _bad_url(url, f"unknown scheme {scheme!r}")


def validate_app_name(app: str) -> str:
    """Return ``app`` if it is a valid application name, else raise ConfigError."""
    if not isinstance(app, str) or not _APP_NAME.fullmatch(app):
        raise ConfigError(
            f"invalid application name {app!r}: use 1-255 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return app


def redact_url(url: str) -> str:
    """``url`` with its password (``user:pass@`` and ``password=`` options) replaced by ``***``.

    Errs on the side of masking: everything between the first ``:`` of the user info and the
    *last* ``@`` is hidden, so a password containing ``@`` or ``/`` does not leak.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at != -1:
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    url = f"{scheme}{sep}{rest}"
    return _SECRET_PARAM.sub(r"\1=***", url)


def _sqlite_path(url: str, rest: str) -> str:
    if not rest.startswith("/"):
        raise _bad_url(
            url, "a SQLite URL has three slashes then the path: sqlite:///relative.db, sqlite:////abs.db"
        )
    path = rest[1:]
    if not path:
        raise _bad_url(url, "the SQLite URL names no file")
    if "?" in path or "#" in path:
        raise _bad_url(url, "SQLite URL options ('?...') are not supported")
    if path.endswith("/"):
        raise _bad_url(url, "the SQLite URL names a directory, not a file")
    return path


def _bad_url(url: str, reason: str) -> ConfigError:
    return ConfigError(f"invalid lease store URL {redact_url(url)!r}: {reason}; supported: {_SUPPORTED}")

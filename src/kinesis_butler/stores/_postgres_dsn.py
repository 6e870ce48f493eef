"""The PostgreSQL lease store's connection settings: store URLs, DSNs, and keeping passwords out.

A password may sit in a URL's user info or in a ``password=`` option, and libpq echoes pieces of
a malformed DSN in its errors; every spelling of it found in the DSN is masked in every message.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qsl, quote, urlencode

from kinesis_butler.errors import ConfigError

with contextlib.suppress(ImportError):  # the optional 'postgres' extra; the store checks for it
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

_SCHEMES: Final = ("postgresql", "postgres", "postgresql+psycopg")
_URL_OPTIONS: Final[dict[str, Callable[[str], object]]] = {
    "table": str, "connect_timeout": float, "statement_timeout": float, "max_connections": int
}  # fmt: skip
_PASSWORD_OPTION: Final = re.compile(r"(?i)password\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]*)")


class Dsn(NamedTuple):
    """What the store keeps of a DSN besides the DSN itself."""

    server: str
    """``host:port/database``, for messages."""
    user: str
    """The user name; empty when the DSN names none."""
    secrets: set[str]
    """Every spelling of the password, to mask in messages."""


def url_to_dsn(url: str) -> tuple[str, dict[str, Any]]:
    """The libpq DSN a store URL names, and the store options (``table`` ...) it sets.

    Raises:
        ConfigError: a malformed URL or option; the message masks the password.
    """
    scheme, sep, rest = url.partition("://")
    base, _, query = rest.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    try:
        if not sep or scheme.lower() not in _SCHEMES or "#" in rest:
            raise ValueError("expected postgresql://user:password@host:port/database?table=name")  # noqa: TRY301
        options: dict[str, Any] = {
            key: _URL_OPTIONS[key](value) for key, value in pairs if key in _URL_OPTIONS
        }
    except ValueError as exc:
        raise ConfigError(
            f"invalid PostgreSQL lease store URL {scrub(url, secrets_in(url))!r}: {exc}"
        ) from None
    # quote, not quote_plus: libpq decodes %20 but reads '+' literally.
    libpq = urlencode([(k, v) for k, v in pairs if k not in _URL_OPTIONS], quote_via=quote)
    return f"postgresql://{base}" + (f"?{libpq}" if libpq else ""), options


def parse_dsn(dsn: str) -> Dsn:
    """Check a libpq connection string or URL (psycopg must be installed).

    Raises:
        ConfigError: libpq cannot parse it, or its host, port or database is malformed; the
            message masks the password.
    """
    found = secrets_in(dsn)
    try:
        params, problem = conninfo_to_dict(dsn), ""
    except psycopg.Error as exc:
        params, problem = {}, flat(exc)
    if problem:  # raised outside the except clause: the libpq error must not ride along as context
        # libpq quotes the token it choked on; one with an '@' may hold part of a password.
        detail = re.sub(r'"[^"]*@[^"]*"', '"***"', scrub(problem, found))
        raise ConfigError(f"invalid PostgreSQL DSN {scrub(dsn, found)!r}: {detail}")
    found |= {str(params["password"])} if params.get("password") else set()
    host, port = (
        params.get("host") or params.get("hostaddr") or "localhost",
        str(params.get("port") or 5432),
    )
    database = params.get("dbname") or params.get("user") or "postgres"
    # libpq reads a URL password holding an unencoded '/' or '@' as host, port or database: its
    # pieces would show in every message. Refuse, without echoing them.
    if "@" in f"{host}{database}" or not all(part.isdigit() for part in port.split(",")):
        raise ConfigError(
            f"invalid PostgreSQL DSN {scrub(dsn, found)!r}: its host, port or database is malformed "
            "(a port is a number; percent-encode '@', '/', '?' and '#' in the user name and password)"
        )
    return Dsn(f"{host}:{port}/{database}", str(params.get("user") or ""), found)


def flat(exc: BaseException) -> str:
    """An exception's message on one line (its type when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def secrets_in(dsn: str) -> set[str]:
    """Every spelling of the password in ``dsn``: URL user info (up to the last '@'), password=."""
    found = {m.group(1).strip("'") for m in _PASSWORD_OPTION.finditer(dsn)}
    _, sep, rest = dsn.partition("://")
    if sep and "@" in rest:
        found.add(rest[: rest.rfind("@")].partition(":")[2])
    return {secret for secret in found if secret}


def scrub(text: str, secrets: set[str]) -> str:
    """``text`` with every one of ``secrets`` replaced by ``***``, the longest first."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text

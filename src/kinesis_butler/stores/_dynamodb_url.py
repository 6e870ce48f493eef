"""The DynamoDB lease store's URL: ``dynamodb://TABLE?region=R&endpoint_url=URL&profile=P``.

Credentials never go in the URL; they come from the store's ``credentials`` or botocore's chain.
A malformed URL is refused without echoing the values of its options.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from kinesis_butler.errors import ConfigError

_URL_FORM: Final = "dynamodb://[TABLE][?region=...&endpoint_url=...&profile=...&create_table=false]"
_URL_OPTIONS: Final = frozenset({"region", "endpoint_url", "profile", "create_table"})
_BOOLEANS: Final = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_url(url: str) -> tuple[str | None, dict[str, Any]]:
    """The table a store URL names (None: the application's name) and the store options it sets.

    Raises:
        ConfigError: a malformed URL or an unknown option (its value is never echoed).
    """
    parts = urlsplit(url)
    shown = f"dynamodb://{parts.netloc.rpartition('@')[2]}"

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"invalid lease store URL {shown!r}: {reason}; expected {_URL_FORM}")

    if parts.scheme.lower() != "dynamodb":
        raise bad("the scheme is not dynamodb://")
    if "@" in parts.netloc:
        raise bad("credentials do not belong in the URL: use the AWS chain (env, profile, role)")
    if parts.path not in ("", "/") or parts.fragment:
        raise bad("the table is the host part; no path or fragment")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _URL_OPTIONS:
            raise bad(f"unknown option {name!r} (supported: {', '.join(sorted(_URL_OPTIONS))})")
        if name in options:
            raise bad(f"option {name!r} is given twice")
        options[name] = value
    create = _BOOLEANS.get(options.get("create_table", "true").lower())
    if create is None:
        raise bad("create_table must be true or false")
    return parts.netloc or None, {
        "region": options.get("region") or None,
        "endpoint_url": options.get("endpoint_url") or None,
        "profile": options.get("profile") or None,
        "create_table": create,
    }

"""AWS Signature Version 4 for JSON-protocol POST requests, with a cached signing key.

botocore's ``SigV4Auth`` re-derives the signing key (four HMACs) and rebuilds the canonical
request through generic header maps on every call: about 66 µs. The requests this library sends
are all alike (``POST /``, no query string, the same five headers), so the canonical request is a
format string and the key is derived once per (day, region, service, secret). The output is
byte-identical to botocore's; ``tests/unit/test_signer.py`` checks that over generated requests.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Final
from urllib.parse import quote, urlsplit

from kinesis_butler.aws.credentials import AwsCredentials

__all__ = ["SigV4Signer", "canonical_host", "canonical_path", "derive_signing_key"]

_ALGORITHM: Final = "AWS4-HMAC-SHA256"
_HEADERS_PLAIN: Final = "content-type;host;x-amz-date;x-amz-target"
_HEADERS_SESSION: Final = "content-type;host;x-amz-date;x-amz-security-token;x-amz-target"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def derive_signing_key(secret_access_key: str, datestamp: str, region: str, service: str) -> bytes:
    """Derive the SigV4 signing key: four chained HMAC-SHA256 steps.

    Args:
        secret_access_key: the secret key.
        datestamp: the UTC day, ``YYYYMMDD``.
        region: the region name, e.g. ``us-east-1``.
        service: the signing name, e.g. ``kinesis``.

    Returns:
        The 32-byte key that signs every request of that day, region and service.
    """
    k_date = hmac.digest(f"AWS4{secret_access_key}".encode(), datestamp.encode(), "sha256")
    k_region = hmac.digest(k_date, region.encode(), "sha256")
    k_service = hmac.digest(k_region, service.encode(), "sha256")
    return hmac.digest(k_service, b"aws4_request", "sha256")


def canonical_host(endpoint_url: str) -> str:
    """The ``Host`` value botocore signs for an endpoint: lowercase, default port dropped.

    Args:
        endpoint_url: e.g. ``https://kinesis.us-east-1.amazonaws.com`` or ``http://127.0.0.1:4567``.

    Returns:
        ``kinesis.us-east-1.amazonaws.com`` or ``127.0.0.1:4567``; IPv6 hosts keep their brackets.
    """
    parts = urlsplit(endpoint_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def canonical_path(endpoint_url: str) -> str:
    """The canonical URI path of an endpoint, as botocore normalizes it (``/`` when empty).

    Args:
        endpoint_url: the endpoint; its path is usually empty.

    Returns:
        The path with dot segments removed and URI-encoded except ``/`` and ``~``.
    """
    path = urlsplit(endpoint_url).path
    if not path:
        return "/"
    # RFC 3986 section 5.2.4, plus collapsing repeated slashes, exactly as botocore does.
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    first = "/" if path.startswith("/") else ""
    last = "/" if path.endswith("/") and segments else ""
    normalized = first + "/".join(segments) + last
    return quote(normalized, safe="/~")


class SigV4Signer:
    """Signs AWS JSON POST requests for one service and region.

    The signing key is cached: it is derived on the first request of a UTC day and reused
    until the day, the secret key or the access key changes. Not thread-safe by design; one
    signer belongs to one transport on one event loop.

    Example:
        >>> signer = SigV4Signer("kinesis", "us-east-1")
        >>> headers = signer.sign(creds, host="kinesis.us-east-1.amazonaws.com",
        ...                       target="Kinesis_20131202.ListShards", body=b"{}")
    """

    __slots__ = (
        "_cached_access",
        "_cached_datestamp",
        "_cached_key",
        "_cached_secret",
        "_clock",
        "_last_amz_date",
        "_last_second",
        "_scope_suffix",
        "region",
        "service",
    )

    def __init__(self, service: str, region: str, *, clock: Callable[[], float] = time.time) -> None:
        """Create a signer.

        Args:
            service: the signing name (``kinesis``, ``dynamodb``).
            region: the region (``us-east-1``).
            clock: returns the current time as epoch seconds; injectable for tests.
        """
        self.service = service
        self.region = region
        self._clock = clock
        self._scope_suffix = f"/{region}/{service}/aws4_request"
        self._cached_datestamp = ""
        self._cached_secret = ""
        self._cached_access = ""
        self._cached_key = b""
        self._last_second = -1
        self._last_amz_date = ""

    def __repr__(self) -> str:
        return f"SigV4Signer(service={self.service!r}, region={self.region!r})"

    def _amz_date(self, now: float) -> str:
        second = int(now)
        if second != self._last_second:
            # botocore truncates to the second too; formatting costs more than everything else,
            # so it is done once per second.
            self._last_amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
            self._last_second = second
        return self._last_amz_date

    def _signing_key(self, credentials: AwsCredentials, datestamp: str) -> bytes:
        secret = credentials.secret_access_key
        if (
            datestamp != self._cached_datestamp
            or secret != self._cached_secret
            or credentials.access_key_id != self._cached_access
        ):
            self._cached_key = derive_signing_key(secret, datestamp, self.region, self.service)
            self._cached_datestamp = datestamp
            self._cached_secret = secret
            self._cached_access = credentials.access_key_id
        return self._cached_key

    def sign(
        self,
        credentials: AwsCredentials,
        *,
        host: str,
        target: str,
        body: bytes,
        content_type: str = "application/x-amz-json-1.1",
        path: str = "/",
        now: float | None = None,
    ) -> dict[str, str]:
        """Sign one request and return every header it must be sent with.

        Args:
            credentials: the credentials to sign with.
            host: the ``Host`` header value (see :func:`canonical_host`).
            target: the ``X-Amz-Target`` value, e.g. ``Kinesis_20131202.GetRecords``.
            body: the exact request body bytes.
            content_type: ``application/x-amz-json-1.1`` (Kinesis) or ``-1.0`` (DynamoDB).
            path: the canonical path (see :func:`canonical_path`).
            now: epoch seconds to sign at; defaults to the signer's clock.

        Returns:
            Headers ``Host``, ``Content-Type``, ``X-Amz-Target``, ``X-Amz-Date``,
            ``X-Amz-Security-Token`` (with a session token) and ``Authorization``.
        """
        amz_date = self._amz_date(self._clock() if now is None else now)
        datestamp = amz_date[:8]
        token = credentials.session_token
        # Header values are trimmed like botocore's Trimall; ours never hold inner whitespace.
        if token:
            signed_headers = _HEADERS_SESSION
            canonical_headers = (
                f"content-type:{content_type}\nhost:{host}\nx-amz-date:{amz_date}\n"
                f"x-amz-security-token:{' '.join(token.split())}\nx-amz-target:{target}\n"
            )
        else:
            signed_headers = _HEADERS_PLAIN
            canonical_headers = (
                f"content-type:{content_type}\nhost:{host}\nx-amz-date:{amz_date}\nx-amz-target:{target}\n"
            )
        canonical_request = (
            f"POST\n{path}\n\n{canonical_headers}\n{signed_headers}\n{hashlib.sha256(body).hexdigest()}"
        )
        scope = datestamp + self._scope_suffix
        string_to_sign = (
            f"{_ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(canonical_request.encode()).hexdigest()}"
        )
        signature = hmac.new(
            self._signing_key(credentials, datestamp), string_to_sign.encode(), hashlib.sha256
        ).hexdigest()
        headers = {
            "Host": host,
            "Content-Type": content_type,
            "X-Amz-Target": target,
            "X-Amz-Date": amz_date,
            "Authorization": (
                f"{_ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
                f"SignedHeaders={signed_headers}, Signature={signature}"
            ),
        }
        if token:
            headers["X-Amz-Security-Token"] = token
        return headers

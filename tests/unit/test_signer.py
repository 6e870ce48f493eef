"""The SigV4 signer produces byte-identical headers to botocore's SigV4Auth, with a cached key."""

from __future__ import annotations

import datetime as dt
from unittest import mock

import botocore.session
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kinesis_butler.aws import signer as signer_module
from kinesis_butler.aws.credentials import AwsCredentials
from kinesis_butler.aws.signer import SigV4Signer, canonical_host, canonical_path

KINESIS_JSON = "application/x-amz-json-1.1"
DYNAMODB_JSON = "application/x-amz-json-1.0"


def botocore_sign(
    *,
    url: str,
    service: str,
    region: str,
    target: str,
    body: bytes,
    content_type: str,
    credentials: AwsCredentials,
    now: float,
) -> dict[str, str]:
    """Sign like a botocore client does and return the headers that SigV4 set."""
    request = AWSRequest(
        method="POST", url=url, data=body, headers={"Content-Type": content_type, "X-Amz-Target": target}
    )
    moment = dt.datetime.fromtimestamp(int(now), tz=dt.UTC).replace(tzinfo=None)
    moment += dt.timedelta(microseconds=round((now - int(now)) * 1e6) % 1_000_000)
    boto_creds = Credentials(
        credentials.access_key_id, credentials.secret_access_key, credentials.session_token
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=moment):
        SigV4Auth(boto_creds, service, region).add_auth(request)
    return {name: value for name, value in request.headers.items() if isinstance(value, str)}


def our_sign(
    *,
    url: str,
    service: str,
    region: str,
    target: str,
    body: bytes,
    content_type: str,
    credentials: AwsCredentials,
    now: float,
) -> dict[str, str]:
    return SigV4Signer(service, region).sign(
        credentials,
        host=canonical_host(url),
        target=target,
        body=body,
        content_type=content_type,
        path=canonical_path(url),
        now=now,
    )


ENDPOINTS = [
    "https://kinesis.us-east-1.amazonaws.com",
    "https://dynamodb.eu-west-1.amazonaws.com/",
    "http://127.0.0.1:4567",
    "http://127.0.0.1:45678/",
    "http://localhost:80",  # default port: dropped from Host
    "https://example.com:443",  # default port: dropped from Host
    "https://example.com:8443",
    "http://LOCALHOST:4566",  # Host is lowercased
    "http://[::1]:4567",
    "http://127.0.0.1:4566/prefix",
    "http://127.0.0.1:4566/a/./b/../c/",
    "http://127.0.0.1:4566//double//slash",
    "http://127.0.0.1:4566/with space~tilde",
]

regions = st.one_of(
    st.sampled_from(["us-east-1", "eu-west-1", "ap-southeast-2", "us-gov-west-1", "cn-north-1"]),
    st.from_regex(r"[a-z]{2}-[a-z]{4,9}-[1-9]", fullmatch=True),
)
targets = st.one_of(
    st.sampled_from(
        [
            "Kinesis_20131202.GetRecords",
            "Kinesis_20131202.ListShards",
            "Kinesis_20131202.PutRecords",
            "DynamoDB_20120810.UpdateItem",
            "DynamoDB_20120810.Query",
        ]
    ),
    st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,24}\.[A-Z][A-Za-z]{0,24}", fullmatch=True),
)
bodies = st.one_of(
    st.just(b""),
    st.just(b"{}"),
    st.binary(max_size=512),
    st.text(max_size=256).map(str.encode),  # unicode, including astral characters
    st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=5).map(
        lambda d: str(d).encode("utf-8")
    ),
)
access_keys = st.from_regex(r"(AKIA|ASIA)[A-Z0-9]{12,16}", fullmatch=True)
secrets = st.one_of(
    st.from_regex(r"[A-Za-z0-9/+]{40}", fullmatch=True),
    st.text(min_size=1, max_size=60),  # any unicode: both sides UTF-8 encode "AWS4" + secret
)
tokens = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9/+=]{16,600}", fullmatch=True))
credentials_st = st.builds(AwsCredentials, access_keys, secrets, tokens)
# From 1970 to 2100, with sub-second parts (botocore truncates to the second, so must we).
timestamps = st.one_of(
    st.integers(min_value=0, max_value=4_102_444_800).map(float),
    st.builds(
        lambda s, us: s + us / 1e6,
        st.integers(min_value=0, max_value=4_102_444_800),
        st.integers(min_value=0, max_value=999_999),
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    url=st.sampled_from(ENDPOINTS),
    service=st.sampled_from(["kinesis", "dynamodb"]),
    region=regions,
    target=targets,
    body=bodies,
    content_type=st.sampled_from([KINESIS_JSON, DYNAMODB_JSON]),
    credentials=credentials_st,
    now=timestamps,
)
def test_headers_match_botocore_byte_for_byte(
    *,
    url: str,
    service: str,
    region: str,
    target: str,
    body: bytes,
    content_type: str,
    credentials: AwsCredentials,
    now: float,
) -> None:
    kwargs = dict(
        url=url,
        service=service,
        region=region,
        target=target,
        body=body,
        content_type=content_type,
        credentials=credentials,
        now=now,
    )
    theirs = botocore_sign(**kwargs)  # type: ignore[arg-type]
    ours = our_sign(**kwargs)  # type: ignore[arg-type]

    assert ours["Authorization"] == theirs["Authorization"]
    assert ours["X-Amz-Date"] == theirs["X-Amz-Date"]
    assert ours.get("X-Amz-Security-Token") == theirs.get("X-Amz-Security-Token")
    assert ours["Content-Type"] == content_type
    assert ours["X-Amz-Target"] == target


@settings(max_examples=50, deadline=None)
@given(
    host=st.one_of(
        st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True),
        st.ip_addresses(v=4).map(str),
    ),
    port=st.one_of(st.none(), st.integers(min_value=1, max_value=65535)),
    scheme=st.sampled_from(["http", "https"]),
)
def test_generated_hosts_and_ports_match_botocore(host: str, port: int | None, scheme: str) -> None:
    url = f"{scheme}://{host}" + ("" if port is None else f":{port}")
    creds = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    kwargs = dict(
        url=url,
        service="kinesis",
        region="us-east-1",
        target="Kinesis_20131202.GetRecords",
        body=b'{"ShardIterator":"abc"}',
        content_type=KINESIS_JSON,
        credentials=creds,
        now=1_795_000_000.25,
    )
    assert our_sign(**kwargs)["Authorization"] == botocore_sign(**kwargs)["Authorization"]  # type: ignore[arg-type]


def test_signed_headers_are_the_ones_a_botocore_client_signs() -> None:
    """A real botocore Kinesis client signs exactly the header set we sign, and the same signature."""
    session = botocore.session.get_session()
    client = session.create_client(
        "kinesis",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:4567",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret/with+chars",
        aws_session_token="token-value",
    )
    captured: dict[str, object] = {}

    class Captured(Exception):
        pass

    def capture(request: AWSRequest, **_: object) -> None:
        captured["headers"] = {
            k: (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()
        }
        captured["body"] = request.body
        raise Captured

    client.meta.events.register("before-send", capture)
    moment = dt.datetime(2026, 11, 23, 10, 0, 5)
    with mock.patch("botocore.auth.get_current_datetime", return_value=moment), pytest.raises(Captured):
        client.list_shards(StreamName="orders", MaxResults=5)
    client.close()

    headers = captured["headers"]
    assert isinstance(headers, dict)
    body = captured["body"]
    assert isinstance(body, bytes)
    ours = SigV4Signer("kinesis", "us-east-1").sign(
        AwsCredentials("AKIDEXAMPLE", "secret/with+chars", "token-value"),
        host="127.0.0.1:4567",
        target=headers["X-Amz-Target"],
        body=body,
        now=moment.replace(tzinfo=dt.UTC).timestamp(),
    )
    assert (
        "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target,"
        in ours["Authorization"]
    )
    assert ours["Authorization"] == headers["Authorization"]
    assert ours["X-Amz-Date"] == headers["X-Amz-Date"]
    assert ours["X-Amz-Security-Token"] == headers["X-Amz-Security-Token"]


def test_without_session_token_the_token_header_is_neither_sent_nor_signed() -> None:
    headers = SigV4Signer("kinesis", "us-east-1").sign(
        AwsCredentials("AKID", "secret"), host="h", target="Kinesis_20131202.ListShards", body=b"{}", now=0.0
    )
    assert "X-Amz-Security-Token" not in headers
    assert "SignedHeaders=content-type;host;x-amz-date;x-amz-target," in headers["Authorization"]


@pytest.fixture
def derivations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Counts signing-key derivations (datestamp, secret) made by any signer."""
    calls: list[tuple[str, str]] = []
    real = signer_module.derive_signing_key

    def counting(secret: str, datestamp: str, region: str, service: str) -> bytes:
        calls.append((datestamp, secret))
        return real(secret, datestamp, region, service)

    monkeypatch.setattr(signer_module, "derive_signing_key", counting)
    return calls


def test_signing_key_is_derived_once_per_day_and_secret(derivations: list[tuple[str, str]]) -> None:
    clock_now = [1_795_000_000.0]  # 2026-11-18
    signer = SigV4Signer("kinesis", "us-east-1", clock=lambda: clock_now[0])
    creds = AwsCredentials("AKID", "secret-1")
    first_day = []
    for i in range(500):
        clock_now[0] += 1.7
        first_day.append(
            signer.sign(creds, host="h", target="Kinesis_20131202.GetRecords", body=str(i).encode())
        )
    assert len({h["Authorization"] for h in first_day}) == 500  # every request signed differently
    assert derivations == [("20261118", "secret-1")]

    clock_now[0] += 86_400  # the next UTC day needs a new key
    signer.sign(creds, host="h", target="Kinesis_20131202.GetRecords", body=b"{}")
    assert len(derivations) == 2

    rotated = AwsCredentials("AKID", "secret-2", "token")  # rotated credentials need a new key
    signer.sign(rotated, host="h", target="Kinesis_20131202.GetRecords", body=b"{}")
    signer.sign(rotated, host="h", target="Kinesis_20131202.GetRecords", body=b"{}")
    assert len(derivations) == 3


def test_cached_key_signatures_still_match_botocore(derivations: list[tuple[str, str]]) -> None:
    signer = SigV4Signer("dynamodb", "eu-west-1")
    creds = AwsCredentials("AKID", "secret", "tok")
    for i in range(20):
        now = 1_795_000_000.0 + i * 13.0
        body = f'{{"n":{i}}}'.encode()
        ours = signer.sign(
            creds, host="127.0.0.1:8000", target="DynamoDB_20120810.GetItem", body=body,
            content_type=DYNAMODB_JSON, now=now,
        )  # fmt: skip
        theirs = botocore_sign(
            url="http://127.0.0.1:8000", service="dynamodb", region="eu-west-1",
            target="DynamoDB_20120810.GetItem", body=body, content_type=DYNAMODB_JSON,
            credentials=creds, now=now,
        )  # fmt: skip
        assert ours["Authorization"] == theirs["Authorization"]
    assert len(derivations) == 1


def test_signer_repr_holds_no_secret() -> None:
    signer = SigV4Signer("kinesis", "us-east-1")
    signer.sign(AwsCredentials("AKID", "very-secret"), host="h", target="T.X", body=b"")
    assert "very-secret" not in repr(signer)


@pytest.mark.parametrize(
    ("url", "host", "path"),
    [
        ("https://kinesis.us-east-1.amazonaws.com", "kinesis.us-east-1.amazonaws.com", "/"),
        ("https://kinesis.us-east-1.amazonaws.com:443/", "kinesis.us-east-1.amazonaws.com", "/"),
        ("http://127.0.0.1:4567", "127.0.0.1:4567", "/"),
        ("http://[::1]:4567/x/../y", "[::1]:4567", "/y"),
    ],
)
def test_canonical_host_and_path(url: str, host: str, path: str) -> None:
    assert canonical_host(url) == host
    assert canonical_path(url) == path

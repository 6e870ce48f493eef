"""Credentials and region resolution; secrets never appear in reprs or error messages."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.credentials import RefreshableCredentials

from kinesis_butler.aws import AwsCredentials, CredentialsProvider, KinesisClient
from kinesis_butler.errors import ConfigError, CredentialsError

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYSECRETKEY"
TOKEN = "IQoJb3JpZ2luX2VjSESSIONTOKEN"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS variables, empty shared files, no instance metadata: an empty chain."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


def test_credentials_repr_and_str_hide_the_secret_and_token() -> None:
    creds = AwsCredentials("AKIDEXAMPLE", SECRET, TOKEN)
    for text in (repr(creds), str(creds), f"{creds}", f"{creds!r}", repr([creds])):
        assert SECRET not in text
        assert TOKEN not in text
        assert "AKIDEXAMPLE" in text  # the key id is not a secret and helps debugging


def test_provider_and_client_reprs_hide_the_secret() -> None:
    provider = CredentialsProvider.static("AKIDEXAMPLE", SECRET, TOKEN, region="us-east-1")
    client = KinesisClient(credentials=provider, endpoint_url="http://127.0.0.1:1")
    for text in (repr(provider), str(provider), repr(client), repr(provider.get())):
        assert SECRET not in text
        assert TOKEN not in text


def test_explicit_credentials_win(clean_env: Path) -> None:
    provider = CredentialsProvider(access_key_id="AKID", secret_access_key=SECRET, region="eu-west-1")
    assert provider.get() == AwsCredentials("AKID", SECRET)
    assert provider.region == "eu-west-1"


def test_half_explicit_credentials_are_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        CredentialsProvider(access_key_id="AKID")
    assert SECRET not in str(info.value)


def test_missing_credentials_say_how_to_provide_them(clean_env: Path) -> None:
    provider = CredentialsProvider(region="us-east-1")
    with pytest.raises(CredentialsError) as info:
        provider.get()
    message = str(info.value)
    assert "\n" not in message
    assert "AWS_ACCESS_KEY_ID" in message
    assert "AWS_SECRET_ACCESS_KEY" in message
    assert "profile" in message
    assert "emulator" in message


async def test_missing_credentials_are_reported_by_aget_too(clean_env: Path) -> None:
    with pytest.raises(CredentialsError):
        await CredentialsProvider(region="us-east-1").aget()


def test_missing_region_names_the_flag_and_variable(clean_env: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _ = CredentialsProvider().region
    assert "--region" in str(info.value)
    assert "AWS_REGION" in str(info.value)
    with pytest.raises(ConfigError, match="--region"):
        KinesisClient(credentials=AwsCredentials("a", "b"))


def test_region_from_aws_region_and_aws_default_region(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert CredentialsProvider().region == "ap-south-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")  # botocore's own variable wins
    assert CredentialsProvider().region == "eu-north-1"
    assert CredentialsProvider(region="us-west-2").region == "us-west-2"


def test_environment_credentials_come_through_the_chain(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    provider = CredentialsProvider(region="us-east-1")
    first = provider.get()
    assert first == AwsCredentials("AKIDENV", SECRET, TOKEN)
    assert provider.get() is first  # unchanged credentials keep their object (the signer's cache key)


def test_profile_from_shared_files(clean_env: Path) -> None:
    (clean_env / "credentials").write_text(
        f"[dev]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = {SECRET}\n"
    )
    (clean_env / "config").write_text("[profile dev]\nregion = sa-east-1\n")
    provider = CredentialsProvider(profile="dev")
    assert provider.region == "sa-east-1"
    assert provider.get().access_key_id == "AKIDPROFILE"


def test_unknown_profile_is_a_config_error(clean_env: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        CredentialsProvider(profile="nope", region="us-east-1").get()


def test_partial_environment_credentials_are_a_credentials_error(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    with pytest.raises(CredentialsError) as info:
        CredentialsProvider(region="us-east-1").get()
    assert "missing: AWS_SECRET_ACCESS_KEY" in str(info.value)
    assert "\n" not in str(info.value)


class FakeSession:
    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials

    def get_credentials(self) -> Any:
        return self.credentials

    def get_config_variable(self, name: str) -> str | None:
        return "us-east-1" if name == "region" else None


def _metadata(key: str, expires_in: dt.timedelta) -> dict[str, str]:
    expiry = dt.datetime.now(dt.UTC) + expires_in
    return {
        "access_key": key,
        "secret_key": SECRET + key,
        "token": TOKEN + key,
        "expiry_time": expiry.isoformat(),
    }


async def test_refreshable_credentials_refresh_off_the_event_loop() -> None:
    refreshed_in: list[threading.Thread] = []

    def refresh() -> dict[str, str]:
        refreshed_in.append(threading.current_thread())
        return _metadata("AKIDNEW", dt.timedelta(hours=1))

    # Expiring in 10 minutes is inside botocore's 15-minute advisory window: the next read refreshes.
    creds = RefreshableCredentials.create_from_metadata(
        _metadata("AKIDOLD", dt.timedelta(minutes=10)), refresh_using=refresh, method="test"
    )
    provider = CredentialsProvider(session=FakeSession(creds))
    first = await provider.aget()
    assert first.access_key_id == "AKIDNEW"
    assert refreshed_in
    assert refreshed_in[0] is not threading.main_thread()
    again = await provider.aget()  # no refresh due: served inline, same object
    assert again is first
    assert len(refreshed_in) == 1
    assert SECRET not in repr(provider) + repr(first)


def test_botocore_session_is_the_default_source(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    session = botocore.session.get_session()
    assert CredentialsProvider(session=session, region="us-east-1").get().access_key_id == "AKIDENV"


def test_credentials_and_profile_together_are_a_config_error() -> None:
    with pytest.raises(ConfigError):
        KinesisClient(credentials=AwsCredentials("a", "b"), profile="dev", region="us-east-1")

"""AWS credentials and region, from explicit values or botocore's provider chain.

botocore is used only here: its chain knows every source (environment, shared files, SSO,
``credential_process``, container and instance metadata) and refreshes temporary credentials.
Signing and transport are ours (see ``signer.py``).

Secrets never leave this module in text form: :class:`AwsCredentials` masks them in ``repr``
and no message built here includes them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from typing import Any

import botocore.exceptions
import botocore.session

from kinesis_butler.errors import ConfigError, CredentialsError

__all__ = ["AwsCredentials", "CredentialsProvider"]

_HOW_TO_PROVIDE = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, pass a profile (--profile / AWS_PROFILE), "
    "or for the local emulator any dummy values"
)
_NO_CREDENTIALS_HINT = f"no AWS credentials found: {_HOW_TO_PROVIDE}"
_NO_REGION_HINT = "no AWS region configured: pass --region or set AWS_REGION (or AWS_DEFAULT_REGION)"


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class AwsCredentials:
    """One immutable set of AWS credentials.

    Attributes:
        access_key_id: the access key id (not a secret; shown in ``repr``).
        secret_access_key: the secret key (never shown).
        session_token: the session token of temporary credentials (never shown).
    """

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        token = "None" if self.session_token is None else "'***'"
        return (
            f"AwsCredentials(access_key_id={self.access_key_id!r}, secret_access_key='***', "
            f"session_token={token})"
        )

    __str__ = __repr__


class CredentialsProvider:
    """Resolves credentials and the region once, then hands out current credentials cheaply.

    Explicit values win; otherwise botocore's chain is used (optionally for a named profile).
    Refreshable credentials are re-read on every :meth:`get`, which costs a lock and a time
    check until a refresh is due.

    Example:
        >>> provider = CredentialsProvider(region="us-east-1")
        >>> creds = await provider.aget()
    """

    def __init__(
        self,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        region: str | None = None,
        session: Any | None = None,
    ) -> None:
        """Create a provider. Nothing is resolved until first used.

        Args:
            access_key_id: explicit access key; requires ``secret_access_key``.
            secret_access_key: explicit secret key; requires ``access_key_id``.
            session_token: explicit session token for temporary credentials.
            profile: a profile of the shared config/credentials files.
            region: explicit region; otherwise the profile's, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
            session: a ``botocore.session.Session`` to use instead of a new one.

        Raises:
            ConfigError: only one of access key id and secret key was given.
        """
        if (access_key_id is None) != (secret_access_key is None):
            raise ConfigError(
                "pass both access_key_id and secret_access_key (or neither, to use the default chain)"
            )
        self._static: AwsCredentials | None = None
        if access_key_id is not None and secret_access_key is not None:
            self._static = AwsCredentials(access_key_id, secret_access_key, session_token or None)
        self._profile = profile
        self._explicit_region = region
        self._session = session
        self._region: str | None = None
        self._botocore_credentials: Any | None = None
        self._last: AwsCredentials | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        source = "explicit" if self._static is not None else f"chain(profile={self._profile!r})"
        return f"CredentialsProvider(source={source}, region={self._explicit_region or self._region!r})"

    @classmethod
    def static(
        cls, access_key_id: str, secret_access_key: str, session_token: str | None = None, *, region: str
    ) -> CredentialsProvider:
        """A provider for fixed credentials and region (tests, the local emulator)."""
        return cls(
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=session_token,
            region=region,
        )

    def _botocore_session(self) -> Any:
        if self._session is None:
            try:
                if self._profile is not None:
                    self._session = botocore.session.Session(profile=self._profile)
                else:
                    self._session = botocore.session.get_session()
            except botocore.exceptions.ProfileNotFound:
                raise ConfigError(
                    f"AWS profile {self._profile!r} not found in ~/.aws/config or ~/.aws/credentials"
                ) from None
        return self._session

    @property
    def region(self) -> str:
        """The region: explicit, else the profile's or AWS_DEFAULT_REGION, else AWS_REGION.

        Raises:
            ConfigError: no region is configured anywhere.
        """
        if self._region is None:
            region = self._explicit_region
            if not region:
                try:
                    region = self._botocore_session().get_config_variable("region")
                except botocore.exceptions.ProfileNotFound:
                    raise ConfigError(f"AWS profile {self._profile!r} not found") from None
            if not region:
                # botocore reads only AWS_DEFAULT_REGION; the CLIs and SDK v2s also honour AWS_REGION.
                region = os.environ.get("AWS_REGION")
            if not region:
                raise ConfigError(_NO_REGION_HINT)
            self._region = region
        return self._region

    def _resolve_chain(self) -> Any:
        try:
            found = self._botocore_session().get_credentials()
        except botocore.exceptions.ProfileNotFound:
            raise ConfigError(f"AWS profile {self._profile!r} not found") from None
        except botocore.exceptions.BotoCoreError as exc:
            # botocore's messages name the provider and the missing piece, never the secret.
            raise CredentialsError(
                f"could not load AWS credentials ({type(exc).__name__}: {exc}); {_HOW_TO_PROVIDE}"
            ) from None
        if found is None:
            raise CredentialsError(_NO_CREDENTIALS_HINT)
        return found

    def get(self) -> AwsCredentials:
        """Current credentials. May block on first use or when temporary credentials refresh.

        Raises:
            CredentialsError: no credentials could be found.
            ConfigError: the named profile does not exist.
        """
        if self._static is not None:
            return self._static
        with self._lock:
            if self._botocore_credentials is None:
                self._botocore_credentials = self._resolve_chain()
            source = self._botocore_credentials
        try:
            frozen = source.get_frozen_credentials()
        except botocore.exceptions.BotoCoreError as exc:
            raise CredentialsError(
                f"refreshing AWS credentials failed ({type(exc).__name__}: {exc})"
            ) from None
        last = self._last
        if (
            last is not None
            and last.access_key_id == frozen.access_key
            and last.secret_access_key == frozen.secret_key
            and last.session_token == frozen.token
        ):
            # Same credentials as last time: keep the object so the signer's key cache hits.
            return last
        if not frozen.access_key or not frozen.secret_key:
            raise CredentialsError(_NO_CREDENTIALS_HINT)
        self._last = AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token or None)
        return self._last

    async def aget(self) -> AwsCredentials:
        """Current credentials without blocking the event loop.

        The chain is walked (it may call instance metadata or STS) and due refreshes run in a
        worker thread; the common case returns inline.

        Raises:
            CredentialsError: no credentials could be found.
            ConfigError: the named profile does not exist.
        """
        if self._static is not None:
            return self._static
        source = self._botocore_credentials
        if source is None or _refresh_due(source):
            return await asyncio.to_thread(self.get)
        return self.get()


def _refresh_due(source: Any) -> bool:
    refresh_needed = getattr(source, "refresh_needed", None)
    return bool(refresh_needed()) if callable(refresh_needed) else False

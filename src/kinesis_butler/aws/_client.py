"""The plumbing every JSON-protocol service client shares: credentials, transport, lifecycle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar, Self, TypeVar

from kinesis_butler.aws.credentials import AwsCredentials, CredentialsProvider
from kinesis_butler.aws.transport import JsonTransport, Transport, TransportOptions
from kinesis_butler.errors import ConfigError, ResourceInUse, ResourceNotFound

__all__ = ["JsonServiceClient", "credentials_provider", "wait_until_active"]

_T = TypeVar("_T")


async def wait_until_active(
    describe: Callable[[], Awaitable[_T]],
    status_of: Callable[[_T], str],
    *,
    what: str,
    operation: str,
    timeout: float,  # noqa: ASYNC109 - a deadline for a poll loop
) -> _T:
    """Describe a resource until its status is ACTIVE (ResourceNotFound counts as "not yet").

    Raises:
        ResourceNotFound: it still did not exist at the deadline.
        ResourceInUse: it existed but was not ACTIVE at the deadline.
    """
    deadline, interval = time.monotonic() + timeout, 0.05
    while True:
        try:
            description = await describe()
        except ResourceNotFound:
            if time.monotonic() >= deadline:
                raise
        else:
            status = status_of(description)
            if status == "ACTIVE":
                return description
            if time.monotonic() >= deadline:
                raise ResourceInUse(f"{what} is still {status} after {timeout:g} s", operation=operation)
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 2, 1.0)


def credentials_provider(
    credentials: CredentialsProvider | AwsCredentials | None, profile: str | None, region: str | None
) -> CredentialsProvider:
    """The provider for a client's ``credentials``/``profile``/``region`` arguments.

    Raises:
        ConfigError: both ``credentials`` and ``profile`` given.
    """
    if credentials is not None and profile is not None:
        raise ConfigError("pass either credentials or profile, not both")
    if isinstance(credentials, AwsCredentials):
        return CredentialsProvider(
            access_key_id=credentials.access_key_id,
            secret_access_key=credentials.secret_access_key,
            session_token=credentials.session_token,
            region=region,
        )
    if credentials is None:
        return CredentialsProvider(profile=profile, region=region)
    return credentials


class JsonServiceClient:
    """Base of the service clients: owns a :class:`Transport`, closes it, reports its endpoint.

    Subclasses set ``_SERVICE`` (signing name), ``_TARGET_PREFIX`` (``X-Amz-Target`` prefix)
    and, if not JSON 1.1, ``_CONTENT_TYPE``; their operations call ``self._transport``.
    """

    _SERVICE: ClassVar[str]
    _TARGET_PREFIX: ClassVar[str]
    _CONTENT_TYPE: ClassVar[str] = "application/x-amz-json-1.1"

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        credentials: CredentialsProvider | AwsCredentials | None = None,
        profile: str | None = None,
        transport_options: TransportOptions | None = None,
        transport: Transport | None = None,
    ) -> None:
        """Use ``transport``, or build a :class:`JsonTransport` from the other arguments.

        Raises:
            ConfigError: no region is configured, or both ``credentials`` and ``profile`` given.
        """
        if transport is None:
            transport = JsonTransport(
                service=self._SERVICE,
                target_prefix=self._TARGET_PREFIX,
                credentials=credentials_provider(credentials, profile, region),
                region=region,
                endpoint_url=endpoint_url,
                content_type=self._CONTENT_TYPE,
                options=transport_options,
            )
        self._transport: Transport = transport

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint_url={self._transport.endpoint_url!r})"

    @property
    def endpoint_url(self) -> str:
        """The endpoint this client talks to."""
        return self._transport.endpoint_url

    @property
    def region(self) -> str:
        """The region requests are signed for."""
        return self._transport.region

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections. Safe to call more than once; the client cannot be reused."""
        await self._transport.aclose()

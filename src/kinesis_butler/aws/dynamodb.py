"""The few DynamoDB operations the lease store needs, typed, over the JSON transport.

Items are ``dict[str, AttributeValue]`` where :class:`AttributeValue` is a msgspec Struct with
one optional field per DynamoDB type, so ``{"S": "x"}`` on the wire is ``AttributeValue(S="x")``
here and bodies are encoded and decoded in one C pass each.

Conditional writes are retried here rather than in the transport, because a retry of a write
that timed out may find its own earlier attempt applied: the condition then fails against our
own write. :class:`ConditionFailed` says when that may have happened (``ambiguous``) and, when
the service returned it (``ReturnValuesOnConditionCheckFailure=ALL_OLD``), carries the item as
it was, so callers can tell "someone else wrote" from "our lost attempt wrote" without guessing.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

import aiohttp
import msgspec

from kinesis_butler.aws.credentials import AwsCredentials, CredentialsProvider
from kinesis_butler.aws.transport import JsonTransport, Transport, TransportOptions
from kinesis_butler.errors import (
    AwsError,
    ConditionalCheckFailed,
    ConfigError,
    EndpointUnreachable,
    ResourceInUse,
    ResourceNotFound,
    ServiceUnavailable,
)

__all__ = [
    "AttributeDefinition",
    "AttributeValue",
    "BillingModeSummary",
    "ConditionFailed",
    "DynamoDbClient",
    "Expression",
    "Item",
    "KeySchemaElement",
    "TableDescription",
]

_TARGET_PREFIX: Final = "DynamoDB_20120810"
_CONTENT_TYPE: Final = "application/x-amz-json-1.0"
_PLAIN_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9]*")


class AttributeValue(msgspec.Struct, omit_defaults=True):
    """One DynamoDB attribute value; exactly one field is set.

    Attributes:
        S: a string. N: a number, as its decimal string. B: binary (base64 on the wire).
        SS / NS / BS: sets of strings, numbers and binaries (never empty in DynamoDB).
        M: a map. L: a list. NULL: true for a null. BOOL: a boolean.
    """

    S: str | None = None
    N: str | None = None
    B: bytes | None = None
    SS: list[str] | None = None
    NS: list[str] | None = None
    BS: list[bytes] | None = None
    M: dict[str, AttributeValue] | None = None
    L: list[AttributeValue] | None = None
    NULL: bool | None = None
    BOOL: bool | None = None


Item = dict[str, AttributeValue]
"""An item, or a key: attribute name to value."""


class _Pascal(msgspec.Struct, rename="pascal", omit_defaults=True):
    """Base of the wire shapes: ``table_name`` is ``TableName``; unset fields are left out."""


class _FrozenPascal(msgspec.Struct, rename="pascal", omit_defaults=True, frozen=True):
    """Base of the immutable public wire shapes."""


class KeySchemaElement(_FrozenPascal, frozen=True):
    """One key attribute: ``attribute_name`` and ``key_type`` (``HASH`` or ``RANGE``)."""

    attribute_name: str
    key_type: str


class AttributeDefinition(_FrozenPascal, frozen=True):
    """A key attribute's type: ``attribute_type`` is ``S``, ``N`` or ``B``."""

    attribute_name: str
    attribute_type: str


class BillingModeSummary(_FrozenPascal, frozen=True):
    """How a table is billed: ``billing_mode`` is ``PAY_PER_REQUEST`` or ``PROVISIONED``."""

    billing_mode: str = "PROVISIONED"


class TableDescription(_FrozenPascal, frozen=True):
    """What DescribeTable says about a table (the fields the lease store uses).

    Attributes:
        table_name: the name.
        table_status: ``CREATING``, ``UPDATING``, ``DELETING``, ``ACTIVE``, ...
        key_schema: the primary key, hash key first.
        attribute_definitions: the types of the key attributes (and of index keys).
        billing_mode_summary: absent for provisioned tables created long ago.
        item_count: approximate; DynamoDB refreshes it about every six hours.
    """

    table_name: str
    table_status: str
    key_schema: tuple[KeySchemaElement, ...] = ()
    attribute_definitions: tuple[AttributeDefinition, ...] = ()
    billing_mode_summary: BillingModeSummary | None = None
    item_count: int = 0

    @property
    def billing_mode(self) -> str:
        """``PAY_PER_REQUEST`` or ``PROVISIONED``."""
        return self.billing_mode_summary.billing_mode if self.billing_mode_summary else "PROVISIONED"


class _TableOutput(_Pascal):
    table: TableDescription | None = None
    table_description: TableDescription | None = None


class _ItemOutput(_Pascal):
    item: Item | None = None
    attributes: Item | None = None


class _ScanOutput(_Pascal):
    items: list[Item] = []
    last_evaluated_key: Item | None = None


_encoder: Final = msgspec.json.Encoder()
_table_decoder: Final = msgspec.json.Decoder(_TableOutput)
_item_decoder: Final = msgspec.json.Decoder(_ItemOutput)
_scan_decoder: Final = msgspec.json.Decoder(_ScanOutput)


class Expression:
    """Builds an update and a condition with a placeholder for every attribute name and value.

    Placeholders keep reserved words (DynamoDB reserves hundreds) and odd characters out of the
    expression text, and only placeholders actually used are sent (DynamoDB rejects unused ones).

    Example:
        >>> e = Expression().set("leaseCounter", AttributeValue(N="6")).require_equal(
        ...     "leaseCounter", AttributeValue(N="5"))
        >>> e.update_expression, e.condition_expression
        ('SET #leaseCounter = :v0', '#leaseCounter = :v1')
    """

    def __init__(self) -> None:
        self.names: dict[str, str] = {}  # placeholder -> attribute, as sent
        self.values: Item = {}
        self._placeholders: dict[str, str] = {}  # attribute -> placeholder
        self.assigned: Item = {}  # attribute -> the literal value this update SETs
        self.removed: list[str] = []  # attributes this update REMOVEs
        self.expected: dict[str, AttributeValue | None] = {}  # conditions: value, or None for absent
        self._set: list[str] = []
        self._conditions: list[str] = []

    def name(self, attribute: str) -> str:
        """The placeholder of ``attribute`` (``#leaseOwner``), registering it."""
        placeholder = self._placeholders.get(attribute)
        if placeholder is None:
            # Readable placeholders for plain names; numbered ones for anything else.
            placeholder = f"#{attribute}" if _PLAIN_NAME.fullmatch(attribute) else f"#n{len(self.names)}"
            self._placeholders[attribute] = placeholder
            self.names[placeholder] = attribute
        return placeholder

    def value(self, value: AttributeValue) -> str:
        """A new placeholder (``:v3``) for ``value``."""
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = value
        return placeholder

    def set(self, attribute: str, value: AttributeValue) -> Expression:
        """``SET attribute = value``."""
        self._set.append(f"{self.name(attribute)} = {self.value(value)}")
        self.assigned[attribute] = value
        return self

    def increment(self, attribute: str, by: int = 1) -> Expression:
        """``SET attribute = if_not_exists(attribute, 0) + by`` (a missing number counts as 0)."""
        name = self.name(attribute)
        zero, step = self.value(AttributeValue(N="0")), self.value(AttributeValue(N=str(by)))
        self._set.append(f"{name} = if_not_exists({name}, {zero}) + {step}")
        return self

    def remove(self, attribute: str) -> Expression:
        """``REMOVE attribute`` (no error if it is absent)."""
        self.removed.append(attribute)
        self.name(attribute)
        return self

    def require_equal(self, attribute: str, value: AttributeValue) -> Expression:
        """Condition: ``attribute = value``."""
        self._conditions.append(f"{self.name(attribute)} = {self.value(value)}")
        self.expected[attribute] = value
        return self

    def require_absent(self, attribute: str) -> Expression:
        """Condition: ``attribute_not_exists(attribute)``."""
        self._conditions.append(f"attribute_not_exists({self.name(attribute)})")
        self.expected[attribute] = None
        return self

    def require_present(self, attribute: str) -> Expression:
        """Condition: ``attribute_exists(attribute)``."""
        self._conditions.append(f"attribute_exists({self.name(attribute)})")
        return self

    @property
    def update_expression(self) -> str | None:
        """The ``UpdateExpression`` text, or None when nothing is updated."""
        parts = []
        if self._set:
            parts.append("SET " + ", ".join(self._set))
        if self.removed:
            parts.append("REMOVE " + ", ".join(self.name(a) for a in self.removed))
        return " ".join(parts) or None

    @property
    def condition_expression(self) -> str | None:
        """The ``ConditionExpression`` text (clauses joined by AND), or None."""
        return " AND ".join(self._conditions) or None

    def request_fields(self) -> dict[str, Any]:
        """The condition and placeholder fields of a write request."""
        fields: dict[str, Any] = {
            "ExpressionAttributeNames": self.names,
            "ExpressionAttributeValues": self.values,
        }
        if self._conditions:
            # Costs nothing extra and lets the caller explain a failure without a second read.
            fields |= {
                "ConditionExpression": self.condition_expression,
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        return {name: value for name, value in fields.items() if value}


class ConditionFailed(ConditionalCheckFailed):
    """A conditional write's condition was false.

    Attributes:
        old_item_known: the service returned the item as it was (``ALL_OLD``), so ``old_item``
            is authoritative (``None`` then means the item does not exist).
        old_item: the item as it was when the condition failed, if known.
        ambiguous: an earlier attempt of this same call timed out or got a 5xx and may have
            been applied; the condition may have failed against our own write.
    """

    def __init__(
        self, cause: AwsError, *, old_item: Item | None, old_item_known: bool, ambiguous: bool
    ) -> None:
        super().__init__(
            cause.message, operation=cause.operation, code=cause.code, request_id=cause.request_id
        )
        self.status = cause.status
        self.old_item = old_item
        self.old_item_known = old_item_known
        self.ambiguous = ambiguous


def _condition_failed(exc: ConditionalCheckFailed, ambiguous: bool) -> ConditionFailed:
    # The transport keeps the error body only if it attaches it as ``body``; without it the
    # caller re-reads the item (one consistent GetItem) to explain the failure.
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        try:
            old = _item_decoder.decode(body).item
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        else:
            return ConditionFailed(exc, old_item=old, old_item_known=True, ambiguous=ambiguous)
    return ConditionFailed(exc, old_item=None, old_item_known=False, ambiguous=ambiguous)


def _maybe_applied(exc: Exception) -> bool:
    """Whether a failed write attempt may nevertheless have been applied by the service."""
    if isinstance(exc, EndpointUnreachable):
        # Refused or unresolvable: the request never left this host.
        return not isinstance(exc.__cause__, aiohttp.ClientConnectorError)
    return isinstance(exc, ServiceUnavailable)  # a throttled request was not applied


def _decode(decoder: msgspec.json.Decoder[Any], raw: bytes, operation: str) -> Any:
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AwsError(
            f"malformed {operation} response: {exc}", operation=operation, code="MalformedResponse"
        ) from exc


def _described(table: TableDescription | None, operation: str) -> TableDescription:
    if table is None:
        raise AwsError(f"{operation} answered without a table description", operation=operation)
    return table


class DynamoDbClient:
    """An async client for the DynamoDB operations the lease store uses.

    Reads are retried by the transport. Conditional writes are retried here (same budget and
    full-jitter backoff as the transport's options) so a :class:`ConditionFailed` can say whether
    an earlier attempt may have been applied.

    Example:
        >>> async with DynamoDbClient(region="us-east-1") as ddb:
        ...     key = {"leaseKey": AttributeValue(S="shardId-000000000000")}
        ...     item = await ddb.get_item("orders-app", key)
    """

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        credentials: CredentialsProvider | AwsCredentials | None = None,
        profile: str | None = None,
        transport_options: TransportOptions | None = None,
        transport: Transport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """Create a client. No connection is made until the first call.

        Args:
            region: the region; otherwise the profile's, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
            endpoint_url: e.g. ``http://127.0.0.1:8000`` for DynamoDB Local.
            credentials: a provider, fixed credentials, or ``None`` for botocore's chain.
            profile: a shared-config profile for the chain (not with ``credentials``).
            transport_options: timeouts and retry budget (also used for write retries).
            transport: a ready transport (tests); region, endpoint and credentials are then ignored.
            sleep: awaited between write retries; injectable for tests.
            rand: jitter source in [0, 1); injectable for tests.

        Raises:
            ConfigError: no region is configured, or both ``credentials`` and ``profile`` given.
        """
        self._options = transport_options or TransportOptions()
        if transport is None:
            if credentials is not None and profile is not None:
                raise ConfigError("pass either credentials or profile, not both")
            if isinstance(credentials, AwsCredentials):
                provider = CredentialsProvider(
                    access_key_id=credentials.access_key_id,
                    secret_access_key=credentials.secret_access_key,
                    session_token=credentials.session_token,
                    region=region,
                )
            else:
                provider = credentials or CredentialsProvider(profile=profile, region=region)
            transport = JsonTransport(
                service="dynamodb",
                target_prefix=_TARGET_PREFIX,
                credentials=provider,
                region=region,
                endpoint_url=endpoint_url,
                content_type=_CONTENT_TYPE,
                options=self._options,
            )
        self._transport: Transport = transport
        self._sleep = sleep
        self._rand = rand

    def __repr__(self) -> str:
        return f"DynamoDbClient(endpoint_url={self._transport.endpoint_url!r})"

    @property
    def endpoint_url(self) -> str:
        """The endpoint this client talks to."""
        return self._transport.endpoint_url

    @property
    def region(self) -> str:
        """The region requests are signed for."""
        return self._transport.region

    async def __aenter__(self) -> DynamoDbClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections. Idempotent; the client cannot be reused."""
        await self._transport.aclose()

    # -- tables -------------------------------------------------------------------------------

    async def create_table(
        self, table: str, *, hash_key: str = "leaseKey", hash_key_type: Literal["S", "N", "B"] = "S"
    ) -> TableDescription:
        """Create an on-demand (``PAY_PER_REQUEST``) table with a single hash key.

        Raises:
            ResourceInUse: a table of that name exists (or is being created).
        """
        request = {
            "TableName": table,
            "KeySchema": [KeySchemaElement(hash_key, "HASH")],
            "AttributeDefinitions": [AttributeDefinition(hash_key, hash_key_type)],
            "BillingMode": "PAY_PER_REQUEST",
        }
        raw = await self._transport.call("CreateTable", _encoder.encode(request))
        return _described(_decode(_table_decoder, raw, "CreateTable").table_description, "CreateTable")

    async def describe_table(self, table: str) -> TableDescription:
        """Describe a table.

        Raises:
            ResourceNotFound: no table of that name exists.
        """
        raw = await self._transport.call("DescribeTable", _encoder.encode({"TableName": table}))
        return _described(_decode(_table_decoder, raw, "DescribeTable").table, "DescribeTable")

    async def wait_for_active(self, table: str, *, timeout: float = 60.0) -> TableDescription:  # noqa: ASYNC109 - public API
        """Poll DescribeTable until the table is ``ACTIVE``.

        A table just created may briefly be unknown (the control plane is eventually
        consistent), so ``ResourceNotFound`` is tolerated until the deadline.

        Raises:
            ResourceNotFound: the table still did not exist at the deadline.
            ResourceInUse: it was not ACTIVE at the deadline.
        """
        deadline, interval = time.monotonic() + timeout, 0.05
        while True:
            try:
                description = await self.describe_table(table)
            except ResourceNotFound:
                if time.monotonic() >= deadline:
                    raise
            else:
                if description.table_status == "ACTIVE":
                    return description
                if time.monotonic() >= deadline:
                    raise ResourceInUse(
                        f"table {table!r} is still {description.table_status} after {timeout:g} s",
                        operation="DescribeTable",
                    )
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 2, 1.0)

    # -- items --------------------------------------------------------------------------------

    async def get_item(self, table: str, key: Item, *, consistent_read: bool = True) -> Item | None:
        """One item, or None. Strongly consistent by default (twice the read cost, never stale)."""
        request = {"TableName": table, "Key": key, "ConsistentRead": consistent_read}
        raw = await self._transport.call("GetItem", _encoder.encode(request))
        item: Item | None = _decode(_item_decoder, raw, "GetItem").item
        return item

    async def scan(
        self, table: str, *, consistent_read: bool = True, page_size: int | None = None
    ) -> list[Item]:
        """Every item of a table, following ``LastEvaluatedKey`` page by page (1 MB each)."""
        items: list[Item] = []
        start: Item | None = None
        while True:
            request: dict[str, Any] = {"TableName": table, "ConsistentRead": consistent_read}
            if start:
                request["ExclusiveStartKey"] = start
            if page_size:
                request["Limit"] = page_size
            page: _ScanOutput = _decode(
                _scan_decoder, await self._transport.call("Scan", _encoder.encode(request)), "Scan"
            )
            items.extend(page.items)
            if not page.last_evaluated_key:
                return items
            start = page.last_evaluated_key

    async def put_item(self, table: str, item: Item, *, condition: Expression | None = None) -> None:
        """Write a whole item, if ``condition`` (when given) holds.

        Raises:
            ConditionFailed: the condition was false.
        """
        await self._write("PutItem", {"TableName": table, "Item": item}, condition)

    async def update_item(self, table: str, key: Item, expression: Expression) -> Item:
        """Apply ``expression``'s update if its condition holds; return the item as written (``ALL_NEW``).

        Attributes the expression does not name are left as they are.

        Raises:
            ConditionFailed: the condition was false.
        """
        request = {"TableName": table, "Key": key, "UpdateExpression": expression.update_expression}
        raw = await self._write("UpdateItem", {**request, "ReturnValues": "ALL_NEW"}, expression)
        item: Item | None = _decode(_item_decoder, raw, "UpdateItem").attributes
        return item or {}

    async def delete_item(self, table: str, key: Item, *, condition: Expression | None = None) -> None:
        """Delete an item, if ``condition`` (when given) holds.

        Raises:
            ConditionFailed: the condition was false.
        """
        await self._write("DeleteItem", {"TableName": table, "Key": key}, condition)

    async def _write(self, operation: str, request: dict[str, Any], condition: Expression | None) -> bytes:
        if condition is not None:
            request |= condition.request_fields()
        body = _encoder.encode(request)
        attempts, ambiguous = 0, False
        while True:
            try:
                return await self._transport.call(operation, body, max_attempts=1)
            except ConditionalCheckFailed as exc:
                raise _condition_failed(exc, ambiguous) from exc
            except (AwsError, EndpointUnreachable) as exc:
                attempts += 1
                if not exc.retriable or attempts >= self._options.max_attempts:
                    raise
                ambiguous = ambiguous or _maybe_applied(exc)
                ceiling = min(self._options.backoff_cap, self._options.backoff_base * (1 << (attempts - 1)))
                await self._sleep(self._rand() * ceiling)

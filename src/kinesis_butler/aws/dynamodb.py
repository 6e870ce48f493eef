"""The few DynamoDB operations the lease store needs, typed, over the JSON transport.

Items are ``dict[str, AttributeValue]``, msgspec Structs with one field per DynamoDB type, so
bodies are encoded and decoded in one C pass each; :class:`Expression` builds updates and
conditions.

Conditional writes are retried here rather than in the transport, because a retry of a write
that timed out may find its own earlier attempt applied: the condition then fails against our
own write. :class:`ConditionFailed` says when that may have happened (``ambiguous``) and, when
the service returned it (``ReturnValuesOnConditionCheckFailure=ALL_OLD``), carries the item as
it was, so callers can tell "someone else wrote" from "our lost attempt wrote" without guessing.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

import aiohttp
import msgspec

from kinesis_butler.aws._client import JsonServiceClient, wait_until_active
from kinesis_butler.aws._dynamodb_expressions import Expression
from kinesis_butler.aws._dynamodb_shapes import (
    AttributeDefinition,
    AttributeValue,
    BillingModeSummary,
    Item,
    KeySchemaElement,
    ScanOutput,
    TableDescription,
    decode,
    described,
    encoder,
    item_decoder,
    scan_decoder,
    table_decoder,
)
from kinesis_butler.aws.credentials import AwsCredentials, CredentialsProvider
from kinesis_butler.aws.transport import Transport, TransportOptions
from kinesis_butler.errors import (
    AwsError,
    ConditionalCheckFailed,
    EndpointUnreachable,
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
            old = item_decoder.decode(body).item
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


class DynamoDbClient(JsonServiceClient):
    """An async client for the DynamoDB operations the lease store uses.

    Reads are retried by the transport. Conditional writes are retried here (same budget and
    full-jitter backoff as the transport's options) so a :class:`ConditionFailed` can say whether
    an earlier attempt may have been applied.

    Example:
        >>> async with DynamoDbClient(region="us-east-1") as ddb:
        ...     key = {"leaseKey": AttributeValue(S="shardId-000000000000")}
        ...     item = await ddb.get_item("orders-app", key)
    """

    _SERVICE = "dynamodb"
    _TARGET_PREFIX = _TARGET_PREFIX
    _CONTENT_TYPE = _CONTENT_TYPE

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
        super().__init__(
            region=region,
            endpoint_url=endpoint_url,
            credentials=credentials,
            profile=profile,
            transport_options=self._options,
            transport=transport,
        )
        self._sleep = sleep
        self._rand = rand

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
        raw = await self._transport.call("CreateTable", encoder.encode(request))
        return described(decode(table_decoder, raw, "CreateTable").table_description, "CreateTable")

    async def describe_table(self, table: str) -> TableDescription:
        """Describe a table.

        Raises:
            ResourceNotFound: no table of that name exists.
        """
        raw = await self._transport.call("DescribeTable", encoder.encode({"TableName": table}))
        return described(decode(table_decoder, raw, "DescribeTable").table, "DescribeTable")

    async def wait_for_active(self, table: str, *, timeout: float = 60.0) -> TableDescription:  # noqa: ASYNC109 - public API
        """Poll DescribeTable until the table is ``ACTIVE``.

        A table just created may briefly be unknown (the control plane is eventually
        consistent), so ``ResourceNotFound`` is tolerated until the deadline.

        Raises:
            ResourceNotFound: the table still did not exist at the deadline.
            ResourceInUse: it was not ACTIVE at the deadline.
        """
        return await wait_until_active(
            lambda: self.describe_table(table),
            lambda description: description.table_status,
            what=f"table {table!r}",
            operation="DescribeTable",
            timeout=timeout,
        )

    # -- items --------------------------------------------------------------------------------

    async def get_item(self, table: str, key: Item, *, consistent_read: bool = True) -> Item | None:
        """One item, or None. Strongly consistent by default (twice the read cost, never stale)."""
        request = {"TableName": table, "Key": key, "ConsistentRead": consistent_read}
        raw = await self._transport.call("GetItem", encoder.encode(request))
        item: Item | None = decode(item_decoder, raw, "GetItem").item
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
            page: ScanOutput = decode(
                scan_decoder, await self._transport.call("Scan", encoder.encode(request)), "Scan"
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
        item: Item | None = decode(item_decoder, raw, "UpdateItem").attributes
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
        body = encoder.encode(request)
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

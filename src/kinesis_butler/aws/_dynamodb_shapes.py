"""The DynamoDB wire shapes: attribute values and items, table descriptions, response bodies.

Items are ``dict[str, AttributeValue]`` where :class:`AttributeValue` is a msgspec Struct with
one optional field per DynamoDB type, so ``{"S": "x"}`` on the wire is ``AttributeValue(S="x")``
here and bodies are encoded and decoded in one C pass each. Field names are snake_case here and
PascalCase on the wire (``table_name`` is ``TableName``).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from kinesis_butler.errors import AwsError


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


class TableOutput(_Pascal):
    """The answer of CreateTable (``TableDescription``) and DescribeTable (``Table``)."""

    table: TableDescription | None = None
    table_description: TableDescription | None = None


class ItemOutput(_Pascal):
    """The answer of GetItem (``Item``), UpdateItem (``Attributes``), a failed condition (``Item``)."""

    item: Item | None = None
    attributes: Item | None = None


class ScanOutput(_Pascal):
    """One page of a Scan."""

    items: list[Item] = []
    last_evaluated_key: Item | None = None


encoder: Final = msgspec.json.Encoder()
table_decoder: Final = msgspec.json.Decoder(TableOutput)
item_decoder: Final = msgspec.json.Decoder(ItemOutput)
scan_decoder: Final = msgspec.json.Decoder(ScanOutput)


def decode(decoder: msgspec.json.Decoder[Any], raw: bytes, operation: str) -> Any:
    """The response body ``raw`` of ``operation``, decoded; AwsError if it is malformed."""
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AwsError(
            f"malformed {operation} response: {exc}", operation=operation, code="MalformedResponse"
        ) from exc


def described(table: TableDescription | None, operation: str) -> TableDescription:
    """The table description ``operation`` answered with; AwsError if it has none."""
    if table is None:
        raise AwsError(f"{operation} answered without a table description", operation=operation)
    return table

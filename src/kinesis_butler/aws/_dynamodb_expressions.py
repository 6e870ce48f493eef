"""DynamoDB update and condition expressions, built with a placeholder for every name and value."""

from __future__ import annotations

import re
from typing import Any, Final

from kinesis_butler.aws._dynamodb_shapes import AttributeValue, Item

_PLAIN_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9]*")


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

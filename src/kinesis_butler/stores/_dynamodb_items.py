"""The KCL lease table's layout: its attribute names, the Lease <-> item codec, and the writes
and checks the DynamoDB lease store expresses in those terms.

Items carry exactly the KCL's attributes (``docs/stores/dynamodb.md``): optional ones and empty
sets are left out, as DynamoDB has no empty sets. Numbers compare by value, sets unordered, as
DynamoDB compares them.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from kinesis_butler.aws.dynamodb import AttributeValue, Expression, Item, KeySchemaElement, TableDescription
from kinesis_butler.errors import ConfigError, StoreSchemaError
from kinesis_butler.models import ExtendedSequenceNumber, Lease

# The KCL's attribute names (DynamoDBLeaseSerializer, DynamoDBMultiStreamLeaseSerializer).
KEY, OWNER, COUNTER = "leaseKey", "leaseOwner", "leaseCounter"
CHECKPOINT, CHECKPOINT_SUB = "checkpoint", "checkpointSubSequenceNumber"
PENDING, PENDING_SUB = "pendingCheckpoint", "pendingCheckpointSubSequenceNumber"
PENDING_STATE = "pendingCheckpointState"  # the KCL's prepareCheckpoint state; tied to PENDING
SWITCHES = "ownerSwitchesSinceCheckpoint"
PARENTS, CHILDREN = "parentShardId", "childShardIds"
START_HASH, END_HASH = "startingHashKey", "endingHashKey"
CHECKPOINT_OWNER = "checkpointOwner"
STREAM, SHARD = "streamName", "shardId"  # multi-stream mode only
ENTITY_TYPE = "entityType"  # newer KCLs keep other entities in the lease table; absent = lease


def s_value(value: str) -> AttributeValue:
    """A string attribute value."""
    return AttributeValue(S=value)


def n_value(value: int) -> AttributeValue:
    """A number attribute value."""
    return AttributeValue(N=str(value))


def key_of(lease_key: str) -> Item:
    """The key of the item of lease ``lease_key``."""
    return {KEY: s_value(lease_key)}


def lease_to_item(lease: Lease) -> Item:
    """The item the KCL would write for ``lease``: optional attributes and empty sets left out."""
    item: Item = {
        KEY: s_value(lease.lease_key),
        COUNTER: n_value(lease.lease_counter),
        SWITCHES: n_value(lease.owner_switches_since_checkpoint),
        CHECKPOINT: s_value(lease.checkpoint.sequence),
        CHECKPOINT_SUB: n_value(lease.checkpoint.sub_sequence),
    }
    optional = {
        OWNER: lease.lease_owner,
        START_HASH: lease.starting_hash_key,
        END_HASH: lease.ending_hash_key,
        CHECKPOINT_OWNER: lease.checkpoint_owner,
        STREAM: lease.stream_name,
        SHARD: lease.shard_id,
    }
    item |= {name: s_value(value) for name, value in optional.items() if value is not None}
    if lease.pending_checkpoint is not None:
        item |= {
            PENDING: s_value(lease.pending_checkpoint.sequence),
            PENDING_SUB: n_value(lease.pending_checkpoint.sub_sequence),
        }
    for name, ids in ((PARENTS, lease.parent_shard_ids), (CHILDREN, lease.child_shard_ids)):
        if ids:  # DynamoDB has no empty sets: an empty set is an absent attribute
            item[name] = AttributeValue(SS=sorted(ids))
    return item


def lease_from_item(item: Item, table: str = "?") -> Lease | None:
    """The lease an item holds; None for items of the table that are not leases.

    Raises:
        StoreSchemaError: the item lacks ``leaseKey``, ``leaseCounter`` or ``checkpoint``, or a
            value has the wrong type; the message names the table and the item.
    """
    entity = item.get(ENTITY_TYPE)
    if entity is not None and entity.S != "LEASE":
        return None  # a worker-metrics, leader-lock or migration entity of a newer KCL
    key = item[KEY].S if KEY in item else None
    if key is None or COUNTER not in item or CHECKPOINT not in item:
        raise StoreSchemaError(
            f"DynamoDB table {table!r}: item {key!r} is not a KCL lease: "
            f"it lacks one of {KEY} (S), {COUNTER} (N), {CHECKPOINT} (S)"
        )
    try:
        pending = _text(item, PENDING)
        return Lease(
            lease_key=key,
            lease_owner=_text(item, OWNER),
            lease_counter=_number(item, COUNTER),
            checkpoint=ExtendedSequenceNumber(_text(item, CHECKPOINT) or "", _number(item, CHECKPOINT_SUB)),
            pending_checkpoint=ExtendedSequenceNumber(pending, _number(item, PENDING_SUB))
            if pending
            else None,
            owner_switches_since_checkpoint=_number(item, SWITCHES),
            parent_shard_ids=frozenset(_get(item, PARENTS, "SS") or ()),
            child_shard_ids=frozenset(_get(item, CHILDREN, "SS") or ()),
            starting_hash_key=_text(item, START_HASH),
            ending_hash_key=_text(item, END_HASH),
            checkpoint_owner=_text(item, CHECKPOINT_OWNER),
            stream_name=_text(item, STREAM),
            shard_id=_text(item, SHARD),
        )
    except (ValueError, InvalidOperation, ConfigError) as exc:
        raise StoreSchemaError(f"DynamoDB table {table!r}: item {key!r} is not a KCL lease: {exc}") from None


def _get(item: Item, name: str, kind: str) -> Any:
    """The ``kind`` field (``S``, ``N``, ``SS``) of attribute ``name``; None when absent or NULL."""
    value = item.get(name)
    if value is None or value.NULL:
        return None
    found = getattr(value, kind)
    if found is None:
        raise ValueError(f"{name} is not of type {kind}")
    return found


def _text(item: Item, name: str) -> str | None:
    text: str | None = _get(item, name, "S")
    return text


def _number(item: Item, name: str) -> int:
    return int(Decimal(_get(item, name, "N") or 0))


def same_value(a: AttributeValue | None, b: AttributeValue | None) -> bool:
    """Equal as DynamoDB compares values: sets unordered, numbers by value."""
    if a is None or b is None:
        return a is b
    if a.N is not None and b.N is not None:
        return Decimal(a.N) == Decimal(b.N)
    if a.SS is not None and b.SS is not None:
        return set(a.SS) == set(b.SS)
    return a == b


def shows(item: Item, update: Expression) -> bool:
    """Whether ``item`` is what ``update`` leaves: every value it sets, none it removes, and the
    values its condition demanded of the attributes it does not change."""
    kept = {k: v for k, v in update.expected.items() if k not in update.assigned and k not in update.removed}
    return all(same_value(item.get(k), v) for k, v in (kept | update.assigned).items()) and not any(
        name in item for name in update.removed
    )


def set_checkpoint(
    update: Expression, position: ExtendedSequenceNumber, pending: ExtendedSequenceNumber | None
) -> None:
    """Add a checkpoint write to ``update``: position, pending one, owner switches back to 0."""
    update.set(CHECKPOINT, s_value(position.sequence)).set(CHECKPOINT_SUB, n_value(position.sub_sequence))
    update.set(SWITCHES, n_value(0))
    if pending is None:
        update.remove(PENDING).remove(PENDING_SUB)
    else:
        update.set(PENDING, s_value(pending.sequence)).set(PENDING_SUB, n_value(pending.sub_sequence))
    update.remove(PENDING_STATE)  # as the KCL: the state belonged to the pending checkpoint replaced here


def require_owner(update: Expression, owner: str | None) -> Expression:
    """Make ``update`` conditional on the stored owner being ``owner`` (None: no owner)."""
    return update.require_absent(OWNER) if owner is None else update.require_equal(OWNER, s_value(owner))


def verify_key_schema(table: TableDescription, where: str) -> None:
    """Raise StoreSchemaError unless ``table``'s key is a lease table's: ``leaseKey`` (HASH, S)."""
    types = {d.attribute_name: d.attribute_type for d in table.attribute_definitions}
    if table.key_schema == (KeySchemaElement(KEY, "HASH"),) and types.get(KEY) == "S":
        return
    found = ", ".join(
        f"{k.attribute_name} ({k.key_type}, {types.get(k.attribute_name, '?')})" for k in table.key_schema
    )
    raise StoreSchemaError(
        f"{where} is not a KCL lease table: its key schema is {found or 'empty'}, a lease table's is "
        f"{KEY} (HASH, S); name another table (dynamodb://TABLE)"
    )

"""The DynamoDB lease store: the Java KCL's lease table, item for item.

One table per application, named like the KCL names it (the application name unless told
otherwise), partition key ``leaseKey`` (S), on-demand billing. Items carry exactly the KCL's
attributes (see ``docs/stores/dynamodb.md``), so a table left by a KCL application can be read
and taken over, and one written here is readable by the KCL.

Every write is one conditional ``UpdateItem`` (``DeleteItem``, ``PutItem``) whose condition is
the fencing token ``leaseCounter = :seen`` (plus the owner where the Protocol asks for it) and
which sets ``leaseCounter = :seen + 1``. Updates name only the attributes they change, so
attributes this library does not know (``throughputKBps``, ``entityType``, whatever a later KCL
adds) survive every write. Reads are strongly consistent: a lease store that may read its own
writes stale would fence itself out.

A write retried after a timeout or a 5xx may fail its condition against its *own* first
attempt. When the client reports that ambiguity and the item shows exactly what this write
sets, the write is taken as applied (the KCL does the same for renewals), instead of making the
worker believe it lost a lease it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar
from urllib.parse import urlsplit

from kinesis_butler.aws.credentials import AwsCredentials, CredentialsProvider
from kinesis_butler.aws.dynamodb import (
    AttributeValue,
    ConditionFailed,
    DynamoDbClient,
    Expression,
    Item,
    TableDescription,
)
from kinesis_butler.aws.transport import TransportOptions
from kinesis_butler.errors import (
    AccessDenied,
    AwsError,
    ClosedError,
    ConfigError,
    EndpointUnreachable,
    ResourceInUse,
    ResourceNotFound,
    ServiceUnavailable,
    StaleLease,
    StoreError,
    StoreSchemaError,
    StoreUnavailable,
    Throttled,
)
from kinesis_butler.models import ExtendedSequenceNumber, Lease
from kinesis_butler.stores._common import stale_lease
from kinesis_butler.stores._dynamodb_items import (  # noqa: F401 - also re-exports the KCL's attribute names
    CHECKPOINT,
    CHECKPOINT_OWNER,
    CHECKPOINT_SUB,
    CHILDREN,
    COUNTER,
    END_HASH,
    ENTITY_TYPE,
    KEY,
    OWNER,
    PARENTS,
    PENDING,
    PENDING_STATE,
    PENDING_SUB,
    SHARD,
    START_HASH,
    STREAM,
    SWITCHES,
    key_of,
    lease_from_item,
    lease_to_item,
    n_value,
    require_owner,
    s_value,
    same_value,
    set_checkpoint,
    shows,
    verify_key_schema,
)
from kinesis_butler.stores._dynamodb_url import parse_url

__all__ = ["DEFAULT_TRANSPORT_OPTIONS", "DynamoDbLeaseStore", "lease_from_item", "lease_to_item"]

_T = TypeVar("_T")

DEFAULT_TRANSPORT_OPTIONS: Final = TransportOptions(
    connect_timeout=2.0, total_timeout=5.0, max_attempts=4, backoff_base=0.05, backoff_cap=1.0, pool_limit=16
)
"""Fail fast: a renewal that hangs past the failover time is worse than one that fails and is
retried on the next renew tick (the default transport retries for up to ~15 s)."""

_TABLE_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{3,255}")
_OP_HANDOFF, _OP_COMPLETE = "hand off", "complete the handoff of"
_PERMISSIONS: Final = (
    "the lease store needs dynamodb:DescribeTable, CreateTable, GetItem, PutItem, UpdateItem, "
    "DeleteItem and Scan on the table"
)


async def _nothing() -> None:
    """The call of ``initialize``: making sure of the table is all it does."""


class _OwnerMoved(Exception):
    """A take's owner condition failed while the counter matched: retry with the stored owner."""

    def __init__(self, owner: str | None) -> None:
        super().__init__(owner)
        self.owner = owner


class DynamoDbLeaseStore:
    """A :class:`~kinesis_butler.stores.LeaseStore` in a KCL-compatible DynamoDB lease table.

    Example:
        >>> store = DynamoDbLeaseStore("orders-app", "orders-app", region="eu-west-1")
        >>> await store.initialize()  # creates the table on first use

    Args:
        table: the lease table; ``None`` or empty uses the application name, as the KCL does.
        app: the application whose leases this table holds.
        region: the AWS region; otherwise the profile's, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
        endpoint_url: e.g. ``http://127.0.0.1:8000`` for DynamoDB Local.
        credentials: a provider, fixed credentials, or ``None`` for botocore's chain.
        profile: a shared-config profile for botocore's chain.
        create_table: create a missing table (on-demand billing); if False, a missing table is an error.
        transport_options: timeouts and retries; :data:`DEFAULT_TRANSPORT_OPTIONS` by default.
        table_timeout: seconds to wait for a new table to become ACTIVE.
        client: a ready client (tests); the store then does not close it.

    Raises:
        ConfigError: an invalid table name, no region configured, or both credentials and profile.
    """

    def __init__(
        self,
        table: str | None,
        app: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        credentials: CredentialsProvider | AwsCredentials | None = None,
        profile: str | None = None,
        create_table: bool = True,
        transport_options: TransportOptions | None = None,
        table_timeout: float = 60.0,
        client: DynamoDbClient | None = None,
    ) -> None:
        if not app:
            raise ConfigError("the DynamoDB lease store needs a non-empty application name")
        table = table or app
        if not _TABLE_NAME.fullmatch(table):
            raise ConfigError(
                f"invalid DynamoDB table name {table!r}: use 3-255 letters, digits, '_', '-' or '.'"
                + ("" if table != app else "; the application name is the default, name a table instead")
            )
        self._table, self._app = table, app
        self._create_table, self._table_timeout = create_table, table_timeout
        self._owns_client = client is None
        self._client = client or DynamoDbClient(
            region=region,
            endpoint_url=endpoint_url,
            credentials=credentials,
            profile=profile,
            transport_options=transport_options or DEFAULT_TRANSPORT_OPTIONS,
        )
        self._ready, self._closed = False, False
        self._init_lock = asyncio.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        app: str,
        *,
        credentials: CredentialsProvider | AwsCredentials | None = None,
        transport_options: TransportOptions | None = None,
    ) -> DynamoDbLeaseStore:
        """A store from ``dynamodb://TABLE?region=R&endpoint_url=URL&profile=P&create_table=false``.

        Every part after the scheme is optional: ``dynamodb://`` is the table named like ``app``
        in the configured region. Credentials never go in the URL; they come from ``credentials``
        or botocore's chain.

        Raises:
            ConfigError: a malformed URL or an unknown option (its value is never echoed).
        """
        table, options = parse_url(url)
        return cls(table, app, credentials=credentials, transport_options=transport_options, **options)

    @property
    def table(self) -> str:
        """The lease table's name."""
        return self._table

    @property
    def app(self) -> str:
        """The application whose leases this store holds."""
        return self._app

    def __repr__(self) -> str:
        return (
            f"DynamoDbLeaseStore(table={self._table!r}, app={self._app!r}, endpoint_url={self._endpoint!r})"
        )

    @property
    def _endpoint(self) -> str:
        parts = urlsplit(self._client.endpoint_url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"  # never user info

    async def initialize(self) -> None:
        """Create the table if missing (and allowed); verify its key schema if present.

        Raises:
            StoreSchemaError: the table's key is not ``leaseKey`` (HASH, S).
            StoreError: the table is missing and ``create_table`` is False, or it is being deleted.
            StoreUnavailable: DynamoDB could not be reached.
        """
        await self._call("initialize", _nothing)

    async def list_leases(self) -> list[Lease]:
        """Every lease of this application, in lease-key order (one strongly consistent Scan)."""
        items = await self._call("list leases", lambda: self._client.scan(self._table))
        leases = (lease_from_item(item, self._table) for item in items)
        return sorted((lease for lease in leases if lease is not None), key=lambda lease: lease.lease_key)

    async def get_lease(self, lease_key: str) -> Lease | None:
        """One lease, or None."""
        item = await self._get_item(lease_key)
        return None if item is None else lease_from_item(item, self._table)

    async def create_lease_if_absent(self, lease: Lease) -> bool:
        """Insert ``lease`` unless its key exists. True if it was created."""
        item = lease_to_item(lease)
        try:
            await self._call(
                f"create lease {lease.lease_key!r}",
                lambda: self._client.put_item(self._table, item, condition=Expression().require_absent(KEY)),
            )
        except ConditionFailed as exc:
            if not exc.ambiguous:
                return False
            old = await self._old_item(exc, lease.lease_key)
            return (
                old is not None
                and old.keys() == item.keys()
                and all(same_value(old[k], v) for k, v in item.items())
            )
        return True

    async def renew_lease(self, lease: Lease) -> Lease:
        """counter+1; requires the stored counter and owner to match ``lease``."""
        return await self._fenced("renew", lease, Expression(), check_owner=True)

    async def take_lease(self, lease: Lease, owner: str) -> Lease:
        """Become the owner; requires the stored counter to match ``lease``."""
        seen = lease.lease_owner
        for _ in range(3):  # the owner condition can only fail again if the counter moved
            update = Expression().set(OWNER, s_value(owner)).remove(CHECKPOINT_OWNER)
            if seen is not None and seen != owner:  # as the KCL: unowned or ours is no switch
                update.increment(SWITCHES)
            try:
                return await self._fenced("take", lease.replace(lease_owner=seen), update, check_owner=True)
            except _OwnerMoved as moved:
                seen = moved.owner
        raise stale_lease("take", lease, "its owner keeps changing")

    async def evict_lease(self, lease: Lease) -> Lease:
        """Release the lease; requires the stored counter and owner to match ``lease``."""
        update = Expression().remove(OWNER).remove(CHECKPOINT_OWNER)
        return await self._fenced("evict", lease, update, check_owner=True)

    async def checkpoint(
        self,
        lease: Lease,
        checkpoint: ExtendedSequenceNumber,
        *,
        pending_checkpoint: ExtendedSequenceNumber | None = None,
    ) -> Lease:
        """Write the checkpoint; requires the stored counter and owner to match ``lease``."""
        update = Expression()
        set_checkpoint(update, checkpoint, pending_checkpoint)
        return await self._fenced("checkpoint", lease, update, check_owner=True)

    async def initiate_handoff(self, lease: Lease, new_owner: str) -> Lease:
        """Planned move to ``new_owner``; see :meth:`LeaseStore.initiate_handoff`."""
        if lease.lease_owner is None:
            old = await self._get_item(lease.lease_key)
            raise self._stale(_OP_HANDOFF, lease, old, check_owner=True)
        update = Expression().set(OWNER, s_value(new_owner)).set(CHECKPOINT_OWNER, s_value(lease.lease_owner))
        update.increment(SWITCHES).require_absent(CHECKPOINT_OWNER)
        return await self._fenced(_OP_HANDOFF, lease, update, check_owner=True)

    async def complete_handoff(self, lease: Lease, checkpoint: ExtendedSequenceNumber | None) -> Lease:
        """The old owner's final write; see :meth:`LeaseStore.complete_handoff`."""
        update = Expression().remove(CHECKPOINT_OWNER).require_present(CHECKPOINT_OWNER)
        if checkpoint is not None:
            set_checkpoint(update, checkpoint, None)
        return await self._fenced(_OP_COMPLETE, lease, update, check_owner=False)

    async def update_lineage(self, lease: Lease, *, child_shard_ids: frozenset[str]) -> Lease:
        """Record the children of a shard; requires the stored counter to match ``lease``."""
        update = Expression()
        if child_shard_ids:
            update.set(CHILDREN, AttributeValue(SS=sorted(child_shard_ids)))
        else:
            update.remove(CHILDREN)
        return await self._fenced("update lineage of", lease, update, check_owner=False)

    async def delete_lease(self, lease: Lease) -> None:
        """Delete the lease; requires the stored counter to match ``lease``."""
        condition = Expression().require_equal(COUNTER, n_value(lease.lease_counter))
        try:
            await self._call(
                f"delete lease {lease.lease_key!r}",
                lambda: self._client.delete_item(self._table, key_of(lease.lease_key), condition=condition),
            )
        except ConditionFailed as exc:
            old = await self._old_item(exc, lease.lease_key)
            if not (exc.ambiguous and old is None):  # gone after an ambiguous attempt: ours
                raise self._stale("delete", lease, old, check_owner=False) from None

    async def aclose(self) -> None:
        """Close the client's connections (unless it was passed in). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()

    # -- plumbing -----------------------------------------------------------------------------

    async def _fenced(self, op: str, lease: Lease, update: Expression, *, check_owner: bool) -> Lease:
        key, counter = lease.lease_key, lease.lease_counter
        update.set(COUNTER, n_value(counter + 1)).require_equal(COUNTER, n_value(counter))
        if check_owner:
            require_owner(update, lease.lease_owner)
        try:
            item = await self._call(
                f"{op} lease {key!r}", lambda: self._client.update_item(self._table, key_of(key), update)
            )
        except ConditionFailed as exc:
            old = await self._old_item(exc, key)
            if exc.ambiguous and old is not None and shows(old, update):
                item = old  # our earlier attempt was applied; only its answer was lost
            elif op == "take" and old is not None and same_value(old.get(COUNTER), n_value(counter)):
                raise _OwnerMoved(old[OWNER].S if OWNER in old else None) from None
            else:
                raise self._stale(op, lease, old, check_owner=check_owner) from None
        lease_after = lease_from_item(item, self._table)
        if lease_after is None:
            raise StoreSchemaError(f"DynamoDB table {self._table!r}: item {key!r} is not a lease")
        return lease_after

    async def _old_item(self, exc: ConditionFailed, lease_key: str) -> Item | None:
        # Only to explain a failure or spot our own lost attempt; the write already decided.
        return exc.old_item if exc.old_item_known else await self._get_item(lease_key)

    async def _get_item(self, lease_key: str) -> Item | None:
        return await self._call(
            f"read lease {lease_key!r}", lambda: self._client.get_item(self._table, key_of(lease_key))
        )

    def _stale(self, op: str, lease: Lease, old: Item | None, *, check_owner: bool) -> StaleLease:
        counter = lease.lease_counter
        stored = old.get(COUNTER) if old is not None else None
        owner = old[OWNER].S if old is not None and OWNER in old else None
        if old is None:
            reason = "the lease does not exist (it was deleted)"
        elif stored is None or stored.N is None:
            reason = f"the item has no {COUNTER}: it is not a lease"
        elif stored != n_value(counter):
            reason = f"its counter moved on to {stored.N}"
        elif check_owner and owner != lease.lease_owner:
            reason = f"it is owned by {owner!r}, not {lease.lease_owner!r}"
        elif op == _OP_HANDOFF:
            reason = "it has no owner" if owner is None else "a handoff is already under way"
        elif op == _OP_COMPLETE:
            reason = "no handoff is under way"
        else:
            reason = "it changed and changed back"
        return stale_lease(op, lease, reason)

    async def _call(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run one client call (after making sure of the table) and map errors to store errors.

        Takes a factory, not a coroutine, so nothing is left un-awaited when it raises first.
        """
        if self._closed:
            raise ClosedError(f"{self!r} was closed and cannot be used again")
        where = f"DynamoDB lease table {self._table!r} ({self._client.region}, {self._endpoint})"
        try:
            if not self._ready:
                await self._ensure_table(where)
            return await call()
        except (ConditionFailed, ClosedError):
            raise
        except (EndpointUnreachable, Throttled, ServiceUnavailable) as exc:
            raise StoreUnavailable(f"{where}: could not {what}: {exc}") from exc
        except ResourceNotFound as exc:
            raise StoreError(f"{where}: could not {what}: the table does not exist any more") from exc
        except AccessDenied as exc:
            hint = "" if exc.code != "AccessDeniedException" else f"; {_PERMISSIONS}"
            raise StoreError(f"{where}: could not {what}: {exc}{hint}") from exc
        except AwsError as exc:
            raise StoreError(f"{where}: could not {what}: {exc}") from exc

    async def _ensure_table(self, where: str) -> None:
        async with self._init_lock:  # concurrent first calls share one DescribeTable
            if self._ready:
                return
            try:
                table = await self._client.describe_table(self._table)
            except ResourceNotFound:
                if not self._create_table:
                    raise StoreError(
                        f"{where} does not exist; create it (partition key {KEY}, type S) or allow "
                        "kinesis-butler to (create_table=True, or ?create_table=true in the URL)"
                    ) from None
                table = await self._create()
            verify_key_schema(table, where)
            if table.table_status == "DELETING":
                raise StoreError(f"{where} is being deleted")
            if table.table_status == "CREATING":  # another worker is creating it
                await self._client.wait_for_active(self._table, timeout=self._table_timeout)
            self._ready = True

    async def _create(self) -> TableDescription:
        with contextlib.suppress(ResourceInUse):  # another worker created it a moment ago
            await self._client.create_table(self._table, hash_key=KEY)
        return await self._client.wait_for_active(self._table, timeout=self._table_timeout)

"""The PostgreSQL lease store's SQL: the schema, every statement it runs, and its rows.

Statements are templates: ``{table}`` and ``{meta}`` stand for the quoted table names, filled in
with ``psycopg.sql``; values are ``%(name)s`` parameters (``%s`` for INSERT). Hash keys are
decimal TEXT: 128-bit values overflow BIGINT, and NUMERIC would not keep the string as written.
Sub-sequence numbers are BIGINT: KPL ones pass 2**31. Shard-id sets are sorted arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from kinesis_butler.models import Lease
from kinesis_butler.stores._common import (
    ALL_COLUMNS,
    SELECT_LEASE,
    column_definitions,
    lease_from_row,
    lease_to_row,
)

_COLUMN_TYPES: Final = {
    "lease_key": 'TEXT COLLATE "C" NOT NULL',
    "lease_owner": "TEXT",
    "lease_counter": "BIGINT NOT NULL",
    "checkpoint": "TEXT NOT NULL",
    "checkpoint_sub": "BIGINT NOT NULL",
    "pending_checkpoint": "TEXT",
    "pending_checkpoint_sub": "BIGINT",
    "owner_switches": "BIGINT NOT NULL",
    "parent_shard_ids": "TEXT[] NOT NULL",
    "child_shard_ids": "TEXT[] NOT NULL",
    "starting_hash_key": "TEXT",
    "ending_hash_key": "TEXT",
    "checkpoint_owner": "TEXT",
    "stream_name": "TEXT",
    "shard_id": "TEXT",
}
# Each renew writes a new row version; free space on every page (fillfactor) lets PostgreSQL put
# it on the same page without touching the index (a HOT update): less bloat and less I/O.
CREATE_LEASES: Final = (
    'CREATE TABLE {table} (app TEXT COLLATE "C" NOT NULL, '
    + column_definitions(_COLUMN_TYPES)
    + ", PRIMARY KEY (app, lease_key)) WITH (fillfactor = 50)"
)
CREATE_META: Final = "CREATE TABLE {meta} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
SELECT_VERSION: Final = "SELECT value FROM {meta} WHERE key = 'schema_version'"
INSERT_VERSION: Final = "INSERT INTO {meta} (key, value) VALUES ('schema_version', %s)"
COLUMNS_OF: Final = (
    "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped"
)
_VALUES: Final = ", ".join(["%s"] * len(ALL_COLUMNS))
INSERT: Final = (
    f"INSERT INTO {{table}} (app, {SELECT_LEASE}) VALUES ({_VALUES}) ON CONFLICT DO NOTHING RETURNING 1"  # noqa: S608
)
_KEY: Final = "WHERE app = %(app)s AND lease_key = %(key)s"
# COLLATE "C" again, so the order holds even on a table created by hand with another collation.
LIST: Final = f'SELECT {SELECT_LEASE} FROM {{table}} WHERE app = %(app)s ORDER BY lease_key COLLATE "C"'  # noqa: S608
GET: Final = f"SELECT {SELECT_LEASE} FROM {{table}} {_KEY}"  # noqa: S608
EXPLAIN: Final = f"SELECT lease_counter, lease_owner FROM {{table}} {_KEY}"  # noqa: S608
DELETE: Final = f"DELETE FROM {{table}} {_KEY} AND lease_counter = %(counter)s RETURNING 1"  # noqa: S608


def _fenced_update(assignments: str, *, check_owner: bool, extra: str = "") -> str:
    owner = " AND lease_owner IS NOT DISTINCT FROM %(owner)s" if check_owner else ""
    return (
        f"UPDATE {{table}} SET lease_counter = lease_counter + 1{assignments} "  # noqa: S608 - constants only
        f"{_KEY} AND lease_counter = %(counter)s{owner}{extra} RETURNING {SELECT_LEASE}"
    )


RENEW: Final = _fenced_update("", check_owner=True)
# Right-hand sides see the row as it was, so owner_switches compares against the old owner.
# As in the KCL, taking an unowned lease (or one already ours) is not an owner switch.
TAKE: Final = _fenced_update(
    ", owner_switches = owner_switches + CASE WHEN lease_owner <> %(new_owner)s THEN 1 ELSE 0 END,"
    " lease_owner = %(new_owner)s, checkpoint_owner = NULL",
    check_owner=False,
)
EVICT: Final = _fenced_update(", lease_owner = NULL, checkpoint_owner = NULL", check_owner=True)
_SET_POSITION: Final = ", checkpoint = %(checkpoint)s, checkpoint_sub = %(sub)s, owner_switches = 0"
CHECKPOINT: Final = _fenced_update(
    f"{_SET_POSITION}, pending_checkpoint = %(pending)s, pending_checkpoint_sub = %(pending_sub)s",
    check_owner=True,
)
HANDOFF: Final = _fenced_update(  # the current owner becomes checkpoint_owner, only if none is set
    ", checkpoint_owner = lease_owner, lease_owner = %(new_owner)s, owner_switches = owner_switches + 1",
    check_owner=True,
    extra=" AND lease_owner IS NOT NULL AND checkpoint_owner IS NULL",
)
_IN_HANDOFF: Final = " AND checkpoint_owner IS NOT NULL"
COMPLETE_HANDOFF: Final = _fenced_update(", checkpoint_owner = NULL", check_owner=False, extra=_IN_HANDOFF)
COMPLETE_HANDOFF_WITH_CHECKPOINT: Final = _fenced_update(
    f", checkpoint_owner = NULL{_SET_POSITION}, pending_checkpoint = NULL, pending_checkpoint_sub = NULL",
    check_owner=False,
    extra=_IN_HANDOFF,
)
LINEAGE: Final = _fenced_update(", child_shard_ids = %(children)s", check_owner=False)


def _sorted(ids: frozenset[str]) -> list[str]:
    return sorted(ids)


def to_row(app: str, lease: Lease) -> tuple[object, ...]:
    """The parameters of :data:`INSERT`: ``app``, then one per lease column."""
    return (app, *lease_to_row(lease, _sorted))


def to_lease(row: Sequence[Any]) -> Lease:
    """The lease a row selected with the lease columns holds."""
    return lease_from_row(row, frozenset)

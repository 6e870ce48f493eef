"""The Redis lease store: one hash per lease, a sorted-set index, fencing in Lua.

Keys ``{prefix}:{app}:meta`` (format, schema version), ``{prefix}:{app}:leases`` (lease keys,
all scores 0: byte order = code-point order), ``{prefix}:{app}:lease:<leaseKey>`` (a hash, KCL
names); ``{app}`` is a Redis Cluster hash tag. Each fenced write is ONE atomic Lua script: check
the counter (and owner), apply, increment, return the new hash, or say why not (StaleLease as
worded by the SQLite store). Counters are compared as strings, incremented by ``HINCRBY`` (Lua
numbers are doubles). A write failing with StoreUnavailable may have landed, so writes are never
retried here: the retry would be StaleLease for the caller's own write; reads are retried once.
Durability depends on the server's persistence settings: see docs/stores/redis.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis  # the optional 'redis' extra; open_store says so when missing
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kinesis_butler.errors import (
    ClosedError,
    ConfigError,
    StaleLease,
    StoreError,
    StoreSchemaError,
    StoreUnavailable,
)
from kinesis_butler.models import ExtendedSequenceNumber, Lease

__all__ = ["SCHEMA_VERSION", "RedisLeaseStore"]

SCHEMA_VERSION: Final = 1
"""The version this code writes into the meta hash; any other one is refused."""

# As open_store's rule: no braces or ':', so the name is a clean hash tag and key segment.
_APP_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_PREFIX: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}")  # no braces, no glob characters
_RULE: Final = "at most {} characters: a letter or digit, then letters, digits, '.', '_', '-'{}"
_URL_OPTIONS: Final = ("prefix", "socket_timeout", "socket_connect_timeout", "ssl_ca_certs")
# Error replies of a server that is starting, failing over or overloaded: worth a retry later.
_BUSY: Final = ("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "OOM")
_LIST_CHUNK: Final = 500  # leases per read script: bounds how long one script blocks the server

# KEYS: meta, index[, lease hashes]. ARGV: op, version[, lease key, counter, owner check ('-', '0' no
# owner, '1' ARGV[6]), owner, new owner, n, n fields to delete, pairs to set] (create: key, pairs).
_SCRIPT: Final = """
local meta, index, op, version, FORMAT = KEYS[1], KEYS[2], ARGV[1], ARGV[2], 'kinesis-butler-leases'
local FIELDS = ' leaseKey leaseOwner leaseCounter checkpoint checkpointSubSequenceNumber pendingCheckpoint '
  .. 'pendingCheckpointSubSequenceNumber ownerSwitchesSinceCheckpoint parentShardId childShardIds '
  .. 'startingHashKey endingHashKey checkpointOwner streamName shardId '
local function member(set, word) return string.find(set, ' ' .. word .. ' ', 1, true) end
local function kind(key) return redis.call('TYPE', key)['ok'] end
-- Everything is validated before the first write: Redis does not roll a failed script back.
local function check(key)
  local t = kind(key)
  if t == 'none' then return nil end
  if t ~= 'hash' then return {'schema', key, 'is a ' .. t .. ', not a hash'} end
  local bad = {}
  for _, f in ipairs(redis.call('HKEYS', key)) do if not member(FIELDS, f) then bad[#bad + 1] = f end end
  if #bad > 0 then return {'schema', key, 'has foreign fields: ' .. table.concat(bad, ' ')} end
  for _, f in ipairs({'leaseCounter', 'ownerSwitchesSinceCheckpoint'}) do
    local v = redis.call('HGET', key, f)
    if not v or not string.match(v, '^%-?%d+$') then return {'schema', key, 'has no integer ' .. f} end
  end
end
local meta_type, itype = kind(meta), kind(index)
if meta_type == 'hash' then
  local m = redis.call('HMGET', meta, 'format', 'version')
  if m[1] ~= FORMAT then return {'schema', meta, 'is a hash without our format marker'} end
  if m[2] ~= version then
    return {'schema', meta, 'holds lease schema version ' .. (m[2] or '?') .. ', not ' .. version
      .. ' (written by a newer kinesis-butler?)'}
  end
elseif meta_type ~= 'none' then return {'schema', meta, 'is a ' .. meta_type .. ', not a hash'} end
if not member(' none zset ', itype) then return {'schema', index, 'is a ' .. itype .. ', not a zset'} end
if op == 'members' then return {'ok', redis.call('ZRANGE', index, 0, -1)} end
local out = {'ok'}
for i = 3, #KEYS do
  local err = check(KEYS[i])
  if err then return err end
  if op == 'read' then out[#out + 1] = redis.call('HGETALL', KEYS[i]) end
end
if op == 'read' then return out end
-- Written again when missing, e.g. after a restart without persistence.
if meta_type == 'none' then redis.call('HSET', meta, 'format', FORMAT, 'version', version) end
if op == 'init' then return out end
local lease, key = KEYS[3], ARGV[3]
if op == 'create' then
  if redis.call('EXISTS', lease) == 1 then return {'exists'} end
  redis.call('HSET', lease, unpack(ARGV, 4))
  redis.call('ZADD', index, 0, key)
  return {'created'}
end
local cur = redis.call('HMGET', lease, 'leaseCounter', 'leaseOwner', 'checkpointOwner')
local counter, owner, cp_owner = cur[1], cur[2], cur[3]
local handing_off, completing = op == 'hand off', op == 'complete the handoff of'
if not counter then return {'stale', 'reason', 'the lease does not exist (it was deleted)'} end
if counter ~= ARGV[4] then return {'stale', 'counter', counter} end
if ARGV[5] ~= '-' and owner ~= (ARGV[5] == '1' and ARGV[6]) then return {'stale', 'owner', owner or false} end
if handing_off and not owner then return {'stale', 'reason', 'it has no owner'} end
if handing_off and cp_owner then return {'stale', 'reason', 'a handoff is already under way'} end
if completing and not cp_owner then return {'stale', 'reason', 'no handoff is under way'} end
if op == 'delete' then redis.call('ZREM', index, key); redis.call('DEL', lease); return {'ok', {}} end
-- First, as the only call that can fail (int64 overflow): a failure leaves the hash untouched.
redis.call('HINCRBY', lease, 'leaseCounter', 1)
if handing_off or (op == 'take' and owner and owner ~= ARGV[7]) then
  redis.call('HINCRBY', lease, 'ownerSwitchesSinceCheckpoint', 1)
end
if handing_off then redis.call('HSET', lease, 'checkpointOwner', owner) end
-- The changes that do not depend on the stored lease: fields to delete, then pairs to set.
local n = tonumber(ARGV[8])
if n > 0 then redis.call('HDEL', lease, unpack(ARGV, 9, 8 + n)) end
if #ARGV > 8 + n then redis.call('HSET', lease, unpack(ARGV, 9 + n)) end
return {'ok', redis.call('HGETALL', lease)}
"""
_Fields = dict[str, str | None]
_Changes = Mapping[str, str | None]  # hash field -> new value; None deletes the field
_SHA: Final = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()
# Hash field -> Lease attribute of the optional strings (a None attribute has no field).
_ATTRS: Final = {
    "leaseOwner": "lease_owner",
    "startingHashKey": "starting_hash_key",
    "endingHashKey": "ending_hash_key",
    "checkpointOwner": "checkpoint_owner",
    "streamName": "stream_name",
    "shardId": "shard_id",
}


class RedisLeaseStore:
    """A :class:`~kinesis_butler.stores.LeaseStore` in Redis (5.0 or newer).

    A store made from a URL owns its connection pool and never retries a write; a client passed
    in keeps its own settings (retries, timeouts) and stays open after ``aclose()``.

    Args:
        client_or_url: a ``redis.asyncio.Redis`` client, or a URL
            ``redis[s]://[[user]:password@]host[:port][/db][?prefix=...]``. The URL may set
            ``socket_timeout`` and ``socket_connect_timeout`` (seconds, default 2): a hung
            server then fails a call with StoreUnavailable instead of hanging the worker.
        app: the application whose leases this store holds (as :func:`open_store` accepts).
        prefix: the first key segment (default ``kb``, or the URL's ``?prefix=``); stores with
            different prefixes never see each other's leases.

    Raises:
        ConfigError: a malformed URL (the message masks the password), a bad app or prefix.
    """

    def __init__(self, client_or_url: aioredis.Redis | str, app: str, *, prefix: str | None = None) -> None:
        if not _APP_NAME.fullmatch(app):
            raise ConfigError(f"invalid application name {app!r}: " + _RULE.format(255, ""))
        self._owns_client = isinstance(client_or_url, str)
        if isinstance(client_or_url, str):
            options = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0} | _parse_url(client_or_url)
            url_prefix = cast("str | None", options.pop("prefix", None))
            if None not in (prefix, url_prefix) and prefix != url_prefix:
                raise ConfigError(f"two prefixes for the Redis lease store: {prefix!r} and {url_prefix!r}")
            prefix = prefix or url_prefix
            # No retries (see the module docstring); RESP2 replies are what this module parses.
            self._client = aioredis.Redis(**options, retry=Retry(NoBackoff(), 0), protocol=2)  # type: ignore[arg-type]
        else:
            self._client, options = client_or_url, client_or_url.connection_pool.connection_kwargs
        self._password = str(options.get("password") or "")
        host = str(options.get("host", "localhost"))
        self._address = f"{f'[{host}]' if ':' in host else host}:{options.get('port')}/{options.get('db', 0)}"
        self._app, self._prefix = app, prefix or "kb"
        if not _PREFIX.fullmatch(self._prefix):
            raise ConfigError(
                f"invalid Redis key prefix {self._prefix!r}: " + _RULE.format(100, ", ':', '/'")
            )
        base = f"{self._prefix}:{{{app}}}:"
        self._meta_key, self._index_key, self._lease_prefix = base + "meta", base + "leases", base + "lease:"
        self._closed = False

    @classmethod
    def from_url(cls, url: str, app: str) -> RedisLeaseStore:
        """A store for ``app`` at a ``redis://`` or ``rediss://`` URL (see the class docstring)."""
        return cls(url, app)

    @property
    def app(self) -> str:
        """The application whose leases this store holds."""
        return self._app

    def lease_redis_key(self, lease_key: str) -> str:
        """The Redis key of lease ``lease_key``'s hash."""
        return self._lease_prefix + lease_key

    def __repr__(self) -> str:
        return f"RedisLeaseStore(address={self._address!r}, app={self._app!r}, prefix={self._prefix!r})"

    async def initialize(self) -> None:
        """Write the meta hash if missing; verify it and the index if present.

        Raises:
            StoreSchemaError: the keys hold something that is not ours, or another schema version.
        """
        await self._script("initialize", ["init"], idempotent=True)

    async def list_leases(self) -> list[Lease]:
        """Every lease of this application, in lease-key order."""
        _, reply = await self._script("list leases", ["members"], idempotent=True)
        keys = sorted(_text(member) for member in reply[1])
        leases: list[Lease] = []
        for chunk in (keys[i : i + _LIST_CHUNK] for i in range(0, len(keys), _LIST_CHUNK)):
            _, hashes = await self._script("list leases", ["read"], chunk, idempotent=True)
            # A lease deleted between the two scripts comes back empty: it is skipped.
            leases += [self._to_lease(k, raw) for k, raw in zip(chunk, hashes[1:], strict=True) if raw]
        return leases

    async def get_lease(self, lease_key: str) -> Lease | None:
        """One lease, or None."""
        _, reply = await self._script(f"read lease {lease_key!r}", ["read"], [lease_key], idempotent=True)
        return self._to_lease(lease_key, reply[1]) if reply[1] else None

    async def create_lease_if_absent(self, lease: Lease) -> bool:
        """Insert ``lease`` unless its key exists. True if it was created."""
        key, pairs = lease.lease_key, [item for pair in _to_fields(lease).items() for item in pair]
        status, _ = await self._script(f"create lease {key!r}", ["create", key, *pairs], [key])
        return status == "created"

    async def renew_lease(self, lease: Lease) -> Lease:
        """counter+1; requires the stored counter and owner to match ``lease``."""
        return await self._fenced("renew", lease, {}, check_owner=True)

    async def take_lease(self, lease: Lease, owner: str) -> Lease:
        """Become the owner; requires the stored counter to match ``lease``."""
        changes = {"leaseOwner": owner, "checkpointOwner": None}  # the script counts the switch
        return await self._fenced("take", lease, changes)

    async def evict_lease(self, lease: Lease) -> Lease:
        """Release the lease; requires the stored counter and owner to match ``lease``."""
        changes = {"leaseOwner": None, "checkpointOwner": None}
        return await self._fenced("evict", lease, changes, check_owner=True)

    async def checkpoint(
        self,
        lease: Lease,
        checkpoint: ExtendedSequenceNumber,
        *,
        pending_checkpoint: ExtendedSequenceNumber | None = None,
    ) -> Lease:
        """Write the checkpoint; requires the stored counter and owner to match ``lease``."""
        changes = _positions(checkpoint, pending_checkpoint)
        return await self._fenced("checkpoint", lease, changes, check_owner=True)

    async def initiate_handoff(self, lease: Lease, new_owner: str) -> Lease:
        """Planned move to ``new_owner``; see :meth:`LeaseStore.initiate_handoff`."""
        changes = {"leaseOwner": new_owner}  # the script moves the old owner to checkpointOwner
        return await self._fenced("hand off", lease, changes, check_owner=True)

    async def complete_handoff(self, lease: Lease, checkpoint: ExtendedSequenceNumber | None) -> Lease:
        """The old owner's final write; see :meth:`LeaseStore.complete_handoff`."""
        changes = {"checkpointOwner": None} | ({} if checkpoint is None else _positions(checkpoint, None))
        return await self._fenced("complete the handoff of", lease, changes)

    async def update_lineage(self, lease: Lease, *, child_shard_ids: frozenset[str]) -> Lease:
        """Record the children of a shard; requires the stored counter to match ``lease``."""
        changes = {"childShardIds": json.dumps(sorted(child_shard_ids))}
        return await self._fenced("update lineage of", lease, changes)

    async def delete_lease(self, lease: Lease) -> None:
        """Delete the lease; requires the stored counter to match ``lease``."""
        await self._fenced("delete", lease, {})

    async def aclose(self) -> None:
        """Close the connection pool if this store made it. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._owns_client:
                await self._client.aclose()

    async def _fenced(self, op: str, lease: Lease, changes: _Changes, *, check_owner: bool = False) -> Lease:
        """One fenced write; ``changes`` maps hash fields to new values, None deleting one."""
        key, counter, owner = lease.lease_key, lease.lease_counter, lease.lease_owner
        owner_check = "-" if not check_owner else "0" if owner is None else "1"
        unset = [field for field, value in changes.items() if value is None]
        pairs = [item for field, value in changes.items() if value is not None for item in (field, value)]
        new_owner = changes.get("leaseOwner") or ""  # for take: is it an owner switch?
        args = [op, key, counter, owner_check, owner or "", new_owner, len(unset), *unset, *pairs]
        status, reply = await self._script(f"{op} lease {key!r}", args, [key])
        if status == "ok":
            return self._to_lease(key, reply[1]) if reply[1] else lease
        why, detail = _text(reply[1]), None if reply[2] is None else _text(reply[2])
        if why == "counter":
            reason = f"its counter moved on to {detail}"
        elif why == "owner":
            reason = f"it is owned by {detail!r}, not {owner!r}"
        else:
            reason = str(detail)
        message = f"cannot {op} lease {key!r} at counter {counter}: {reason}"
        raise StaleLease(message, lease_key=key, expected_counter=counter)

    async def _script(
        self, what: str, args: Sequence[object], lease_keys: Sequence[str] = (), *, idempotent: bool = False
    ) -> tuple[str, list[Any]]:
        """Run the script on the lease hashes of ``lease_keys``: (status, reply), or our exception."""
        if self._closed:
            raise ClosedError(f"{self!r} was closed and cannot be used again")
        keys = [self._meta_key, self._index_key, *map(self.lease_redis_key, lease_keys)]
        argv = [args[0], SCHEMA_VERSION, *args[1:]]
        try:
            try:
                reply = await self._eval(keys, argv)
            except rexc.ConnectionError:
                # A pooled connection the server closed (restart, failover) fails once even when
                # the server is back. Only reads and init may be repeated: a write may have landed.
                if not idempotent or self._closed:
                    raise
                reply = await self._eval(keys, argv)
        except (rexc.RedisError, OSError) as exc:
            if self._closed:
                raise ClosedError(f"{self!r} was closed while it tried to {what}") from exc
            raise self._error(exc, what) from exc
        status = _text(reply[0]) if isinstance(reply, list) and reply else ""
        if status == "schema":
            key, problem = _text(reply[1], "replace"), _text(reply[2], "replace")
            raise StoreSchemaError(f"{self}: key {key!r} {problem}; use another prefix or database")
        if status not in ("ok", "stale", "created", "exists"):  # never, unless the script is broken
            raise StoreError(f"Redis lease store {self._address}: unexpected reply to {what}: {reply!r}")
        return status, reply

    async def _eval(self, keys: list[str], args: list[object]) -> Any:
        try:
            return await self._client.evalsha(_SHA, len(keys), *keys, *args)  # type: ignore[arg-type]
        except rexc.NoScriptError:
            # A new or restarted server: load the script; the server caches it from then on.
            await self._client.script_load(_SCRIPT)
            return await self._client.evalsha(_SHA, len(keys), *keys, *args)  # type: ignore[arg-type]

    def _error(self, exc: BaseException, what: str) -> Exception:
        """Our exception for a client error; never names the password."""
        detail = str(exc) or type(exc).__name__
        detail = detail.replace(self._password, "***") if self._password else detail
        message = f"Redis lease store {self._address}: could not {what}: {detail}"
        if isinstance(exc, (rexc.AuthenticationError, rexc.AuthorizationError, rexc.NoPermissionError)):
            return ConfigError(f"{message} (check the user name and password of the store URL)")
        if isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError, rexc.ReadOnlyError)):
            return StoreUnavailable(message)
        if isinstance(exc, rexc.ResponseError) and detail.startswith("WRONGTYPE"):
            return StoreSchemaError(f"{message}; the keys hold data that is not kinesis-butler's")
        if isinstance(exc, rexc.ResponseError) and detail.startswith(_BUSY):
            return StoreUnavailable(message)
        return StoreError(message)

    def _to_lease(self, lease_key: str, raw: list[Any]) -> Lease:
        try:
            fields = {_text(raw[i]): _text(raw[i + 1]) for i in range(0, len(raw), 2)}
            if fields["leaseKey"] != lease_key:
                raise ValueError(f"it holds leaseKey {fields['leaseKey']!r}")  # noqa: TRY301
            pending = fields.get("pendingCheckpoint")
            pending_sub = int(fields.get("pendingCheckpointSubSequenceNumber", "0"))
            return Lease(
                lease_key=lease_key,
                lease_counter=int(fields["leaseCounter"]),
                checkpoint=ExtendedSequenceNumber(
                    fields["checkpoint"], int(fields["checkpointSubSequenceNumber"])
                ),
                pending_checkpoint=None if pending is None else ExtendedSequenceNumber(pending, pending_sub),
                owner_switches_since_checkpoint=int(fields["ownerSwitchesSinceCheckpoint"]),
                parent_shard_ids=_ids(fields["parentShardId"]),
                child_shard_ids=_ids(fields["childShardIds"]),
                **{attr: fields.get(field) for field, attr in _ATTRS.items()},
            )
        except (KeyError, ValueError, TypeError, ConfigError) as exc:
            raise StoreSchemaError(
                f"Redis lease store {self._address}: key {self.lease_redis_key(lease_key)!r} is not a valid "
                f"kinesis-butler lease ({type(exc).__name__}: {exc}); use another prefix or database"
            ) from exc


def _parse_url(url: str) -> dict[str, object]:
    """The client options a store URL names; ConfigError (password masked) if malformed."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    # Shown with all before the last '@' masked and no query (it may hold secrets); the reasons
    # below never quote a part of the URL that could hold a piece of the password.
    shown = (f"{scheme}{sep}***{rest[at:]}" if at != -1 else url).partition("?")[0]

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"invalid Redis lease store URL {shown!r}: {reason}")

    if any(char in rest[: max(at, 0)] for char in "/?#"):
        raise bad("percent-encode '/', '?', '#' and '@' in the user name, password and options")
    try:
        parts = urlsplit(url)
        options: dict[str, object] = {"host": parts.hostname, "port": parts.port or 6379}
    except ValueError:
        raise bad("the port must be a number from 1 to 65535") from None
    if parts.scheme.lower() not in ("redis", "rediss") or not parts.hostname:
        raise bad("expected redis://host[:port][/db] or rediss:// (TLS)")
    if not (db := parts.path.strip("/") or "0").isdigit():
        raise bad("the path must be a database number, e.g. /0")
    options |= {"db": int(db), "ssl": parts.scheme.lower() == "rediss"}
    options["username"] = unquote(parts.username) if parts.username else None
    options["password"] = unquote(parts.password) if parts.password else None
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _URL_OPTIONS:
            raise bad(f"unknown option {name!r}; supported: {', '.join(_URL_OPTIONS)}")
        options[name] = value
        if name.startswith("socket"):
            if not value.replace(".", "", 1).isdigit() or float(value) <= 0:
                raise bad(f"{name} must be a positive number of seconds, not {value!r}")
            options[name] = float(value)
    return options


def _text(value: bytes | str, errors: str = "strict") -> str:
    """Replies are bytes unless the client decodes them; messages pass ``errors="replace"``."""
    return value.decode(errors=errors) if isinstance(value, bytes) else value


def _positions(checkpoint: ExtendedSequenceNumber, pending: ExtendedSequenceNumber | None) -> _Fields:
    """A checkpoint's fields; writing one resets the owner switches and replaces the pending one."""
    return {
        "checkpoint": checkpoint.sequence,
        "checkpointSubSequenceNumber": str(checkpoint.sub_sequence),
        "ownerSwitchesSinceCheckpoint": "0",
        "pendingCheckpoint": None if pending is None else pending.sequence,
        "pendingCheckpointSubSequenceNumber": None if pending is None else str(pending.sub_sequence),
    }


def _to_fields(lease: Lease) -> dict[str, str]:
    """The hash of a lease: None fields are absent, shard-id sets are sorted JSON arrays."""
    fields = _positions(lease.checkpoint, lease.pending_checkpoint) | {
        "leaseKey": lease.lease_key,
        "leaseCounter": str(lease.lease_counter),
        "ownerSwitchesSinceCheckpoint": str(lease.owner_switches_since_checkpoint),
        "parentShardId": json.dumps(sorted(lease.parent_shard_ids)),
        "childShardIds": json.dumps(sorted(lease.child_shard_ids)),
    }
    fields |= {field: getattr(lease, attr) for field, attr in _ATTRS.items()}
    return {field: value for field, value in fields.items() if value is not None}


def _ids(text: str) -> frozenset[str]:
    if not isinstance(ids := json.loads(text), list) or not all(isinstance(i, str) for i in ids):
        raise TypeError(f"expected a JSON array of shard ids, got {text!r}")
    return frozenset(ids)

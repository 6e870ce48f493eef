"""Shard discovery: the shard lineage graph and the sync that creates leases for new shards.

Which shards get leases, and where they start (the KCL's rules, simplified):

* a shard whose parent has a lease (or is itself being created) is a descendant: it starts at
  TRIM_HORIZON (AT_TIMESTAMP when the application starts at a timestamp), and only after
  every parent reached SHARD_END;
* any other shard starts at the application's initial position, except that with LATEST a
  closed shard is skipped (there is nothing after its end).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from kinesis_butler.models import (
    AT_TIMESTAMP,
    TRIM_HORIZON,
    InitialPosition,
    Lease,
    Shard,
    StartPosition,
)
from kinesis_butler.stores.base import LeaseStore

__all__ = ["ShardGraph", "ShardLister", "new_leases", "sync_shards"]

log = logging.getLogger("kinesis_butler.discovery")


class ShardLister(Protocol):
    async def list_shards(self, stream: str) -> list[Shard]: ...


@dataclasses.dataclass(frozen=True)
class ShardGraph:
    """The shards of one stream and their split/merge lineage."""

    shards: dict[str, Shard]

    @classmethod
    def of(cls, shards: Iterable[Shard]) -> ShardGraph:
        return cls({shard.shard_id: shard for shard in shards})

    def children(self, shard_id: str) -> list[str]:
        return sorted(s.shard_id for s in self.shards.values() if shard_id in s.parent_ids)

    def topological(self) -> list[Shard]:
        """Parents before children (shards whose parents were trimmed count as roots)."""
        ordered: list[Shard] = []
        done: set[str] = set()

        def visit(shard: Shard) -> None:
            if shard.shard_id in done:
                return
            done.add(shard.shard_id)
            for parent in shard.parent_ids:
                if parent in self.shards:
                    visit(self.shards[parent])
            ordered.append(shard)

        for shard_id in sorted(self.shards):
            visit(self.shards[shard_id])
        return ordered


def new_leases(
    shards: Sequence[Shard],
    existing: Iterable[str],
    position: StartPosition,
    *,
    stream_identifier: str | None = None,
) -> list[Lease]:
    """The leases to create for ``shards``, parents first. Pure.

    Args:
        shards: the stream's shards, as ListShards returned them.
        existing: the lease keys already in the store.
        position: where shards without leased ancestors start.
        stream_identifier: in multi-stream mode, ``account:stream:creationEpoch``: lease keys
            become ``identifier:shardId`` (the KCL's multi-stream layout). None for one stream.
    """
    graph = ShardGraph.of(shards)
    prefix = f"{stream_identifier}:" if stream_identifier else ""
    leased = {key[len(prefix) :] for key in existing if key.startswith(prefix)} if prefix else set(existing)
    descendant_start = AT_TIMESTAMP if position.kind is InitialPosition.AT_TIMESTAMP else TRIM_HORIZON
    created: list[Lease] = []
    for shard in graph.topological():
        if shard.shard_id in leased:
            continue
        leased_parents = frozenset(p for p in shard.parent_ids if p in leased)
        if leased_parents:
            checkpoint = descendant_start
        elif position.kind is InitialPosition.LATEST and shard.is_closed:
            continue
        else:
            checkpoint = position.sentinel
        created.append(
            Lease(
                lease_key=prefix + shard.shard_id,
                checkpoint=checkpoint,
                parent_shard_ids=frozenset(shard.parent_ids),
                starting_hash_key=str(shard.starting_hash_key),
                ending_hash_key=str(shard.ending_hash_key),
                stream_name=stream_identifier,
                shard_id=shard.shard_id,
            )
        )
        leased.add(shard.shard_id)
    return created


async def sync_shards(
    lister: ShardLister,
    store: LeaseStore,
    stream: str,
    position: StartPosition,
    *,
    stream_identifier: str | None = None,
) -> list[Lease]:
    """List the stream's shards and create leases for the new ones. Returns those created."""
    shards = await lister.list_shards(stream)
    existing = [lease.lease_key for lease in await store.list_leases()]
    created: list[Lease] = []
    for lease in new_leases(shards, existing, position, stream_identifier=stream_identifier):
        if await store.create_lease_if_absent(lease):
            log.info("created lease %s at %s", lease.lease_key, lease.checkpoint)
            created.append(lease)
    return created

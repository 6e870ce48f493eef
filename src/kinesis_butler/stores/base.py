"""The lease store seam: where leases and checkpoints live.

A store is bound to one application (the KCL's lease table). Every mutating call is
*fenced*: it names the ``lease_counter`` the caller last saw and succeeds only if the stored
counter still equals it; it then increments the counter and returns the lease as stored.
When the condition fails the store raises :class:`~kinesis_butler.errors.StaleLease`; when
the store cannot be reached it raises :class:`~kinesis_butler.errors.StoreUnavailable`.

Nothing backend-specific (capacity, connection pools, table names) appears here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kinesis_butler.models import ExtendedSequenceNumber, Lease


@runtime_checkable
class LeaseStore(Protocol):
    """Leases of one application. All methods are coroutine-safe."""

    async def initialize(self) -> None:
        """Create the schema if it is missing; verify it if it exists (StoreSchemaError if foreign)."""

    async def list_leases(self) -> list[Lease]:
        """Every lease of this application, in lease-key order."""

    async def get_lease(self, lease_key: str) -> Lease | None:
        """One lease, or None."""

    async def create_lease_if_absent(self, lease: Lease) -> bool:
        """Insert ``lease`` unless its key exists. True if it was created."""

    async def renew_lease(self, lease: Lease) -> Lease:
        """counter+1. Requires the stored counter == ``lease.lease_counter`` and the same owner."""

    async def take_lease(self, lease: Lease, owner: str) -> Lease:
        """Become the owner: counter+1, owner=``owner``, checkpoint_owner cleared,
        owner_switches+1 if the owner changes. Requires the stored counter == ``lease.lease_counter``."""

    async def evict_lease(self, lease: Lease) -> Lease:
        """Release: owner=None, counter+1, checkpoint_owner cleared.
        Requires the stored counter and owner to match ``lease``."""

    async def checkpoint(
        self,
        lease: Lease,
        checkpoint: ExtendedSequenceNumber,
        *,
        pending_checkpoint: ExtendedSequenceNumber | None = None,
    ) -> Lease:
        """Write the checkpoint: counter+1, owner_switches=0, pending replaced.
        Requires the stored counter and owner to match ``lease``."""

    async def initiate_handoff(self, lease: Lease, new_owner: str) -> Lease:
        """Start a planned move (graceful handoff, KCL 3 style): lease_owner=``new_owner``,
        checkpoint_owner=the current owner, counter+1. Requires the stored counter and owner
        to match ``lease``, an owner, and no checkpoint_owner.

        Until the old owner completes the handoff, nobody else writes the lease: the new owner
        waits (and takes it over only if the counter stays unchanged for the failover time,
        i.e. the old owner died), so the old owner's final checkpoint cannot be fenced out."""

    async def complete_handoff(self, lease: Lease, checkpoint: ExtendedSequenceNumber | None) -> Lease:
        """The old owner's last write: the final checkpoint (if given; owner_switches=0),
        checkpoint_owner cleared, counter+1. Requires the stored counter to match ``lease``
        and ``lease.checkpoint_owner`` to be set; the new owner may start after this."""

    async def update_lineage(self, lease: Lease, *, child_shard_ids: frozenset[str]) -> Lease:
        """Record the children of a shard. Fenced like the other writes."""

    async def delete_lease(self, lease: Lease) -> None:
        """Delete the lease. Requires the stored counter to match."""

    async def aclose(self) -> None:
        """Release connections. Idempotent."""

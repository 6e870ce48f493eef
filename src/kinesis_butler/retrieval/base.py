"""The retrieval seam: a RecordSource delivers one shard's records in order, batch by batch.

Implementations: polling (GetRecords), and later enhanced fan-out (SubscribeToShard). The
shard loop does not know which one it drives.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from kinesis_butler.models import ExtendedSequenceNumber, Record

__all__ = ["Batch", "RecordSource"]


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """Records of one shard, in order. ``shard_end`` is set on the last batch of a closed shard."""

    records: list[Record]
    millis_behind_latest: int | None = None
    shard_end: bool = False
    child_shard_ids: tuple[str, ...] = ()
    child_parents: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (child, its parents) at shard end
    child_hash_ranges: tuple[tuple[str, str, str], ...] = ()  # (child, first, last hash key) if known


class RecordSource(Protocol):
    """One shard's records from a starting position."""

    async def start(self, checkpoint: ExtendedSequenceNumber) -> None:
        """Begin after ``checkpoint`` (or at the sentinel it names)."""

    async def next_batch(self) -> Batch:
        """The next non-empty batch, or the final batch with ``shard_end`` set. Waits as needed."""

    async def aclose(self) -> None:
        """Stop fetching and release resources. Idempotent."""

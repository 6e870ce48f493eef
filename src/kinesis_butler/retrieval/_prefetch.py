"""The machinery every record source shares: one background task fills a small queue of batches
whose bytes stay charged to the process budget until the processor asks for the next batch.

A source subclasses :class:`PrefetchingSource` and implements ``_produce`` (fetch and
:meth:`~PrefetchingSource._offer` batches until the shard ends); an error escaping it reaches the
consumer from ``next_batch``, unless ``_replacement`` names another source to continue with
(fan-out falling back to polling).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from kinesis_butler.models import ExtendedSequenceNumber, Record
from kinesis_butler.retrieval.base import Batch, RecordSource
from kinesis_butler.retrieval.budget import ByteBudget

__all__ = ["ChildShardInfo", "PrefetchingSource", "end_of_shard"]


class ChildShardInfo(Protocol):
    @property
    def shard_id(self) -> str: ...

    @property
    def parent_shards(self) -> Sequence[str]: ...


def end_of_shard(
    records: list[Record], millis_behind: int | None, children: Sequence[ChildShardInfo]
) -> Batch:
    """The last batch of a closed shard, naming its children, their parents and (when the
    answer has them) their hash key ranges, so child leases are written complete."""
    ranges = []
    for child in children:
        key_range = getattr(child, "hash_key_range", None)
        if key_range is not None:
            ranges.append((child.shard_id, str(key_range.starting_hash_key), str(key_range.ending_hash_key)))
    return Batch(
        records,
        millis_behind,
        shard_end=True,
        child_shard_ids=tuple(child.shard_id for child in children),
        child_parents=tuple((child.shard_id, tuple(child.parent_shards)) for child in children),
        child_hash_ranges=tuple(ranges),
    )


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class PrefetchingSource:
    """A RecordSource whose batches are produced by a background task (see the module docstring)."""

    def __init__(self, shard_id: str, budget: ByteBudget, *, depth: int = 1) -> None:
        self._shard_id = shard_id
        self._budget = budget
        self._queue: asyncio.Queue[tuple[Batch, int] | _Failed | RecordSource] = asyncio.Queue(
            maxsize=max(1, depth)
        )
        self._task: asyncio.Task[None] | None = None
        self._held = 0  # budget bytes of the batch the processor has now
        self._registered = False
        self._delegate: RecordSource | None = None
        self._pending: RecordSource | None = None

    async def _produce(self, checkpoint: ExtendedSequenceNumber) -> None:
        raise NotImplementedError

    async def _replacement(
        self, error: BaseException, checkpoint: ExtendedSequenceNumber
    ) -> RecordSource | None:
        """A started source to continue with after ``error``, or None to report the error."""
        del error, checkpoint
        return None

    async def start(self, checkpoint: ExtendedSequenceNumber) -> None:
        if self._task is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._budget.register()
        self._registered = True
        self._task = asyncio.create_task(self._run(checkpoint), name=f"fetch-{self._shard_id}")

    async def _run(self, checkpoint: ExtendedSequenceNumber) -> None:
        try:
            await self._produce(checkpoint)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            replacement = await self._replacement(exc, checkpoint)
            if replacement is None:
                await self._queue.put(_Failed(exc))
                return
            self._pending = replacement  # closed by aclose() if we are cancelled before handing it over
            await self._queue.put(replacement)
            self._pending = None

    async def _offer(self, batch: Batch, cost: int) -> None:
        """Queue a batch whose ``cost`` bytes are already charged (returned if cancelled here)."""
        try:
            await self._queue.put((batch, cost))
        except BaseException:
            self._budget.release(cost)
            raise

    async def next_batch(self) -> Batch:
        if self._task is None:
            raise RuntimeError(f"{type(self).__name__}.next_batch() before start()")
        if self._delegate is not None:
            return await self._delegate.next_batch()
        self._budget.release(self._held)
        self._held = 0
        item = await self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        if not isinstance(item, tuple):
            self._delegate = item
            return await item.next_batch()
        batch, self._held = item
        return batch

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # gather, not suppress(CancelledError): a cancellation of our caller still propagates
            await asyncio.gather(task, return_exceptions=True)
        held, self._held = self._held, 0
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, tuple):
                held += item[1]
            elif not isinstance(item, _Failed):
                self._delegate = item
        self._budget.release(held)
        if self._registered:
            self._registered = False
            self._budget.unregister()
        pending, self._pending = self._pending, None
        if pending is not None and pending is not self._delegate:
            await pending.aclose()
        if self._delegate is not None:
            await self._delegate.aclose()

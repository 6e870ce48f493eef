"""The processor behind ``async for record in consumer``: batches go to a bounded queue and the
user checkpoints explicitly, so the library must never checkpoint on the user's behalf."""

from __future__ import annotations

import asyncio
from typing import Any

from kinesis_butler.models import Record
from kinesis_butler.processor import ProcessRecordsInput, RecordProcessorBase, ShardEndedInput

__all__ = ["IteratorProcessor", "first_of"]


async def first_of(*awaitables: asyncio.Future[Any]) -> None:
    """Wait for the first to finish; cancel (and reap) the others."""
    try:
        await asyncio.wait(awaitables, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in awaitables:
            if not waiting.done():
                waiting.cancel()
        await asyncio.gather(*awaitables, return_exceptions=True)


class IteratorProcessor(RecordProcessorBase):
    """Feeds ``async for``: each batch is queued; the user checkpoints explicitly."""

    explicit_checkpoints = True  # the lifecycle must not write SHARD_END over unconfirmed records

    def __init__(self, queue: asyncio.Queue[list[Record]], closing: asyncio.Event) -> None:
        self._queue = queue
        self._closing = closing

    async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
        # On shutdown a full queue must not hold the shard hostage: the batch is dropped
        # unconsumed (and uncheckpointed), so whoever takes the shard next reads it again.
        put = asyncio.ensure_future(self._queue.put(list(process_records_input.records)))
        await first_of(put, asyncio.ensure_future(self._closing.wait()))

    async def shard_ended(self, shard_ended_input: ShardEndedInput) -> None:
        # SHARD_END may be written only once the user confirmed every record of the shard.
        checkpointer = shard_ended_input.checkpointer
        waiter = getattr(checkpointer, "wait_caught_up", None)
        if waiter is not None:
            await first_of(asyncio.ensure_future(waiter()), asyncio.ensure_future(self._closing.wait()))

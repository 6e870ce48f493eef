"""Polling retrieval: GetRecords in a loop, one background fetch task per shard.

Pacing: never two GetRecords on a shard closer than ``min_poll_interval`` (the 5 calls per
second quota); when caught up (an empty answer, or MillisBehindLatest 0) wait
``idle_poll_interval``. Throttling backs off with full jitter instead of the KCL's fixed
sleep. An expired iterator is replaced from the last delivered position, so nothing is
skipped or repeated. One batch is prefetched while the processor works on the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Protocol

from msgspec.structs import force_setattr

from kinesis_butler.config import ConsumerConfig
from kinesis_butler.errors import ButlerError, ExpiredIterator, Throttled
from kinesis_butler.models import ExtendedSequenceNumber, Record, StartPosition
from kinesis_butler.retrieval.base import Batch

__all__ = ["PollingSource", "ShardReader"]

log = logging.getLogger("kinesis_butler.retrieval")


class _ChildShard(Protocol):
    @property
    def shard_id(self) -> str: ...

    @property
    def parent_shards(self) -> Sequence[str]: ...


class _GetRecordsResult(Protocol):
    # Read-only properties, so that any result type with these fields conforms.
    @property
    def records(self) -> list[Record]: ...

    @property
    def next_shard_iterator(self) -> str | None: ...

    @property
    def millis_behind_latest(self) -> int | None: ...

    @property
    def child_shards(self) -> Sequence[_ChildShard]: ...


class ShardReader(Protocol):
    """The two Kinesis calls polling needs (KinesisClient satisfies it)."""

    async def get_shard_iterator(
        self,
        stream: str,
        shard_id: str,
        iterator_type: str,
        *,
        sequence_number: str | None = None,
        timestamp: float | None = None,
    ) -> str: ...

    async def get_records(self, shard_iterator: str, *, limit: int | None = None) -> _GetRecordsResult: ...


class _Failed:
    """An error the fetch task hands to the consumer side of the queue."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class PollingSource:
    """Reads one shard by polling. See the module docstring for pacing and recovery."""

    def __init__(
        self,
        client: ShardReader,
        stream: str,
        shard_id: str,
        config: ConsumerConfig,
        start_position: StartPosition,
        *,
        prefetch: int = 1,
    ) -> None:
        self._client = client
        self._stream = stream
        self._shard_id = shard_id
        self._config = config
        self._start_position = start_position
        self._queue: asyncio.Queue[Batch | _Failed] = asyncio.Queue(maxsize=max(1, prefetch))
        self._task: asyncio.Task[None] | None = None
        self._skip_through: tuple[int, int] | None = None
        self._last_fetched: ExtendedSequenceNumber | None = None
        self._last_call = 0.0

    async def start(self, checkpoint: ExtendedSequenceNumber) -> None:
        if self._task is not None:
            raise RuntimeError("PollingSource.start() called twice")
        self._task = asyncio.create_task(self._fetch_loop(checkpoint), name=f"poll-{self._shard_id}")

    async def next_batch(self) -> Batch:
        if self._task is None:
            raise RuntimeError("PollingSource.next_batch() before start()")
        item = await self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the fetch task ----------------------------------------------------------------------
    async def _iterator_at(self, position: ExtendedSequenceNumber) -> str:
        """An iterator at ``position``, retrying throttling and transient failures (its own
        quota is 5 calls per second per shard); non-retriable errors propagate."""
        attempt = 0
        while True:
            try:
                return await self._get_iterator(position)
            except ButlerError as exc:
                if not exc.retriable:
                    raise
                attempt += 1
                delay = self._backoff(attempt)
                log.warning(
                    "shard %s: GetShardIterator failed (retry in %.1f s): %s", self._shard_id, delay, exc
                )
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(5.0, self._config.min_poll_interval * 2**attempt))

    async def _get_iterator(self, position: ExtendedSequenceNumber) -> str:
        kwargs: dict[str, object] = {}
        if position.sequence == "TRIM_HORIZON":
            kind = "TRIM_HORIZON"
        elif position.sequence == "LATEST":
            kind = "LATEST"
        elif position.sequence == "AT_TIMESTAMP":
            kind = "AT_TIMESTAMP"
            kwargs["timestamp"] = self._start_position.timestamp or 0.0
        else:
            # AT (not AFTER) the checkpointed record, then drop what is <= the checkpoint: this
            # is what lets a restart resume inside a KPL aggregated record.
            kind = "AT_SEQUENCE_NUMBER"
            kwargs["sequence_number"] = position.sequence
            self._skip_through = (int(position.sequence), position.sub_sequence)
        return await self._client.get_shard_iterator(
            self._stream,
            self._shard_id,
            kind,
            **kwargs,  # type: ignore[arg-type]
        )

    async def _pace(self, delay: float) -> None:
        wait = self._last_call + delay - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _fetch_loop(self, checkpoint: ExtendedSequenceNumber) -> None:
        try:
            await self._fetch_forever(checkpoint)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await self._queue.put(_Failed(exc))

    async def _fetch_forever(self, checkpoint: ExtendedSequenceNumber) -> None:
        iterator: str | None = await self._iterator_at(checkpoint)
        throttled = 0
        delay = 0.0
        while iterator is not None:
            await self._pace(delay)
            self._last_call = time.monotonic()
            try:
                result = await self._client.get_records(iterator, limit=self._config.max_records)
            except ExpiredIterator:
                resume = self._last_fetched or checkpoint
                log.info("shard %s: iterator expired, resuming after %s", self._shard_id, resume)
                iterator = await self._iterator_at(resume)
                delay = 0.0
                continue
            except Throttled:
                throttled += 1
                delay = self._backoff(throttled)
                log.debug("shard %s: throttled, backing off %.2f s", self._shard_id, delay)
                continue
            except ButlerError as exc:
                if not exc.retriable:
                    raise
                throttled += 1
                delay = self._backoff(throttled)
                log.warning(
                    "shard %s: GetRecords failed (will retry in %.1f s): %s", self._shard_id, delay, exc
                )
                continue
            throttled = 0
            records = self._deliverable(result.records)
            iterator = result.next_shard_iterator
            if iterator is None:
                children = result.child_shards
                await self._queue.put(
                    Batch(
                        records,
                        result.millis_behind_latest,
                        shard_end=True,
                        child_shard_ids=tuple(child.shard_id for child in children),
                        child_parents=tuple((c.shard_id, tuple(c.parent_shards)) for c in children),
                    )
                )
                return
            if records:
                await self._queue.put(Batch(records, result.millis_behind_latest))
            caught_up = not result.records or result.millis_behind_latest == 0
            delay = self._config.idle_poll_interval if caught_up else self._config.min_poll_interval

    def _deliverable(self, records: list[Record]) -> list[Record]:
        if not records:
            return records
        if self._skip_through is not None:
            skip = self._skip_through
            start = 0
            while (
                start < len(records)
                and (
                    int(records[start].sequence_number),
                    records[start].sub_sequence_number,
                )
                <= skip
            ):
                start += 1
            if start < len(records):
                self._skip_through = None
            records = records[start:]
            if not records:
                return records
        stream, shard_id = self._stream, self._shard_id
        for record in records:
            force_setattr(record, "shard_id", shard_id)
            force_setattr(record, "stream", stream)
        last = records[-1]
        self._last_fetched = ExtendedSequenceNumber(last.sequence_number, last.sub_sequence_number)
        return records

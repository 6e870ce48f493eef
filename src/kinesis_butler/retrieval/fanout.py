"""Enhanced fan-out retrieval: SubscribeToShard, resubscribed from the continuation sequence number.

One background task per shard keeps a subscription open and turns its events into batches:

* Start: a checkpoint resumes ``AT_SEQUENCE_NUMBER`` and drops what is <= it (so a restart resumes
  inside a KPL aggregate, as polling does); a shard without one starts at the configured position.
* A subscription ends after at most 5 minutes (or earlier, when the connection breaks): the next
  one starts ``AFTER_SEQUENCE_NUMBER`` the last event's ``ContinuationSequenceNumber``, never more
  than once a second per shard (the API's limit).
* ``ResourceInUse`` (a subscription of the same consumer is still open: the previous owner during
  a handoff, or a subscription less than 5 s old), throttling and transient failures back off
  with full jitter; the subscription is retried forever, the lease watchdog decides loss.
* The last event of a closed shard (no continuation) ends the source with the child shards.
* Fallback: an error that retrying cannot fix (access denied, consumer deleted, an endpoint with
  no fan-out) hands the shard to the polling source from the last delivered position.

Memory: events are pushed, so the process budget is charged *after* an event arrives, before
it is queued; when the budget is spent, the task stops reading, and HTTP/2 flow control stops
the server. A batch's bytes return to the budget when the processor asks for the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from kinesis_butler.config import ConsumerConfig
from kinesis_butler.errors import AccessDenied, ButlerError, InvalidArgument, ResourceInUse, ResourceNotFound
from kinesis_butler.models import ExtendedSequenceNumber, Record, StartPosition
from kinesis_butler.retrieval._delivery import Delivery
from kinesis_butler.retrieval._prefetch import ChildShardInfo, PrefetchingSource, end_of_shard
from kinesis_butler.retrieval.base import Batch, RecordSource
from kinesis_butler.retrieval.budget import ByteBudget, record_cost

__all__ = ["FanOutSource", "ShardSubscriber"]

log = logging.getLogger("kinesis_butler.retrieval")

_MIN_RESUBSCRIBE = 1.0  # SubscribeToShard: one call per second per consumer and shard
_IN_USE_BACKOFF = 5.0  # a subscription younger than 5 s refuses a new one
# Errors that mean this app cannot use fan-out on the shard (the others are retried or reported):
# no permission, the stream consumer or the operation does not exist here, a request it rejects.
_FAN_OUT_UNAVAILABLE = (AccessDenied, ResourceNotFound, InvalidArgument)


class _Event(Protocol):
    @property
    def records(self) -> list[Record]: ...

    @property
    def continuation_sequence_number(self) -> str | None: ...

    @property
    def millis_behind_latest(self) -> int: ...

    @property
    def child_shards(self) -> Sequence[ChildShardInfo]: ...


class ShardSubscriber(Protocol):
    """What fan-out needs from Kinesis (KinesisClient satisfies it)."""

    def subscribe_to_shard(
        self,
        consumer_arn: str,
        shard_id: str,
        starting_position_type: str,
        *,
        sequence_number: str | None = None,
        timestamp: float | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[_Event]]: ...


class FanOutSource(PrefetchingSource):
    """Reads one shard through an enhanced fan-out consumer. See the module docstring."""

    def __init__(
        self,
        client: ShardSubscriber,
        stream: str,
        shard_id: str,
        *,
        consumer_arn: str,
        config: ConsumerConfig,
        start_position: StartPosition,
        budget: ByteBudget | None = None,
        hash_range: tuple[int, int] | None = None,
        fallback: Callable[[], RecordSource] | None = None,
    ) -> None:
        super().__init__(shard_id, budget or ByteBudget(config.prefetch_budget_bytes))
        self._client = client
        self._stream = stream
        self._consumer_arn = consumer_arn
        self._config = config
        self._start_position = start_position
        self._fallback = fallback
        self._delivery = Delivery(stream, shard_id, hash_range)
        self.subscriptions = 0  # SubscribeToShard calls that succeeded (for tests and metrics)
        self._continuation: ExtendedSequenceNumber | None = None

    async def _replacement(
        self, error: BaseException, checkpoint: ExtendedSequenceNumber
    ) -> RecordSource | None:
        if self._fallback is None or not isinstance(error, _FAN_OUT_UNAVAILABLE):
            return None
        # After the last record handed out, else after the last continuation (records may have
        # been written since a LATEST or AT_TIMESTAMP start), else the lease's checkpoint.
        resume = self._delivery.last or self._continuation or checkpoint
        log.warning(
            "shard %s: enhanced fan-out unavailable (%s); polling from %s", self._shard_id, error, resume
        )
        source = self._fallback()
        await source.start(resume)
        return source

    def _position(self, checkpoint: ExtendedSequenceNumber) -> tuple[str, dict[str, object]]:
        start = self._start_position
        if checkpoint.is_sentinel:
            if start.sequence_number is not None:
                return start.kind.value, {"sequence_number": start.sequence_number}
            if checkpoint.sequence == "AT_TIMESTAMP":
                return "AT_TIMESTAMP", {"timestamp": start.timestamp or 0.0}
            return checkpoint.sequence, {}
        self._delivery.resume_after(checkpoint)
        return "AT_SEQUENCE_NUMBER", {"sequence_number": checkpoint.sequence}

    async def _produce(self, checkpoint: ExtendedSequenceNumber) -> None:
        loop = asyncio.get_running_loop()
        kind, kwargs = self._position(checkpoint)
        failures = 0
        last_subscribe = -_MIN_RESUBSCRIBE
        while True:
            pause = last_subscribe + _MIN_RESUBSCRIBE - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            last_subscribe = loop.time()
            streaming = False
            try:
                async with self._client.subscribe_to_shard(
                    self._consumer_arn,
                    self._shard_id,
                    kind,
                    **kwargs,  # type: ignore[arg-type]
                ) as events:
                    self.subscriptions += 1
                    streaming = False
                    async for event in events:
                        streaming = True
                        failures = 0
                        continuation = event.continuation_sequence_number
                        await self._emit(event)
                        if continuation is None:
                            return  # shard end, queued by _emit
                        kind, kwargs = "AFTER_SEQUENCE_NUMBER", {"sequence_number": continuation}
                        self._continuation = ExtendedSequenceNumber(continuation)
            except ButlerError as exc:
                if not exc.retriable and not isinstance(exc, ResourceInUse):
                    raise
                failures += 1
                delay = self._backoff(failures, exc)
                if streaming and isinstance(exc, ResourceInUse):
                    # Another subscriber took the shard over mid-stream: most likely a new lease
                    # owner. Wait out the failover time, by when our lease watchdog has stopped
                    # this shard if the lease is really gone, instead of taking it back.
                    delay = max(delay, self._config.failover_time)
                log.info(
                    "shard %s: subscription failed (%s); resubscribing in %.1f s", self._shard_id, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            log.debug("shard %s: subscription ended; resubscribing %s %s", self._shard_id, kind, kwargs)

    def _backoff(self, failures: int, exc: ButlerError) -> float:
        base = _IN_USE_BACKOFF if isinstance(exc, ResourceInUse) else self._config.min_poll_interval
        return base / 2 + random.uniform(0, min(30.0, base * 2 ** (failures - 1)))

    async def _emit(self, event: _Event) -> None:
        records = self._delivery.prepare(event.records)
        end = event.continuation_sequence_number is None
        if not records and not end:
            return
        cost = record_cost(records)
        granted = await self._budget.acquire(cost, minimum=cost) if cost else 0
        if end:
            batch = end_of_shard(records, event.millis_behind_latest, event.child_shards)
        else:
            batch = Batch(records, event.millis_behind_latest)
        await self._offer(batch, granted)

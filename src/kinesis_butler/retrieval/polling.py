"""Polling retrieval: GetRecords in a loop, one background fetch task per shard.

Pacing (retrieval/quota.py): every source reading a shard in this process shares one pacer that
keeps the shard under 5 calls and 2 MiB per second (times ``read_quota_share``), and never two
calls closer than ``min_poll_interval``. When caught up (an empty answer, or MillisBehindLatest
0) the interval grows from ``min_poll_interval`` to ``idle_poll_interval``, so an idle shard
costs little and new records still arrive within one idle interval. Throttling backs off with
full jitter for every reader of the shard (the KCL sleeps a fixed interval). An expired
iterator is replaced from the last delivered position, so nothing is skipped or repeated.

Memory (retrieval/budget.py): each call first takes bytes from the process-wide prefetch
budget and sizes its ``Limit`` from the grant; the bytes are returned when the processor asks
for the next batch. One batch is prefetched while the processor works on the previous one.
KPL aggregated records are de-aggregated here (retrieval/kpl.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from kinesis_butler.config import ConsumerConfig
from kinesis_butler.errors import AwsError, ButlerError, ExpiredIterator, ResourceNotFound, Throttled
from kinesis_butler.models import ExtendedSequenceNumber, Record, StartPosition
from kinesis_butler.retrieval._delivery import Delivery
from kinesis_butler.retrieval._prefetch import ChildShardInfo, PrefetchingSource, end_of_shard
from kinesis_butler.retrieval.base import Batch
from kinesis_butler.retrieval.budget import PER_RECORD_OVERHEAD as _OVERHEAD
from kinesis_butler.retrieval.budget import ByteBudget, record_cost
from kinesis_butler.retrieval.quota import ShardPacer, pacer_for

__all__ = ["PollingSource", "ShardReader"]

log = logging.getLogger("kinesis_butler.retrieval")


class _GetRecordsResult(Protocol):
    # Read-only properties, so that any result type with these fields conforms.
    @property
    def records(self) -> list[Record]: ...

    @property
    def next_shard_iterator(self) -> str | None: ...

    @property
    def millis_behind_latest(self) -> int | None: ...

    @property
    def child_shards(self) -> Sequence[ChildShardInfo]: ...


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

    async def get_records(
        self, shard_iterator: str, *, limit: int | None = None, max_attempts: int | None = None
    ) -> _GetRecordsResult: ...


_JSON_PER_RECORD = 130  # an answer's bytes per record beyond the base64 payload (keys, numbers)
_MAX_MALFORMED = 5  # unreadable answers in a row before the shard is reported failed
# Until a shard's answers are measured, assume the largest record Kinesis allows, so the first
# call's Limit cannot overshoot the grant however large the records are.
_INITIAL_RECORD_COST = 1024 * 1024 + _OVERHEAD


class PollingSource(PrefetchingSource):
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
        budget: ByteBudget | None = None,
        hash_range: tuple[int, int] | None = None,
        stream_exists: Callable[[], Awaitable[bool]] | None = None,
        app: str = "",
    ) -> None:
        super().__init__(shard_id, budget or ByteBudget(config.prefetch_budget_bytes), depth=prefetch)
        self._client = client
        self._stream = stream
        self._config = config
        self._start_position = start_position
        self._delivery = Delivery(stream, shard_id, hash_range)
        self._record_cost = float(_INITIAL_RECORD_COST)
        self._stream_exists = stream_exists
        self._app = app

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
        start = self._start_position
        if position.is_sentinel and start.sequence_number is not None:
            # A per-shard start at a sequence number, for a shard without a checkpoint yet.
            kind = start.kind.value
            kwargs["sequence_number"] = start.sequence_number
        elif position.sequence == "TRIM_HORIZON":
            kind = "TRIM_HORIZON"
        elif position.sequence == "LATEST":
            kind = "LATEST"
        elif position.sequence == "AT_TIMESTAMP":
            kind = "AT_TIMESTAMP"
            kwargs["timestamp"] = start.timestamp or 0.0
        else:
            # AT (not AFTER) the checkpointed record, then drop what is <= the checkpoint: this
            # is what lets a restart resume inside a KPL aggregated record.
            kind = "AT_SEQUENCE_NUMBER"
            kwargs["sequence_number"] = position.sequence
            self._delivery.resume_after(position)
        return await self._client.get_shard_iterator(
            self._stream,
            self._shard_id,
            kind,
            **kwargs,  # type: ignore[arg-type]
        )

    async def _produce(self, checkpoint: ExtendedSequenceNumber) -> None:
        config = self._config
        share = config.read_quota_share
        lease = pacer_for(
            self._stream,
            self._shard_id,
            config.shard_read_calls_per_second * share,
            config.shard_read_bytes_per_second * share,
            app=self._app,
        )
        try:
            await self._poll(checkpoint, lease.pacer)
        finally:
            lease.release()

    async def _reserve(self) -> tuple[int, int]:
        """Bytes from the budget for the next call, and the call's Limit sized from them. An idle
        shard asks for no more than its fair share, so idle shards never queue for the budget."""
        per_record = max(1, int(self._record_cost))
        want = per_record * self._config.max_records
        granted = await self._budget.acquire(want, minimum=min(per_record, self._budget.fair_share))
        return granted, max(1, min(self._config.max_records, granted // per_record))

    async def _poll(self, checkpoint: ExtendedSequenceNumber, pacer: ShardPacer) -> None:
        config = self._config
        loop = asyncio.get_running_loop()
        iterator = await self._iterator_or_end(checkpoint)
        failures = suspicious = 0
        not_before = 0.0
        idle = 0.0
        while iterator is not None:
            # The slot first, then memory: an idle shard holds no budget while it waits, and a
            # call that waited for memory is paced from when it really goes out.
            await pacer.wait(not_before)
            granted, limit = await self._reserve()
            try:
                started = loop.time()
                pacer.went_out(started)
                # One attempt: throttling is paced here, for every reader of the shard, and not
                # retried behind the pacer's back by the transport.
                result = await self._client.get_records(iterator, limit=limit, max_attempts=1)
            except BaseException as exc:  # noqa: BLE001 - the grant goes back whatever happened
                self._budget.release(granted)
                if isinstance(exc, ExpiredIterator):
                    resume = self._delivery.last or checkpoint
                    log.info("shard %s: iterator expired, resuming after %s", self._shard_id, resume)
                    iterator = await self._iterator_or_end(resume)
                    continue
                if isinstance(exc, ResourceNotFound) and await self._shard_is_gone():
                    await self._offer(end_of_shard([], None, ()), 0)
                    return
                failures += 1
                self._back_off(exc, failures, pacer)
                continue
            if result.next_shard_iterator is None and not result.child_shards and suspicious < _MAX_MALFORMED:
                # A shard ends with its children named; an answer with neither an iterator nor
                # children is more likely a proxy's empty body than the end (the KCL retries too).
                # Asked again a few times and still so, it is taken as the end.
                self._budget.release(granted)
                suspicious += 1
                log.warning(
                    "shard %s: GetRecords answered without a next iterator or child shards", self._shard_id
                )
                pacer.hold_off(self._backoff(suspicious))
                continue
            failures = suspicious = 0
            iterator = result.next_shard_iterator
            await self._emit(result, started, granted, pacer)
            if not result.records or result.millis_behind_latest == 0:
                idle = min(config.idle_poll_interval, max(config.min_poll_interval, idle * 2))
                not_before = started + idle
            else:
                idle = 0.0
                not_before = started + config.min_poll_interval

    async def _iterator_or_end(self, position: ExtendedSequenceNumber) -> str | None:
        """An iterator at ``position``; None (after queueing the end) when the shard is gone."""
        try:
            return await self._iterator_at(position)
        except ResourceNotFound:
            if not await self._shard_is_gone():
                raise
            await self._offer(end_of_shard([], None, ()), 0)
            return None

    async def _shard_is_gone(self) -> bool:
        """True when the stream exists but the shard does not: a closed shard whose records all
        expired (the app was down longer than the retention period). It is treated as ended, as
        the KCL does, so that its children are not blocked forever."""
        if self._stream_exists is None:
            return False
        try:
            exists = await self._stream_exists()
        except ButlerError:
            return False
        if exists:
            log.warning(
                "shard %s of stream %s no longer exists (its records expired): treating it as ended",
                self._shard_id,
                self._stream,
            )
        return exists

    def _back_off(self, exc: BaseException, failures: int, pacer: ShardPacer) -> None:
        """Re-raise what retrying cannot fix; otherwise hold every reader of the shard off.

        A 2xx answer we cannot parse (truncated by a proxy or a broken connection) is retried a
        few times, then reported: a body that never parses is not worth a crash loop."""
        malformed = isinstance(exc, AwsError) and exc.code == "MalformedResponse"
        if malformed and failures >= _MAX_MALFORMED:
            raise AwsError(
                f"shard {self._shard_id}: {failures} GetRecords answers in a row could not be read; "
                f"giving up (last: {exc})",
                operation="GetRecords",
                code="MalformedResponse",
            ) from exc
        if not malformed and (not isinstance(exc, ButlerError) or not exc.retriable):
            raise exc
        pause = self._backoff(failures)
        pacer.hold_off(pause)
        if isinstance(exc, Throttled):
            log.debug("shard %s: throttled, backing off %.2f s", self._shard_id, pause)
        else:
            log.warning("shard %s: GetRecords failed (will retry in %.1f s): %s", self._shard_id, pause, exc)

    async def _emit(self, result: _GetRecordsResult, started: float, granted: int, pacer: ShardPacer) -> None:
        """Queue a GetRecords answer's deliverable records (and shard end), charging the budget."""
        raw = result.records
        records = self._delivery.prepare(raw)
        cost = 0
        if raw:
            size = getattr(result, "response_bytes", 0)
            # Payload bytes for the quota: from the answer's size when known (base64 is 4/3 of
            # the data, plus ~130 B of JSON per record), so there is no loop over the records.
            payload = (size - _JSON_PER_RECORD * len(raw)) * 3 // 4 if size else None
            # Memory: what the deliverable batch holds (KPL sub-records included).
            cost = record_cost(records) if records is not raw or not size else size + _OVERHEAD * len(raw)
            pacer.received(started, max(0, payload) if payload is not None else cost - _OVERHEAD * len(raw))
            # Per fetched record: up at once, down to a quarter per answer (from the pessimistic
            # 1 MiB start, a shard of small records reaches full-size calls in ~5 answers).
            measured = cost / len(raw)
            self._record_cost = max(measured, self._record_cost / 4)
        self._budget.settle(granted, cost)
        if result.next_shard_iterator is None:
            await self._offer(end_of_shard(records, result.millis_behind_latest, result.child_shards), cost)
        elif records:
            await self._offer(Batch(records, result.millis_behind_latest), cost)
        else:
            self._budget.release(cost)

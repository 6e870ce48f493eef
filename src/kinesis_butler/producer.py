"""AsyncProducer: a bounded buffer, batching, KPL aggregation and partial-failure retries.

A record goes through these states (each ``put`` returns a :class:`PutHandle` for it)::

    put ──> queued ──> in a PutRecords entry ──> written: handle -> PutResult
              ▲              │  (plain, or a KPL aggregate of records predicted for one shard)
              │              ├──> retriable error code: retried after a jittered backoff
              │              ├──> other error / retries exhausted: handle raises RecordFailed
              └──────────────┴──> an aggregate landed on an unexpected shard (reshard): the shard
                                  map is refreshed, records outside that shard's range re-queued

Ordering (``ProducerConfig.ordered``): at most one PutRecords entry per partition key is in flight
or waiting for a retry; later records of the key wait in the queue. A failed entry is re-sent as
it was before anything after it, so a key's records land in put order. With aggregation many
records of a key share one entry, so the rule costs little; without it a hot key writes one record
per round trip.

Spool (``ProducerConfig.spool_path``): ``put`` returns once the record is committed to a SQLite
file (:mod:`kinesis_butler.spool`); a record leaves the spool only once PutRecords wrote it. On
start, records left there (by a crash, ``kill -9``, or records that failed) are queued before any
new one, in their original order. A record written just before a crash may be sent twice.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, Final, Protocol

from kinesis_butler.aws import KinesisClient
from kinesis_butler.aws.kinesis_shapes import PutRecordsEntry, PutRecordsResult, PutRecordsResultEntry
from kinesis_butler.config import ProducerConfig
from kinesis_butler.errors import AwsError, ButlerError, ClosedError, RecordFailed
from kinesis_butler.models import Shard
from kinesis_butler.producer_batching import Entry, Pending, PutResult, ShardMap, compose, validate_record
from kinesis_butler.spool import AsyncSpool, SpoolError

__all__ = ["AsyncProducer", "ProducerApi", "PutHandle", "PutResult"]

log = logging.getLogger("kinesis_butler.producer")

# Entry error codes worth another try; anything else fails the entry's records.
RETRIABLE_CODES: Final = frozenset(
    {"ProvisionedThroughputExceededException", "InternalFailure", "KMSThrottlingException"}
)


class ProducerApi(Protocol):
    """What a producer needs from Kinesis (KinesisClient, or a fake in unit tests)."""

    async def put_records(self, stream: str, entries: list[PutRecordsEntry]) -> PutRecordsResult: ...

    async def list_shards(self, stream: str) -> list[Shard]: ...

    async def aclose(self) -> None: ...


class PutHandle:
    """The outcome of one ``put``: ``await handle`` gives its :class:`PutResult` once written, or
    raises (``RecordFailed``, the call's ``AwsError``, ``ClosedError``). Cancelling a task that
    awaits a handle does not cancel the record."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[PutResult]) -> None:
        self._future = future

    def __await__(self) -> Generator[Any, None, PutResult]:
        return asyncio.shield(self._future).__await__()

    def done(self) -> bool:
        """True once the record was written or failed."""
        return self._future.done()

    def result(self) -> PutResult:
        """The result of a done handle (raises its error; InvalidStateError if not done)."""
        return self._future.result()

    def exception(self) -> BaseException | None:
        """The error of a done handle, or None."""
        return self._future.exception()

    def add_done_callback(self, callback: Callable[[PutHandle], None]) -> None:
        """Call ``callback(handle)`` on the loop once the handle is done."""
        self._future.add_done_callback(lambda _: callback(self))


class _State(enum.Enum):
    NEW = "new"  # built; the sender starts on __aenter__, start() or the first put
    RUNNING = "running"  # accepting records
    CLOSING = "closing"  # close() is flushing; puts raise ClosedError
    CLOSED = "closed"  # everything resolved; cannot be reopened


def _observe(future: asyncio.Future[PutResult]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: a handle nobody awaits does not log at exit


class AsyncProducer:
    """Writes records to one stream in batches, optionally KPL-aggregated, with retries.

    Args:
        stream: the stream name.
        client: a Kinesis client; built from ``region``/``endpoint_url`` (and closed with the
            producer) when omitted.
        region: the AWS region (default: the botocore chain).
        endpoint_url: a Kinesis endpoint override (e.g. the local emulator).
        config: batching, limits, ordering, aggregation and retries.

    Example:
        >>> async with AsyncProducer("orders") as producer:
        ...     handle = await producer.put(b'{"id": 1}', "customer-7")
        ...     shard_id, sequence_number, _ = await handle
    """

    def __init__(
        self,
        stream: str,
        *,
        client: ProducerApi | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        config: ProducerConfig | None = None,
    ) -> None:
        self.stream = stream
        self.config = config or ProducerConfig()
        self._owns_client = client is None
        self.client: ProducerApi = client or KinesisClient(region=region, endpoint_url=endpoint_url)
        self._state = _State.NEW
        self._queue: deque[Pending] = deque()  # accepted, not yet in an entry, in put order
        self._queued_bytes = 0
        self._retries: list[tuple[float, int, Entry]] = []  # heap by due time
        self._retry_order = itertools.count()
        self._holds: Counter[str] = Counter()  # partition key -> entries in flight or awaiting a retry
        self._outstanding: set[asyncio.Future[PutResult]] = set()
        self._buffered_bytes = 0
        self._space = asyncio.Event()
        self._wake = asyncio.Event()
        self._flushing = 0
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._shards: ShardMap | None = None
        self._refreshed_at = float("-inf")
        self._refresh_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._spool: AsyncSpool | None = None
        self._spool_ids: dict[asyncio.Future[PutResult], int] = {}  # record -> its spool row

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> AsyncProducer:
        """Start the sender (and load the shard map when aggregating). Idempotent."""
        async with self._start_lock:
            self._check_open()
            if self._state is _State.NEW:
                if self.config.aggregate:
                    try:
                        self._shards = ShardMap(await self.client.list_shards(self.stream))
                    except BaseException:
                        await self.aclose()  # closes a client we built
                        raise
                    self._refreshed_at = asyncio.get_running_loop().time()
                if self.config.spool_path is not None:
                    try:
                        await self._open_spool(self.config.spool_path)
                    except BaseException:
                        await self.aclose()
                        raise
                self._runner = asyncio.create_task(self._run(), name=f"producer-{self.stream}")
                self._state = _State.RUNNING
        return self

    async def _open_spool(self, path: str) -> None:
        """Open the spool and queue the records a previous run left there, first and in order."""
        spool = await AsyncSpool.open(path, self.stream, fsync=self.config.spool_fsync)
        try:
            left = await spool.pending()
        except BaseException:
            await spool.aclose()
            raise
        self._spool = spool
        loop = asyncio.get_running_loop()
        for row in left:
            try:
                payload, size, hash_key = validate_record(
                    row.data, row.partition_key, row.explicit_hash_key, self.config.max_record_bytes
                )
            except ButlerError as exc:
                log.warning(
                    "stream %s: spooled record %d not sent (kept in the spool): %s", self.stream, row.id, exc
                )
                continue
            future: asyncio.Future[PutResult] = loop.create_future()
            future.add_done_callback(_observe)
            self._outstanding.add(future)
            self._buffered_bytes += size
            self._spool_ids[future] = row.id
            self._enqueue(
                Pending(payload, row.partition_key, row.explicit_hash_key, hash_key, size, future, 0.0)
            )
        if left:
            log.info(
                "stream %s: %d record(s) left in the spool %s are sent first", self.stream, len(left), path
            )

    async def flush(self) -> None:
        """Send everything accepted so far at once and wait until each record is written or failed.

        Errors are not raised here: they are on the records' handles.
        """
        waiting = set(self._outstanding)
        if not waiting:
            return
        self._flushing += 1
        self._wake.set()
        try:
            await asyncio.wait(waiting)
        finally:
            self._flushing -= 1

    async def aclose(self) -> None:
        """Flush, stop, and close the client if the producer built it. Later puts raise ClosedError."""
        if self._state in (_State.CLOSING, _State.CLOSED):
            return
        self._state = _State.CLOSING
        self._space.set()  # puts waiting for room raise ClosedError
        try:
            await self.flush()
        finally:
            self._state = _State.CLOSED
            tasks = [task for task in (self._runner, *self._tasks) if task is not None]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            for future in list(self._outstanding):  # only when the flush itself was cancelled
                self._finish(future, ClosedError("the producer was closed before this record was written"))
            try:
                if self._spool is not None:
                    await self._spool.aclose()  # commits the last deletions
            finally:
                if self._owns_client:
                    await self.client.aclose()

    async def __aenter__(self) -> AsyncProducer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._state in (_State.CLOSING, _State.CLOSED):
            raise ClosedError(f"the producer of stream {self.stream!r} is closed")

    # -- put ----------------------------------------------------------------------------------

    async def put(
        self, data: bytes | bytearray | memoryview, partition_key: str, explicit_hash_key: str | None = None
    ) -> PutHandle:
        """Accept one record; waits while the buffer is full (records or bytes).

        Args:
            data: the payload.
            partition_key: 1..256 characters; decides the shard unless ``explicit_hash_key`` is set.
            explicit_hash_key: a decimal hash key in [0, 2**128 - 1] that decides the shard.

        Returns:
            A handle to await for the record's shard and sequence number.

        Raises:
            RecordRejected: the record is too large, or a key is invalid.
            ClosedError: the producer is closing or closed.
            SpoolError: the spool (``spool_path``) could not store the record; it was not accepted.
        """
        cfg = self.config
        if self._state is not _State.RUNNING:
            self._check_open()
        payload, size, hash_key = validate_record(
            data, partition_key, explicit_hash_key, cfg.max_record_bytes, hash_partition_key=cfg.aggregate
        )
        if self._state is _State.NEW:
            await self.start()
        outstanding = self._outstanding
        while len(outstanding) >= cfg.max_buffered_records or (
            outstanding and self._buffered_bytes + size > cfg.max_buffered_bytes
        ):
            self._space.clear()
            await self._space.wait()
            self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PutResult] = loop.create_future()
        record = Pending(payload, partition_key, explicit_hash_key, hash_key, size, future, loop.time())
        outstanding.add(future)
        self._buffered_bytes += size
        if self._spool is None:
            self._queue.append(record)
            self._queued_bytes += size
            self._wake.set()
        else:
            # Queued by the commit's callback, in commit (= put) order, even if this caller is cancelled.
            try:
                committed = self._spool.append(payload, partition_key, explicit_hash_key)
            except SpoolError as exc:
                self._finish(future, exc, size)
                raise
            committed.add_done_callback(lambda done: self._spooled(record, done))
            await asyncio.shield(committed)
        if len(self._queue) >= cfg.max_batch_records or self._queued_bytes >= cfg.max_request_bytes:
            await asyncio.sleep(0)  # a full batch waits: let the sender run even if the caller never yields
        return PutHandle(future)

    def _enqueue(self, record: Pending) -> None:
        self._queue.append(record)
        self._queued_bytes += record.size
        self._wake.set()

    def _spooled(self, record: Pending, committed: asyncio.Future[int]) -> None:
        if committed.cancelled() or committed.exception() is not None:
            error = committed.exception() if not committed.cancelled() else None
            self._finish(record.future, error or SpoolError("the spool write was cancelled"), record.size)
            return
        if record.future.done():  # the producer was closed meanwhile: the record stays in the spool
            return
        self._spool_ids[record.future] = committed.result()
        self._enqueue(record)

    # -- sending ------------------------------------------------------------------------------

    def _ready_at(self, now: float) -> float | None:
        """When a batch can next be composed (``<= now``: at once), None when nothing waits."""
        due = self._retries[0][0] if self._retries else None
        if self._queue:
            cfg = self.config
            full = len(self._queue) >= cfg.max_batch_records or self._queued_bytes >= cfg.max_request_bytes
            urgent = full or self._flushing or self._state is not _State.RUNNING
            at = now if urgent else self._queue[0].enqueued + cfg.linger
            due = at if due is None else min(due, at)
        return due

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            timeout: float | None = None
            if self._in_flight < self.config.max_in_flight:
                ready = self._ready_at(now)
                if ready is not None and ready <= now:
                    batch = self._compose(now)
                    if batch:
                        self._in_flight += 1
                        task = asyncio.create_task(self._send(batch))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                        continue
                    # Every queued record waits for its key's entry in flight: that entry's end wakes us.
                    ready = self._retries[0][0] if self._retries else None
                timeout = None if ready is None else max(0.0, ready - now)
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _compose(self, now: float) -> list[Entry]:
        cfg = self.config
        batch: list[Entry] = []
        size = 0
        while self._retries and self._retries[0][0] <= now and len(batch) < cfg.max_batch_records:
            entry = self._retries[0][2]
            if batch and size + entry.size > cfg.max_request_bytes:
                break
            heapq.heappop(self._retries)
            batch.append(entry)
            size += entry.size
        fresh, taken_bytes = compose(
            self._queue,
            config=cfg,
            shards=self._shards if cfg.aggregate else None,
            holds=self._holds if cfg.ordered else None,
            room=(cfg.max_batch_records - len(batch), cfg.max_request_bytes - size),
        )
        self._queued_bytes -= taken_bytes
        if cfg.ordered:
            for entry in fresh:
                self._holds.update(entry.keys)
        return batch + fresh

    async def _send(self, batch: list[Entry]) -> None:
        try:
            try:
                result = await self.client.put_records(self.stream, [entry.wire for entry in batch])
            except ButlerError as exc:
                for entry in batch:
                    if exc.retriable:
                        self._retry(entry, getattr(exc, "code", "") or type(exc).__name__, str(exc))
                    else:
                        self._fail(entry, exc)
                return
            except Exception as exc:  # a bug or an unknown error: fail these records, keep producing
                log.exception("stream %s: PutRecords failed unexpectedly", self.stream)
                for entry in batch:
                    self._fail(entry, exc)
                return
            if len(result.records) != len(batch):
                error = AwsError(
                    f"PutRecords answered {len(result.records)} outcomes for {len(batch)} entries",
                    operation="PutRecords",
                    code="MalformedResponse",
                )
                for entry in batch:
                    self._fail(entry, error)
                return
            misrouted, stale = self._outcomes(batch, result.records)
            if misrouted or stale:
                await self._landed_elsewhere(misrouted)
        finally:
            self._in_flight -= 1
            self._wake.set()

    def _outcomes(
        self, batch: list[Entry], outcomes: list[PutRecordsResultEntry]
    ) -> tuple[list[tuple[Entry, PutRecordsResultEntry]], bool]:
        """Resolve or retry each entry; returns the aggregates that landed on an unexpected shard,
        and whether a plain record did (the shard map is stale)."""
        misrouted: list[tuple[Entry, PutRecordsResultEntry]] = []
        stale = False
        for entry, outcome in zip(batch, outcomes, strict=True):
            if outcome.error_code or not outcome.shard_id or not outcome.sequence_number:
                code = outcome.error_code or "MissingSequenceNumber"
                if code in RETRIABLE_CODES:
                    self._retry(entry, code, outcome.error_message or "")
                else:
                    message = f"{code}: {outcome.error_message}"
                    self._fail(entry, RecordFailed(message, code=code, attempts=entry.attempts + 1))
                continue
            if entry.shard is not None and outcome.shard_id != entry.shard.shard_id:
                if entry.aggregated:
                    misrouted.append((entry, outcome))
                    continue
                stale = True  # a plain record is where Kinesis put it: only the map is stale
            self._succeed(entry, outcome.shard_id, outcome.sequence_number)
        return misrouted, stale

    async def _landed_elsewhere(self, misrouted: list[tuple[Entry, PutRecordsResultEntry]]) -> None:
        """Entries written to a shard the map did not predict: the stream was resharded."""
        # A shard the map has never seen is news: refresh now, whatever the rate limit.
        unknown = any(
            self._shards is None or outcome.shard_id not in self._shards.by_id for _, outcome in misrouted
        )
        await self.refresh_shards(force=unknown)
        requeue: list[Pending] = []
        for entry, outcome in misrouted:
            shard_id, sequence = outcome.shard_id or "", outcome.sequence_number or ""
            landed = self._shards.by_id.get(shard_id) if self._shards else None
            # A consumer that filters by hash range (as ours and the KCL do) drops the sub-records
            # outside the landing shard's range: send those again, in order.
            inside = [
                landed is not None and landed.starting_hash_key <= r.hash_key <= landed.ending_hash_key
                for r in entry.records
            ]
            self._succeed(entry, shard_id, sequence, inside)
            requeue += (r for r, kept in zip(entry.records, inside, strict=True) if not kept)
            log.info(
                "stream %s: an aggregate predicted for %s landed on %s; %d of its records re-sent",
                self.stream,
                entry.shard.shard_id if entry.shard else "?",
                shard_id,
                inside.count(False),
            )
        self._queue.extendleft(reversed(requeue))
        self._queued_bytes += sum(r.size for r in requeue)

    async def refresh_shards(self, *, force: bool = False) -> None:
        """Reload the hash key -> shard map (at most once per ``shard_refresh_interval`` unless forced)."""
        async with self._refresh_lock:
            loop = asyncio.get_running_loop()
            if not force and loop.time() - self._refreshed_at < self.config.shard_refresh_interval:
                return
            try:
                self._shards = ShardMap(await self.client.list_shards(self.stream))
            except ButlerError as exc:
                log.warning("stream %s: could not refresh the shard map: %s", self.stream, exc)
            finally:
                self._refreshed_at = loop.time()

    # -- outcomes -----------------------------------------------------------------------------

    def _release(self, entry: Entry) -> None:
        if not self.config.ordered:
            return
        self._holds.subtract(entry.keys)
        for key in entry.keys:
            if self._holds[key] <= 0:
                del self._holds[key]

    def _finish(
        self, future: asyncio.Future[PutResult], outcome: PutResult | BaseException, size: int = 0
    ) -> None:
        if self._spool_ids:
            row = self._spool_ids.pop(future, None)
            # Only a written record leaves the spool; a failed one is sent again on the next start.
            if row is not None and self._spool is not None and not isinstance(outcome, BaseException):
                self._spool.mark_written((row,))
        if future in self._outstanding:
            self._outstanding.discard(future)
            self._buffered_bytes -= size
            self._space.set()
        if not future.done():
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
                future.exception()  # retrieved: a handle nobody awaits does not log at exit
            else:
                future.set_result(outcome)

    def _succeed(self, entry: Entry, shard_id: str, sequence: str, written: list[bool] | None = None) -> None:
        """Resolve the entry's records (those flagged in ``written``, else all)."""
        self._release(entry)
        if written is None and not self._spool_ids:  # the common case, inlined
            outstanding, freed, aggregated = self._outstanding, 0, entry.aggregated
            for index, record in enumerate(entry.records):
                future = record.future
                if future in outstanding:
                    outstanding.discard(future)
                    freed += record.size
                if not future.done():
                    future.set_result(PutResult(shard_id, sequence, index if aggregated else None))
            self._buffered_bytes -= freed
            self._space.set()
            return
        for index, record in enumerate(entry.records):
            if written is None or written[index]:
                sub = index if entry.aggregated else None
                self._finish(record.future, PutResult(shard_id, sequence, sub), record.size)

    def _fail(self, entry: Entry, error: BaseException) -> None:
        self._release(entry)
        log.warning("stream %s: %d record(s) not written: %s", self.stream, len(entry.records), error)
        for record in entry.records:
            self._finish(record.future, error, record.size)

    def _retry(self, entry: Entry, code: str, message: str) -> None:
        entry.attempts += 1
        cfg = self.config
        if entry.attempts >= cfg.max_attempts:
            error = RecordFailed(
                f"{code} after {entry.attempts} attempts: {message}", code=code, attempts=entry.attempts
            )
            self._fail(entry, error)
            return
        delay = random.uniform(0, min(cfg.retry_cap, cfg.retry_base * 2 ** (entry.attempts - 1)))
        due = asyncio.get_running_loop().time() + delay
        heapq.heappush(self._retries, (due, next(self._retry_order), entry))  # keeps its holds
        self._wake.set()

"""Ordered parallelism inside one shard: records of different keys are processed concurrently,
records of one key strictly one after the other, in shard order. See docs/parallel.md.

* A lane is the queue of one key's records; only its head runs, so one key's records never
  overlap or reorder. A key with work waits once in the ready queue and goes to its back after
  each record: a busy key cannot starve the others.
* Workers are tasks that live only while there is work: no task per record, none idle.
* The checkpoint is the last record such that it and every record delivered before it
  completed. It is tracked in delivery order, so KPL sub-records (one sequence number, many
  sub-sequence numbers) need no special case, and it can only move forward.
* A record that raises is retried after a jittered exponential backoff that holds no worker: its
  lane waits, other keys go on. Once it is out of attempts nothing at or after it starts or is
  checkpointed, and ProcessorFailed is raised from the next callback of the shard loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import operator
import random
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeAlias, cast

from kinesis_butler.errors import ButlerError, ClosedError, ConfigError, LeaseLost, ProcessorFailed
from kinesis_butler.models import Record
from kinesis_butler.processor import (
    Checkpointer,
    LeaseLostInput,
    ProcessorFactory,
    ProcessRecordsInput,
    RecordProcessorBase,
    ShardEndedInput,
    ShutdownRequestedInput,
    call_maybe_async,
)

__all__ = ["OrderedParallelProcessor", "ParallelConfig", "RecordHandler", "ordered_parallel"]

log = logging.getLogger("kinesis_butler.parallel")

RecordHandler: TypeAlias = Callable[[Record], Awaitable[None] | None]
"""``async def handle(record) -> None``, or a plain function (run in a worker thread)."""

KeyFunction: TypeAlias = Callable[[Record], Hashable]


def _check_number(name: str, value: Any, *, integer: bool = False, zero: bool = False) -> None:
    """ConfigError naming ``name`` unless ``value`` is a number > 0 (>= 0 with ``zero``)."""
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0 or (value == 0 and not zero):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} {'>= 0' if zero else '> 0'}, got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class ParallelConfig:
    """The knobs of :func:`ordered_parallel` (see there), validated once for every shard."""

    concurrency: int = 16
    max_pending: int = 10_000
    key: KeyFunction | None = None
    max_attempts: int = 5
    retry_base: float = 0.5
    retry_cap: float = 30.0
    checkpoint_interval: float = 1.0
    drain_timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_pending", "max_attempts"):
            _check_number(name, getattr(self, name), integer=True)
        _check_number("retry_base", self.retry_base)
        _check_number("retry_cap", self.retry_cap)
        _check_number("checkpoint_interval", self.checkpoint_interval, zero=True)
        if self.drain_timeout is not None:
            _check_number("drain_timeout", self.drain_timeout)
        if self.max_pending < self.concurrency:
            raise ConfigError(
                f"max_pending must be >= concurrency ({self.concurrency}), got {self.max_pending}: "
                "no more records than max_pending can be in flight"
            )
        if self.key is not None and not callable(self.key):
            raise ConfigError(f"key must be a function of a Record, got {self.key!r}")


def ordered_parallel(
    handler: RecordHandler,
    *,
    concurrency: int = 16,
    max_pending: int = 10_000,
    key: KeyFunction | None = None,
    max_attempts: int = 5,
    retry_base: float = 0.5,
    retry_cap: float = 30.0,
    checkpoint_interval: float = 1.0,
    drain_timeout: float | None = None,
) -> ProcessorFactory:
    """A processor factory (one processor per shard) that calls ``handler`` once per record.

    Args:
        handler: ``async def handle(record) -> None``; a plain function runs in a worker thread.
        concurrency: the most handler calls running at once in one shard.
        max_pending: the most records of one shard delivered but not yet checkpointable;
            ``process_records`` waits (back-pressure) while this many are pending.
        key: what orders records (default: the partition key). Records with equal keys run
            one at a time in shard order; others run concurrently.
        max_attempts: calls per record before the shard is stopped with ProcessorFailed.
        retry_base: the first retry waits up to this many seconds, doubled per attempt...
        retry_cap: ...up to this cap (full jitter: a uniform delay below the bound).
        checkpoint_interval: the least seconds between two checkpoints (0: on every advance).
        drain_timeout: on shutdown, the most seconds to wait for in-flight records before
            checkpointing what completed (None: until the shard loop's own deadline).

    Raises:
        ConfigError: an argument is invalid (the message names it).
    """
    if not callable(handler) or inspect.isclass(handler):
        raise ConfigError(f"handler must be a function of one Record, got {handler!r}")
    config = ParallelConfig(
        concurrency=concurrency,
        max_pending=max_pending,
        key=key,
        max_attempts=max_attempts,
        retry_base=retry_base,
        retry_cap=retry_cap,
        checkpoint_interval=checkpoint_interval,
        drain_timeout=drain_timeout,
    )

    def factory() -> OrderedParallelProcessor:
        return OrderedParallelProcessor(handler, config)

    return factory


@dataclasses.dataclass(slots=True, eq=False)
class _Entry:
    record: Record
    index: int  # the position in the shard's delivery order
    done: bool = False


def _is_async(func: object) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


class OrderedParallelProcessor(RecordProcessorBase):
    """The processor :func:`ordered_parallel` makes; one per shard (see the module docstring)."""

    def __init__(self, handler: RecordHandler, config: ParallelConfig | None = None) -> None:
        self._config = config = config or ParallelConfig()
        self._handle = cast(
            Callable[[Record], Awaitable[None]],
            handler if _is_async(handler) else functools.partial(call_maybe_async, handler),
        )
        self._key: KeyFunction = config.key or operator.attrgetter("partition_key")
        self._lanes: dict[Hashable, deque[_Entry]] = {}  # per key, head first; absent when empty
        self._ready: deque[Hashable] = deque()  # keys whose head may start now
        self._order: deque[_Entry] = deque()  # delivered and not yet in the completed prefix
        self._next_index = 0
        self._stop_at = sys.maxsize  # no record from this index on starts: the failed one; -1: closed
        self._done: Record | None = None  # the last record of the completed prefix
        self._written: Record | None = None  # the last one checkpointed
        self._attempts: dict[Hashable, int] = {}  # failed calls of each lane's head, while retrying
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}  # lanes waiting out a retry backoff
        self._workers: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()  # checkpoints are written in order, one at a time
        self._progress = asyncio.Event()  # the prefix moved, or the shard failed or was closed
        self._idle = asyncio.Event()  # no worker runs and no retry is scheduled
        self._idle.set()
        self._failure: ProcessorFailed | None = None
        self._checkpointer: Checkpointer | None = None
        self.shard_id = ""

    @property
    def pending(self) -> int:
        """Records delivered and not yet part of the completed prefix."""
        return len(self._order)

    # -- the RecordProcessor callbacks ---------------------------------------------------------
    async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
        """Hand the batch to the lanes (waiting while ``max_pending`` records are pending) and
        return without waiting for them to complete: the shard loop fetches the next batch."""
        self.shard_id = process_records_input.shard_id
        self._checkpointer = process_records_input.checkpointer
        if self._failure is not None:
            await self._finish(self._config.drain_timeout)
        order, lanes, limit, key_of = self._order, self._lanes, self._config.max_pending, self._key
        for record in process_records_input.records:
            if len(order) >= limit:
                await self._wait_for_room()
            try:
                key = key_of(record)
            except Exception as exc:  # noqa: BLE001 - a key function that raises: retrying cannot help
                self._fail(_Entry(record, self._next_index), 1, exc)
                return await self._finish(self._config.drain_timeout)
            entry = _Entry(record, self._next_index)
            self._next_index += 1
            order.append(entry)
            lane = lanes.get(key)
            if lane is None:
                lanes[key] = deque((entry,))
                self._make_ready(key)
            else:
                lane.append(entry)
        return None

    async def shard_ended(self, shard_ended_input: ShardEndedInput) -> None:
        """Wait for every record; the shard loop then writes SHARD_END (unless this raises)."""
        self._checkpointer = shard_ended_input.checkpointer
        await self._finish(None)

    async def shutdown_requested(self, shutdown_requested_input: ShutdownRequestedInput) -> None:
        """Wait for in-flight records (at most ``drain_timeout``), checkpoint what completed."""
        self._checkpointer = shutdown_requested_input.checkpointer
        await self._finish(self._config.drain_timeout)

    async def lease_lost(self, lease_lost_input: LeaseLostInput) -> None:
        """Cancel in-flight handlers at once; nothing is checkpointed (it would be refused)."""
        await self._close()

    # -- lanes and workers ---------------------------------------------------------------------
    def _make_ready(self, key: Hashable) -> None:
        self._ready.append(key)
        if len(self._workers) < self._config.concurrency:
            self._workers.add(asyncio.create_task(self._work()))
            self._idle.clear()

    async def _work(self) -> None:
        lanes, ready, order = self._lanes, self._ready, self._order
        try:
            while ready:
                key = ready.popleft()
                lane = lanes[key]
                entry = lane[0]
                if entry.index >= self._stop_at:
                    continue  # the shard failed before this record (or was closed): it never starts
                try:
                    await self._handle(entry.record)
                except Exception as exc:  # noqa: BLE001 - any handler error: retry the record
                    self._retry_or_fail(key, entry, exc)
                    continue
                if self._stop_at < 0:
                    return  # closed while the handler ran
                lane.popleft()
                if lane:
                    ready.append(key)
                else:
                    del lanes[key]
                if self._attempts:
                    self._attempts.pop(key, None)
                entry.done = True
                if order[0] is entry:
                    self._advance()
        finally:
            self._workers.discard(asyncio.current_task())
            if not self._workers and not self._timers:
                self._idle.set()

    def _advance(self) -> None:
        order = self._order
        last = order.popleft()
        while order and order[0].done:
            last = order.popleft()
        self._done = last.record
        self._progress.set()
        if self._flusher is None and self._checkpointer is not None:
            self._flusher = asyncio.create_task(self._flush())

    def _retry_or_fail(self, key: Hashable, entry: _Entry, exc: Exception) -> None:
        if entry.index >= self._stop_at:
            return  # the shard failed before this record (or was closed) while it ran
        attempts = self._attempts.get(key, 0) + 1
        if attempts >= self._config.max_attempts:
            self._fail(entry, attempts, exc)
            return
        self._attempts[key] = attempts
        delay = random.uniform(0, min(self._config.retry_cap, self._config.retry_base * 2 ** (attempts - 1)))
        record = entry.record
        log.warning(
            "shard %s: handler raised %s: %s on record %s/%d (key %r); retry %d of %d in %.2f s",
            *(self.shard_id, type(exc).__name__, exc, record.sequence_number, record.sub_sequence_number),
            *(key, attempts + 1, self._config.max_attempts, delay),
        )
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._resume, key)

    def _resume(self, key: Hashable) -> None:
        del self._timers[key]
        self._make_ready(key)  # a worker exists or is started: the shard cannot turn idle here

    def _fail(self, entry: _Entry, attempts: int, exc: Exception) -> None:
        if entry.index >= self._stop_at:
            return  # a record earlier in the shard already stopped it
        record = entry.record
        self._failure = ProcessorFailed(
            f"handler failed {attempts} time(s) on shard {self.shard_id or record.shard_id} at sequence "
            f"number {record.sequence_number} sub-sequence {record.sub_sequence_number} (partition key "
            f"{record.partition_key!r}); the shard is stopped, nothing from this record on is "
            f"checkpointed (last error: {type(exc).__name__}: {exc})",
            shard_id=self.shard_id or record.shard_id,
            attempts=attempts,
        )
        self._failure.__cause__ = exc
        self._stop_at = entry.index
        log.error("%s", self._failure)
        self._progress.set()

    async def _wait_for_room(self) -> None:
        while len(self._order) >= self._config.max_pending:
            if self._failure is not None:
                await self._finish(self._config.drain_timeout)
            if self._stop_at < 0:
                raise ClosedError(f"the processor of shard {self.shard_id} was closed")
            self._progress.clear()
            try:
                await self._progress.wait()
            except asyncio.CancelledError:
                self._abort()  # the shard loop is going away (lease lost, or it was cancelled)
                raise

    # -- checkpoints and the end ---------------------------------------------------------------
    async def _flush(self) -> None:
        try:
            while self._checkpointer is not None and self._done is not self._written:
                await asyncio.sleep(self._config.checkpoint_interval)
                await self._write()
        except LeaseLost:
            self._checkpointer = None  # the shard loop ends this shard; nothing more to write
        except ButlerError as exc:  # the next advance tries again
            log.warning("shard %s: checkpoint failed: %s", self.shard_id, exc)
        finally:
            self._flusher = None

    async def _write(self) -> None:
        async with self._write_lock:  # read the target under the lock: writes never go backwards
            done, checkpointer = self._done, self._checkpointer
            if done is None or done is self._written or checkpointer is None:
                return
            # wait=False: a store outage must not stop the processing of the shards we hold.
            await checkpointer.checkpoint(done.extended_sequence_number, wait=False)
            self._written = done

    async def _finish(self, drain_for: float | None) -> None:
        """Wait for in-flight records (at most ``drain_for`` seconds), checkpoint the completed
        prefix, stop; raise the failure if a record ran out of attempts."""
        try:
            try:
                async with asyncio.timeout(drain_for):
                    await self._idle.wait()
            except TimeoutError:
                log.warning(
                    "shard %s: %d record(s) still pending after %.1f s; checkpointing what completed",
                    *(self.shard_id, len(self._order), drain_for),
                )
            await self._write()
        finally:
            await self._close()
        if self._failure is not None:
            raise self._failure

    def _abort(self) -> list[asyncio.Task[None]]:
        self._stop_at = -1
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        tasks = [*self._workers, *([self._flusher] if self._flusher else [])]
        for task in tasks:
            task.cancel()
        self._lanes.clear()
        self._ready.clear()
        self._checkpointer = None
        self._progress.set()
        return tasks

    async def _close(self) -> None:
        await asyncio.gather(*self._abort(), return_exceptions=True)

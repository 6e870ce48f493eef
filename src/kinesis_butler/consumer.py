"""AsyncConsumer: one worker of a consumer application.

It wires shard discovery, the lease coordinator and one ShardConsumer per held lease. Three
ways to use it:

* a KCL-style processor class: ``AsyncConsumer(stream, app, processor=MyProcessor)``;
* a function of ``list[Record]``; each batch is checkpointed when it returns;
* no processor: ``async with consumer: async for record in consumer: ...`` and
  ``await consumer.checkpoint(record)`` when you are done with a record.

``stream`` may be a list of streams (multi-stream mode, namespaced lease keys); streams can be
added and removed while the worker runs (:meth:`add_stream`, :meth:`remove_stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

from kinesis_butler.aws.kinesis import KinesisClient
from kinesis_butler.config import ConsumerConfig, default_worker_id
from kinesis_butler.discovery import sync_shards
from kinesis_butler.errors import (
    ButlerError,
    ClosedError,
    ConfigError,
    LeaseLost,
    ProcessorFailed,
    ResourceNotFound,
    StoreError,
)
from kinesis_butler.iteration import IteratorProcessor
from kinesis_butler.leasing import HeldLease, LeaseCoordinator
from kinesis_butler.lifecycle import ShardConsumer, ShardState
from kinesis_butler.models import ExtendedSequenceNumber, Lease, Record, Shard, StartPosition
from kinesis_butler.processor import (
    ProcessorFactory,
    as_processor_factory,
)
from kinesis_butler.retrieval.factory import SourceFactory
from kinesis_butler.retrieval.polling import ShardReader
from kinesis_butler.stores import LeaseStore, open_store
from kinesis_butler.streams import StreamTracker

__all__ = ["AsyncConsumer", "KinesisApi", "ShardStatus"]

log = logging.getLogger("kinesis_butler.consumer")


class KinesisApi(ShardReader, Protocol):
    """What a consumer needs from Kinesis (KinesisClient, or a fake in unit tests)."""

    async def describe_stream_summary(self, stream: str) -> Any: ...

    async def list_shards(self, stream: str) -> list[Shard]: ...

    async def aclose(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ShardStatus:
    """One row of :meth:`AsyncConsumer.status`."""

    lease_key: str
    shard_id: str
    owner: str | None
    checkpoint: ExtendedSequenceNumber
    state: str  # this worker's ShardState for held shards, else "finished" / "unowned" / "held elsewhere"
    records_processed: int
    parents: tuple[str, ...]


class AsyncConsumer:
    """A worker that consumes one or more streams for application ``app``.

    Args:
        stream: the Kinesis stream name, or several (multi-stream mode).
        app: the application name; workers with the same app share the work.
        processor: a RecordProcessor class, a zero-argument factory of processors, an
            ``async def`` or plain function of ``list[Record]``, or None for ``async for``.
        store: a store URL (``sqlite:///path.db``, ``memory://``) or a LeaseStore.
        start_at: where shards without a checkpoint start; a StartPosition or its text
            (``trim_horizon``, ``latest``, ``at_timestamp:ISO8601``).
        shard_start_at: per-shard starts that override ``start_at`` for shards without a
            checkpoint, keyed by shard id (or ``stream/shard id`` with several streams); the only
            place for ``at_sequence_number:N`` / ``after_sequence_number:N``.
        client: a Kinesis client; built from ``region``/``endpoint_url`` when omitted.
        region: the AWS region (default: the botocore chain).
        endpoint_url: a Kinesis endpoint override (e.g. the local emulator).
        worker_id: this worker's id in the lease table (default ``host:pid:random``).
        config: timings and limits.
        on_batch: called with (shard id, record count) after each processed batch.
        multi_stream: namespace lease keys by stream (default: when more than one stream).
    """

    def __init__(
        self,
        stream: str | Sequence[str],
        app: str,
        processor: object = None,
        *,
        store: str | LeaseStore = "sqlite:///kinesis-butler.db",
        start_at: StartPosition | str = "trim_horizon",
        shard_start_at: Mapping[str, StartPosition | str] | None = None,
        client: KinesisApi | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        worker_id: str | None = None,
        config: ConsumerConfig | None = None,
        on_batch: Callable[[str, int], None] | None = None,
        multi_stream: bool | None = None,
    ) -> None:
        self.tracker = StreamTracker(
            [stream] if isinstance(stream, str) else stream, multi_stream=multi_stream
        )
        self.app = app
        self.config = config or ConsumerConfig()
        self.start_at = StartPosition.parse(start_at) if isinstance(start_at, str) else start_at
        if self.start_at.is_sequence:
            raise ConfigError(
                f"start_at={start_at!r}: a sequence number names one shard's record; "
                "give it per shard with shard_start_at={shard_id: ...}"
            )
        shard_starts = {
            key: StartPosition.parse(value) if isinstance(value, str) else value
            for key, value in (shard_start_at or {}).items()
        }
        self.worker_id = worker_id or default_worker_id()
        self._stop = asyncio.Event()
        self._queue: asyncio.Queue[list[Record]] | None = None
        if processor is None:
            queue: asyncio.Queue[list[Record]] = asyncio.Queue(maxsize=4)
            self._queue = queue
            self._factory: ProcessorFactory = lambda: IteratorProcessor(queue, self._stop)
        else:
            self._factory = as_processor_factory(processor)
        self.store: LeaseStore = open_store(store, app) if isinstance(store, str) else store
        self._owns_client = client is None
        self.client: KinesisApi = client or KinesisClient(region=region, endpoint_url=endpoint_url)
        self._on_batch = on_batch
        self.sources = SourceFactory(self.client, app, self.config, self.start_at, shard_starts)
        self.coordinator = LeaseCoordinator(
            self.store,
            self.worker_id,
            self.config,
            on_acquired=self._acquired,
            on_lost=lambda held: None,  # each ShardConsumer watches its own lease's `lost` event
            on_handoff=self._handoff,
            eligible=lambda lease: self.tracker.stream_of(lease) is not None,
        )
        self.shards: dict[str, ShardConsumer] = {}  # by lease key
        self.failures: list[ButlerError] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._pending: list[Record] = []
        self._closed = False

    @property
    def stream(self) -> str:
        """The (first) stream this consumer reads."""
        names = self.tracker.names
        return names[0] if names else ""

    # -- lifecycle ---------------------------------------------------------------------------
    async def _prepare(self) -> None:
        await self.tracker.resolve_all(self.client)
        for name in self.tracker.names:
            await self.sources.register(name)
        await self.store.initialize()
        await self._sync_all()

    async def _sync_all(self) -> None:
        for info in list(self.tracker.streams.values()):
            try:
                await sync_shards(
                    self.client, self.store, info.name, self.start_at, stream_identifier=info.identifier
                )
            except ResourceNotFound:
                if not (self.tracker.multi_stream and len(self.tracker.streams) > 1):
                    raise
                log.error("stream %s was deleted; this app stops reading it", info.name)  # noqa: TRY400
                await self.remove_stream(info.name)

    async def run(self) -> None:
        """Consume until :meth:`request_stop` (or cancellation), then shut down gracefully."""
        if self._closed:
            raise ClosedError("this consumer was stopped; create a new one")
        try:
            await self._prepare()
            self._started.set()
            background = [
                asyncio.create_task(self.coordinator.run(), name="lease-coordinator"),
                asyncio.create_task(self._discovery_loop(), name="shard-sync"),
            ]
            stop_wait = asyncio.create_task(self._stop.wait())
            try:
                done, _ = await asyncio.wait({*background, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stop_wait:
                        task.result()  # a background loop died: raise its error
            finally:
                stop_wait.cancel()
                self._stop.set()
                await self._graceful_shutdown(background)
        finally:
            self._closed = True
            self._started.set()
            if self._owns_client:
                await self.client.aclose()
            await self.store.aclose()
        if self.failures:
            log.error(
                "%d shard(s) stopped with errors: %s", len(self.failures), "; ".join(map(str, self.failures))
            )

    async def _graceful_shutdown(self, background: list[asyncio.Task[None]]) -> None:
        self.coordinator.taking = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_timeout
        # Loop: a take that completed during shutdown may have started one more shard.
        while self._tasks:
            for shard in list(self.shards.values()):
                shard.shutdown.set()
            remaining = deadline - loop.time()
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(0.0, remaining))
            if pending and loop.time() >= deadline:
                log.warning(
                    "%d shard(s) did not finish within %.0f s; cancelled",
                    len(pending),
                    self.config.shutdown_timeout,
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for held in list(self.coordinator.held.values()):
            with contextlib.suppress(StoreError):
                await self.coordinator.release(held)

    async def wait_stopped(self) -> None:
        """Wait until a consumer started with ``async with`` has stopped; raises its error."""
        if self._run_task is not None:
            await self._run_task

    def request_stop(self) -> None:
        """Ask for a graceful shutdown without waiting (safe from signal handlers and processors)."""
        self._stop.set()

    async def stop(self) -> None:
        """Graceful shutdown: finish in-flight batches, checkpoint, release leases; waits for
        it when the consumer was started with ``async with`` (but not from inside one of its own
        shard tasks, which would wait for itself)."""
        self._stop.set()
        if self._run_task is not None and asyncio.current_task() not in self._tasks:
            await asyncio.gather(self._run_task, return_exceptions=True)

    async def add_stream(self, name: str) -> None:
        """Start reading another stream without a restart (multi-stream mode)."""
        info = await self.tracker.add(self.client, name)
        await self.sources.register(info.name)
        await sync_shards(
            self.client, self.store, info.name, self.start_at, stream_identifier=info.identifier
        )

    async def remove_stream(self, name: str) -> None:
        """Stop reading a stream: its shards here stop gracefully (checkpointed, released) and
        no worker of this process takes its leases again."""
        info = self.tracker.remove(name)
        if info is None:
            return
        for shard in list(self.shards.values()):
            if shard.stream == info.name:
                shard.shutdown.set()

    async def _discovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.shard_sync_interval)
            try:
                await self._sync_all()
            except ResourceNotFound:
                raise
            except ButlerError as exc:
                log.warning("shard sync failed (will retry): %s", exc)

    def _acquired(self, held: HeldLease) -> None:
        info = self.tracker.stream_of(held.lease)
        if info is None:  # its stream was removed since the take
            task = asyncio.create_task(self.coordinator.release(held))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        consumer = ShardConsumer(
            held=held,
            stream=info.name,
            coordinator=self.coordinator,
            store=self.store,
            processor=self._factory(),
            source=self.sources.source_for(info.name, held.lease),
            config=self.config,
            on_batch=self._on_batch,
        )
        if self._stop.is_set():
            consumer.shutdown.set()
        self.shards[held.key] = consumer
        task = asyncio.create_task(self._run_shard(consumer), name=f"shard-{held.key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handoff(self, held: HeldLease) -> None:
        shard = self.shards.get(held.key)
        if shard is not None:
            shard.shutdown.set()  # finish the in-flight batch; release() completes the handoff

    async def _run_shard(self, consumer: ShardConsumer) -> None:
        try:
            await consumer.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any shard error is recorded, never lost in a task
            failure = (
                exc
                if isinstance(exc, ButlerError)
                else ProcessorFailed(
                    f"shard {consumer.shard_id} stopped: {type(exc).__name__}: {exc}",
                    shard_id=consumer.shard_id,
                    attempts=1,
                )
            )
            self.failures.append(failure)
            log.error("shard %s stopped: %s", consumer.shard_id, failure)  # noqa: TRY400 - no traceback
            if isinstance(exc, ResourceNotFound):
                # The stream was deleted: a multi-stream app goes on with its other streams.
                if self.tracker.multi_stream and len(self.tracker.streams) > 1:
                    self.tracker.remove(consumer.stream)
                    for shard in list(self.shards.values()):
                        if shard.stream == consumer.stream:
                            shard.shutdown.set()
                else:
                    self._stop.set()
        finally:
            if self.shards.get(consumer.held.key) is consumer:
                del self.shards[consumer.held.key]
            # Whatever ended the shard, its lease must not stay held (renewed by nobody's work).
            if self.coordinator.held.get(consumer.held.key) is consumer.held:
                with contextlib.suppress(StoreError):
                    await self.coordinator.release(consumer.held)
        if consumer.error is not None:
            self.failures.append(consumer.error)

    # -- async context manager and iterator API -----------------------------------------------
    async def __aenter__(self) -> AsyncConsumer:
        self._run_task = asyncio.create_task(self.run(), name=f"consumer-{self.app}")
        started = asyncio.create_task(self._started.wait())
        await asyncio.wait({self._run_task, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self._run_task.done():
            self._run_task.result()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._run_task is not None:
            await self._run_task

    def __aiter__(self) -> AsyncIterator[Record]:
        if self._queue is None:
            raise ConfigError("iteration needs a consumer created without a processor")
        return self

    async def __anext__(self) -> Record:
        if self._pending:
            return self._pending.pop()
        if self._queue is None:
            raise ConfigError("iteration needs a consumer created without a processor")
        if self._run_task is None:
            raise ConfigError("use `async with consumer:` before iterating")
        while True:
            if self._run_task.done():
                self._run_task.result()
                raise StopAsyncIteration
            getter = asyncio.ensure_future(self._queue.get())
            try:
                await asyncio.wait({getter, self._run_task}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                # A timed-out or cancelled __anext__ must not swallow a batch it already took.
                if getter.done() and not getter.cancelled():
                    self._pending = getter.result()[::-1]
                else:
                    getter.cancel()
                raise
            if getter.done():
                batch = getter.result()
                if batch:
                    self._pending = batch[::-1]  # pop() from the end keeps order
                    return self._pending.pop()
            else:
                getter.cancel()

    async def checkpoint(self, record: Record) -> None:
        """Checkpoint ``record`` (and everything before it on its shard).

        Raises:
            LeaseLost: this worker no longer holds the record's shard.
        """
        shard = next(
            (s for s in self.shards.values() if s.shard_id == record.shard_id and s.stream == record.stream),
            None,
        )
        if shard is None or shard.state not in (ShardState.PROCESSING, ShardState.SHARD_ENDED):
            raise LeaseLost(
                f"shard {record.shard_id} is not held by this worker any more; checkpoint refused",
                lease_key=record.shard_id,
            )
        await shard.checkpointer.checkpoint(record)

    # -- inspection ----------------------------------------------------------------------------
    async def status(self) -> list[ShardStatus]:
        """Every lease of the app, with this worker's view of it."""
        leases: list[Lease] = await self.store.list_leases()
        rows = []
        for lease in leases:
            shard = self.shards.get(lease.lease_key)
            if shard is not None:
                state = shard.state.value
            elif lease.checkpoint.is_shard_end:
                state = "finished"
            elif lease.lease_owner is None:
                state = "unowned"
            else:
                state = "held elsewhere"
            rows.append(
                ShardStatus(
                    lease.lease_key,
                    lease.shard,
                    lease.lease_owner,
                    lease.checkpoint,
                    state,
                    shard.records_processed if shard else 0,
                    tuple(sorted(lease.parent_shard_ids)),
                )
            )
        return rows

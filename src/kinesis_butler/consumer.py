"""AsyncConsumer: one worker of a consumer application.

It wires shard discovery, the lease coordinator and one ShardConsumer per held lease. Three
ways to use it:

* a KCL-style processor class: ``AsyncConsumer(stream, app, processor=MyProcessor)``;
* a function of ``list[Record]``; each batch is checkpointed when it returns;
* no processor: ``async with consumer: async for record in consumer: ...`` and
  ``await consumer.checkpoint(record)`` when you are done with a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
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
    ResourceNotFound,
    StoreError,
)
from kinesis_butler.leasing import HeldLease, LeaseCoordinator
from kinesis_butler.lifecycle import ShardConsumer, ShardState
from kinesis_butler.models import ExtendedSequenceNumber, Lease, Record, Shard, StartPosition
from kinesis_butler.processor import (
    ProcessorFactory,
    ProcessRecordsInput,
    RecordProcessorBase,
    as_processor_factory,
)
from kinesis_butler.retrieval.polling import PollingSource, ShardReader
from kinesis_butler.stores import LeaseStore, open_store

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

    shard_id: str
    owner: str | None
    checkpoint: ExtendedSequenceNumber
    state: str  # this worker's ShardState for held shards, else "finished" / "unowned" / "held elsewhere"
    records_processed: int
    parents: tuple[str, ...]


class _IteratorProcessor(RecordProcessorBase):
    """Feeds ``async for``: each batch is queued; the user checkpoints explicitly."""

    def __init__(self, queue: asyncio.Queue[list[Record]], closing: asyncio.Event) -> None:
        self._queue = queue
        self._closing = closing

    async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
        # On shutdown a full queue must not hold the shard hostage: the batch is dropped
        # unconsumed (and uncheckpointed), so whoever takes the shard next reads it again.
        put = asyncio.ensure_future(self._queue.put(list(process_records_input.records)))
        closing = asyncio.ensure_future(self._closing.wait())
        await asyncio.wait({put, closing}, return_when=asyncio.FIRST_COMPLETED)
        closing.cancel()
        if not put.done():
            put.cancel()


class AsyncConsumer:
    """A worker that consumes ``stream`` for application ``app``.

    Args:
        stream: the Kinesis stream name.
        app: the application name; workers with the same app share the work.
        processor: a RecordProcessor class (or zero-argument factory), an ``async def`` or
            plain function of ``list[Record]``, or None for the ``async for`` API.
        store: a store URL (``sqlite:///path.db``, ``memory://``) or a LeaseStore.
        start_at: where shards without a checkpoint start; a StartPosition or its text
            (``trim_horizon``, ``latest``, ``at_timestamp:ISO8601``).
        client: a Kinesis client; built from ``region``/``endpoint_url`` when omitted.
        region: the AWS region (default: the botocore chain).
        endpoint_url: a Kinesis endpoint override (e.g. the local emulator).
        worker_id: this worker's id in the lease table (default ``host:pid:random``).
        config: timings and limits.
        on_batch: called with (shard id, record count) after each processed batch.
    """

    def __init__(
        self,
        stream: str,
        app: str,
        processor: object = None,
        *,
        store: str | LeaseStore = "sqlite:///kinesis-butler.db",
        start_at: StartPosition | str = "trim_horizon",
        client: KinesisApi | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        worker_id: str | None = None,
        config: ConsumerConfig | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        if not stream:
            raise ConfigError("stream name is empty")
        self.stream = stream
        self.app = app
        self.config = config or ConsumerConfig()
        self.start_at = StartPosition.parse(start_at) if isinstance(start_at, str) else start_at
        self.worker_id = worker_id or default_worker_id()
        self._queue: asyncio.Queue[list[Record]] | None = None
        if processor is None:
            queue: asyncio.Queue[list[Record]] = asyncio.Queue(maxsize=4)
            self._queue = queue
            self._factory: ProcessorFactory = lambda: _IteratorProcessor(queue, self._stop)
        else:
            self._factory = as_processor_factory(processor)
        self.store: LeaseStore = open_store(store, app) if isinstance(store, str) else store
        self._owns_client = client is None
        self.client: KinesisApi = client or KinesisClient(region=region, endpoint_url=endpoint_url)
        self._on_batch = on_batch
        self.coordinator = LeaseCoordinator(
            self.store,
            self.worker_id,
            self.config,
            on_acquired=self._acquired,
            on_lost=lambda held: None,  # each ShardConsumer watches its own lease's `lost` event
        )
        self.shards: dict[str, ShardConsumer] = {}
        self.failures: list[ButlerError] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._pending: list[Record] = []
        self._closed = False
        self.resumed_shards: dict[str, ExtendedSequenceNumber] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    async def _prepare(self) -> None:
        try:
            await self.client.describe_stream_summary(self.stream)
        except ResourceNotFound:
            raise ConfigError(
                f"stream {self.stream!r} does not exist at this endpoint/region; "
                "check --stream, --region and --endpoint-url"
            ) from None
        await self.store.initialize()
        for lease in await self.store.list_leases():
            if not lease.checkpoint.is_sentinel:
                self.resumed_shards[lease.shard] = lease.checkpoint
        await sync_shards(self.client, self.store, self.stream, self.start_at)

    async def run(self) -> None:
        """Consume until :meth:`stop` is called (or the task is cancelled), then shut down gracefully."""
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
        for shard in list(self.shards.values()):
            shard.shutdown.set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "%d shard(s) did not finish within %.0f s; cancelled",
                    len(pending),
                    self.config.shutdown_timeout,
                )
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
        """Ask for a graceful shutdown without waiting (safe from signal handlers)."""
        self._stop.set()

    async def stop(self) -> None:
        """Graceful shutdown: finish in-flight batches, checkpoint, release leases; waits for
        it when the consumer was started with ``async with``."""
        self._stop.set()
        if self._run_task is not None:
            await asyncio.gather(self._run_task, return_exceptions=True)

    async def _discovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.shard_sync_interval)
            try:
                await sync_shards(self.client, self.store, self.stream, self.start_at)
            except (StoreError, ButlerError) as exc:
                if isinstance(exc, ResourceNotFound):
                    raise
                log.warning("shard sync failed (will retry): %s", exc)

    def _acquired(self, held: HeldLease) -> None:
        shard_id = held.lease.shard
        consumer = ShardConsumer(
            held=held,
            stream=self.stream,
            coordinator=self.coordinator,
            store=self.store,
            processor=self._factory(),
            source=PollingSource(self.client, self.stream, shard_id, self.config, self.start_at),
            config=self.config,
            on_batch=self._on_batch,
        )
        self.shards[shard_id] = consumer
        task = asyncio.create_task(self._run_shard(consumer), name=f"shard-{shard_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_shard(self, consumer: ShardConsumer) -> None:
        try:
            await consumer.run()
        except asyncio.CancelledError:
            raise
        except ButlerError as exc:
            self.failures.append(exc)
            log.error("shard %s stopped: %s", consumer.shard_id, exc)  # noqa: TRY400 - known error, no traceback
            if isinstance(exc, ResourceNotFound):
                self._stop.set()
        finally:
            if self.shards.get(consumer.shard_id) is consumer:
                del self.shards[consumer.shard_id]
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
            await asyncio.wait({getter, self._run_task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                batch = getter.result()
                if batch:
                    batch.reverse()  # pop() from the end keeps order
                    self._pending = batch
                    return self._pending.pop()
            else:
                getter.cancel()

    async def checkpoint(self, record: Record) -> None:
        """Checkpoint ``record`` (and everything before it on its shard).

        Raises:
            LeaseLost: this worker no longer holds the record's shard.
        """
        shard = self.shards.get(record.shard_id)
        if shard is None or shard.state is not ShardState.PROCESSING:
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
            shard = self.shards.get(lease.shard)
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
                    lease.shard,
                    lease.lease_owner,
                    lease.checkpoint,
                    state,
                    shard.records_processed if shard else 0,
                    tuple(sorted(lease.parent_shard_ids)),
                )
            )
        return rows

"""Blocking facades: the same AsyncConsumer and AsyncProducer, run on a private event-loop thread.

No second copy of the logic: every method schedules a coroutine of the async core on the
private loop and waits for it.

Example::

    def handle(records):
        for record in records:
            print(record.data)

    with Consumer("orders", "billing", handle, store="sqlite:///billing.db") as consumer:
        consumer.wait()          # until Ctrl-C / consumer.stop() from another thread

    with Producer("orders") as producer:
        future = producer.put(b'{"id": 1}', "customer-7")   # blocks only while the buffer is full
        shard_id, sequence_number, _ = future.result()
"""

from __future__ import annotations

import asyncio
import atexit
import signal
import threading
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from kinesis_butler.consumer import AsyncConsumer, ShardStatus
from kinesis_butler.errors import ClosedError
from kinesis_butler.models import Record
from kinesis_butler.processor import IN_PROCESSOR
from kinesis_butler.producer import AsyncProducer, PutHandle, PutResult

__all__ = ["Consumer", "Producer"]

T = TypeVar("T")


class _LoopThread:
    """A private event loop on a daemon thread, and blocking calls into it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        """Run ``coro`` on the loop and wait for its result (ClosedError once closed)."""
        if self.loop.is_closed():
            coro.close()
            raise ClosedError(f"this {what} was closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Consumer:
    """A blocking consumer. Takes the same arguments as :class:`AsyncConsumer`.

    ``processor`` may be a plain function (it runs in a worker thread) or a processor class.
    With no processor, iterate with ``for record in consumer`` and call
    ``consumer.checkpoint(record)``.
    """

    def __init__(
        self, stream: str | Sequence[str], app: str, processor: object = None, **options: Any
    ) -> None:
        self._thread = _LoopThread("kinesis-butler-loop")
        self._loop = self._thread.loop
        self._run: Future[None] | None = None
        self._closed = False
        self._async: AsyncConsumer | None = None
        try:
            self._async = self._call(_build(stream, app, processor, options))
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._thread.call(coro, timeout, "consumer")

    @property
    def consumer(self) -> AsyncConsumer:
        """The async core this facade drives."""
        if self._async is None:
            raise ClosedError("this consumer failed to start")
        return self._async

    @property
    def worker_id(self) -> str:
        return self.consumer.worker_id

    def start(self) -> Consumer:
        """Start consuming in the background; returns once the worker runs."""
        if self._run is not None:
            raise ClosedError("this consumer was already started")
        try:
            self._call(self.consumer.__aenter__())
        except BaseException:
            self.close()
            raise
        self._run = asyncio.run_coroutine_threadsafe(self.consumer.wait_stopped(), self._loop)
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Block until the consumer stops (after :meth:`stop`, or an error, which is raised)."""
        if self._run is None:
            raise ClosedError("call start() first")
        self._run.result(timeout)

    def run(self) -> None:
        """Start and block until stopped. KeyboardInterrupt stops gracefully."""
        self.start()
        try:
            self.wait()
        except KeyboardInterrupt:
            self.stop()
            raise
        finally:
            self.close()

    def request_stop(self) -> None:
        """Ask for a graceful shutdown and return at once. Thread-safe; fine from a processor."""
        if self._async is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._async.request_stop)

    def stop(self) -> None:
        """Graceful shutdown: finish in-flight batches, checkpoint, release leases, and wait
        for it. Thread-safe. Called from inside a processor it only requests the stop (waiting
        there would wait for that very processor)."""
        if self._async is None or self._loop.is_closed():
            return
        if IN_PROCESSOR.get():
            self.request_stop()
            return
        self._call(self._async.stop())

    def close(self) -> None:
        """Stop (if running) and end the private loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        self._thread.close()

    def checkpoint(self, record: Record) -> None:
        self._call(self.consumer.checkpoint(record))

    def status(self) -> list[ShardStatus]:
        return self._call(self.consumer.status())

    def __iter__(self) -> Iterator[Record]:
        consumer = self.consumer
        consumer.__aiter__()  # validates that this consumer iterates
        while True:
            try:
                yield self._call(consumer.__anext__())
            except StopAsyncIteration:
                return

    def __enter__(self) -> Consumer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _build(
    stream: str | Sequence[str], app: str, processor: object, options: dict[str, Any]
) -> AsyncConsumer:
    # Built on the private loop so that its asyncio objects belong to that loop.
    return AsyncConsumer(stream, app, processor, **options)


class Producer:
    """A blocking producer. Takes the same arguments as :class:`AsyncProducer`.

    ``put`` returns a :class:`concurrent.futures.Future` of the record's
    :class:`~kinesis_butler.producer.PutResult`; it blocks only while the buffer is full.
    Thread-safe: any thread may put.

    Shutdown. ``close()`` (or leaving ``with``) flushes. A producer never closed is flushed at
    interpreter exit by an ``atexit`` hook (a normal exit, ``sys.exit``, an uncaught exception,
    Ctrl-C). SIGTERM is different: Python's default action for it ends the process at once, with
    no ``atexit``, ``finally`` or flush. ``install_signal_handlers=True`` (main thread only, and
    only where SIGTERM still has its default action) turns SIGTERM into ``SystemExit(143)``
    raised in the main thread, so ``with`` blocks, ``finally`` and the ``atexit`` flush run; the
    previous action is restored on ``close()``. Nothing flushes on ``kill -9``: for that use
    ``ProducerConfig(spool_path=...)``, which keeps accepted records on disk for the next start.
    """

    def __init__(self, stream: str, *, install_signal_handlers: bool = False, **options: Any) -> None:
        self._thread = _LoopThread("kinesis-butler-producer")
        self._closed = False
        self._async: AsyncProducer | None = None
        self._previous_sigterm: Any = None
        try:
            self._async = self._call(_build_producer(stream, options))
        except BaseException:
            self.close()
            raise
        # Holds the producer until it is closed: one dropped unclosed still flushes at exit.
        atexit.register(self.close)
        if install_signal_handlers:
            self._install_sigterm()

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ClosedError("install_signal_handlers=True needs the producer built in the main thread")
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_exit)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise ClosedError("this producer was closed")
        return self._thread.call(coro, timeout, "producer")

    @property
    def producer(self) -> AsyncProducer:
        """The async core this facade drives."""
        if self._async is None:
            raise ClosedError("this producer failed to start")
        return self._async

    def put(
        self, data: bytes | bytearray | memoryview, partition_key: str, explicit_hash_key: str | None = None
    ) -> Future[PutResult]:
        """Accept one record (see :meth:`AsyncProducer.put`); blocks while the buffer is full.

        Raises:
            RecordRejected: the record is too large, or a key is invalid.
            ClosedError: the producer is closed.
        """
        return self._call(_put(self.producer, data, partition_key, explicit_hash_key))

    def flush(self, timeout: float | None = None) -> None:
        """Send everything accepted so far and wait until each record is written or failed."""
        self._call(self.producer.flush(), timeout)

    def close(self) -> None:
        """Flush, stop and end the private loop thread. Idempotent."""
        if self._closed:
            return
        atexit.unregister(self.close)
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is _sigterm_to_exit:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        try:
            if self._async is not None:
                self._call(self._async.aclose())
        finally:
            self._closed = True
            self._thread.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _sigterm_to_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


async def _build_producer(stream: str, options: dict[str, Any]) -> AsyncProducer:
    # Built and started on the private loop, so that its asyncio objects belong to it.
    return await AsyncProducer(stream, **options).start()


async def _put(
    producer: AsyncProducer, data: bytes | bytearray | memoryview, key: str, hash_key: str | None
) -> Future[PutResult]:
    handle = await producer.put(data, key, hash_key)
    future: Future[PutResult] = Future()
    future.set_running_or_notify_cancel()

    def copy(done: PutHandle) -> None:
        error = done.exception()
        if error is None:
            future.set_result(done.result())
        else:
            future.set_exception(error)

    handle.add_done_callback(copy)
    return future

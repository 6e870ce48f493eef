"""Blocking facade: the same AsyncConsumer, run on a private event-loop thread.

No second copy of the logic: every method schedules a coroutine of the async core on the
private loop and waits for it.

Example::

    def handle(records):
        for record in records:
            print(record.data)

    with Consumer("orders", "billing", handle, store="sqlite:///billing.db") as consumer:
        consumer.wait()          # until Ctrl-C / consumer.stop() from another thread
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from kinesis_butler.consumer import AsyncConsumer, ShardStatus
from kinesis_butler.errors import ClosedError
from kinesis_butler.models import Record
from kinesis_butler.processor import IN_PROCESSOR

__all__ = ["Consumer"]

T = TypeVar("T")


class Consumer:
    """A blocking consumer. Takes the same arguments as :class:`AsyncConsumer`.

    ``processor`` may be a plain function (it runs in a worker thread) or a processor class.
    With no processor, iterate with ``for record in consumer`` and call
    ``consumer.checkpoint(record)``.
    """

    def __init__(
        self, stream: str | Sequence[str], app: str, processor: object = None, **options: Any
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kinesis-butler-loop", daemon=True
        )
        self._thread.start()
        self._run: Future[None] | None = None
        self._closed = False
        self._async: AsyncConsumer | None = None
        try:
            self._async = self._call(_build(stream, app, processor, options))
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._loop.is_closed():
            coro.close()
            raise ClosedError("this consumer was closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

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
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

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

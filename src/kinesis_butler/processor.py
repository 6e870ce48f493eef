"""The processor seam: what user code implements, and the Checkpointer it is handed.

The contract is the KCL's ``ShardRecordProcessor``: one processor instance per shard lease,
five callbacks, each taking one input object (so fields can be added without breaking
anyone). It is transport-neutral: the shard loop drives in-process processors and, through
adapters, remote ones (gRPC clients, MultiLang child processes) the same way.

Lifecycle of one instance::

    initialize ──► process_records* ──┬─► shard_ended         (the shard was read to its end)
                                      ├─► shutdown_requested  (graceful stop or planned handoff)
                                      └─► lease_lost          (another worker owns the shard now)

Callbacks may be ``async def`` or plain functions; plain ones run in a worker thread so they
cannot stall the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, Protocol, TypeAlias, cast, runtime_checkable

from kinesis_butler.errors import ProcessorImportError
from kinesis_butler.models import ExtendedSequenceNumber, Record

__all__ = [
    "CheckpointTarget",
    "Checkpointer",
    "InitializationInput",
    "LeaseLostInput",
    "ProcessRecordsInput",
    "RecordFunction",
    "RecordProcessor",
    "RecordProcessorBase",
    "ShardEndedInput",
    "ShutdownRequestedInput",
    "as_processor_factory",
    "call_maybe_async",
    "import_processor",
    "load_processor",
]

CheckpointTarget: TypeAlias = Record | ExtendedSequenceNumber | tuple[str, int] | str | None
"""What a checkpoint names: a record, a position, a ``(sequence, sub_sequence)`` pair, a bare
sequence number, or None for "everything delivered so far"."""


@runtime_checkable
class Checkpointer(Protocol):
    """Records progress for one shard. Refuses (LeaseLost) once the lease is gone."""

    async def checkpoint(self, target: CheckpointTarget = None, *, wait: bool = True) -> None:
        """Mark everything up to and including ``target`` as processed.

        With ``wait=False`` a lease-store outage does not block the caller: the position is
        kept and written as soon as the store answers again (within the failover time).

        Raises:
            LeaseLost: this worker no longer holds the shard's lease.
            CheckpointError: the target goes backwards or was never delivered.
        """

    @property
    def last_checkpoint(self) -> ExtendedSequenceNumber:
        """The position last written to the store."""


@dataclasses.dataclass(frozen=True, slots=True)
class InitializationInput:
    """Passed to ``initialize``: where this shard resumes."""

    shard_id: str
    stream: str
    checkpoint: ExtendedSequenceNumber
    pending_checkpoint: ExtendedSequenceNumber | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessRecordsInput:
    """Passed to ``process_records``: one batch of one shard, in order."""

    records: Sequence[Record]
    checkpointer: Checkpointer
    shard_id: str
    stream: str
    millis_behind_latest: int | None = None
    attempt: int = 1  # >1 when this batch is being retried after the processor raised


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseLostInput:
    """Passed to ``lease_lost``: do not checkpoint, another worker owns the shard now."""

    shard_id: str
    stream: str


@dataclasses.dataclass(frozen=True, slots=True)
class ShardEndedInput:
    """Passed to ``shard_ended``: every record was delivered. The library writes SHARD_END
    itself after this returns; checkpointing here is allowed but not required."""

    shard_id: str
    stream: str
    checkpointer: Checkpointer


@dataclasses.dataclass(frozen=True, slots=True)
class ShutdownRequestedInput:
    """Passed to ``shutdown_requested``: the worker is stopping or handing the shard off.
    Checkpoint what is done; the lease is released after this returns."""

    shard_id: str
    stream: str
    checkpointer: Checkpointer


@runtime_checkable
class RecordProcessor(Protocol):
    """The KCL-style processor. One instance per shard lease."""

    def initialize(self, initialization_input: InitializationInput) -> Awaitable[None] | None: ...

    def process_records(self, process_records_input: ProcessRecordsInput) -> Awaitable[None] | None: ...

    def lease_lost(self, lease_lost_input: LeaseLostInput) -> Awaitable[None] | None: ...

    def shard_ended(self, shard_ended_input: ShardEndedInput) -> Awaitable[None] | None: ...

    def shutdown_requested(
        self, shutdown_requested_input: ShutdownRequestedInput
    ) -> Awaitable[None] | None: ...


class RecordProcessorBase:
    """Convenience base: every callback is a no-op except ``process_records``."""

    async def initialize(self, initialization_input: InitializationInput) -> None:
        return None

    async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
        raise NotImplementedError

    async def lease_lost(self, lease_lost_input: LeaseLostInput) -> None:
        return None

    async def shard_ended(self, shard_ended_input: ShardEndedInput) -> None:
        return None

    async def shutdown_requested(self, shutdown_requested_input: ShutdownRequestedInput) -> None:
        return None


RecordFunction: TypeAlias = Callable[[list[Record]], Awaitable[None] | None]
"""The simple API: called with each batch; when it returns, the batch is checkpointed."""


IN_PROCESSOR: ContextVar[bool] = ContextVar("kinesis_butler_in_processor", default=False)
"""True while a processor callback runs (also in the worker thread of a plain function), so
that blocking calls that would wait for that same callback can refuse to deadlock."""


def _in_processor(func: Callable[..., Any], *args: Any) -> Any:
    IN_PROCESSOR.set(True)  # to_thread copies the context: this stays inside the callback
    return func(*args)


async def call_maybe_async(func: Callable[..., Any], *args: Any) -> Any:
    """Await ``func(*args)`` if it is a coroutine function; otherwise run it in a thread."""
    if inspect.iscoroutinefunction(func):
        return await func(*args)
    result = await asyncio.to_thread(_in_processor, func, *args)
    if inspect.isawaitable(result):  # a plain function that returned a coroutine
        return await result
    return result


class FunctionProcessor(RecordProcessorBase):
    """Adapts a ``RecordFunction``: each batch is checkpointed when the function returns."""

    def __init__(self, func: RecordFunction) -> None:
        self._func = func

    async def process_records(self, process_records_input: ProcessRecordsInput) -> None:
        await call_maybe_async(self._func, list(process_records_input.records))
        # wait=False: a store outage must not stop the processing of the shards we hold.
        await process_records_input.checkpointer.checkpoint(wait=False)

    async def shard_ended(self, shard_ended_input: ShardEndedInput) -> None:
        return None


ProcessorFactory: TypeAlias = Callable[[], RecordProcessor]


def as_processor_factory(processor: object) -> ProcessorFactory:
    """Accept a RecordProcessor class, a zero-argument factory, or a RecordFunction.

    A class with ``process_records`` is instantiated once per shard, and so is the result of a
    callable that takes no arguments. Anything else callable is a function of ``list[Record]``.
    """
    if inspect.isclass(processor):
        if not hasattr(processor, "process_records"):
            raise ProcessorImportError(
                f"{processor.__qualname__} has no process_records method; subclass RecordProcessorBase"
            )
        return cast(ProcessorFactory, processor)
    if isinstance(processor, RecordProcessor) and not callable(processor):
        raise ProcessorImportError(
            "pass the processor class (or a factory), not an instance: each shard needs its own"
        )
    if callable(processor):
        if _is_factory(processor):
            return cast(ProcessorFactory, processor)
        func = processor
        return lambda: FunctionProcessor(func)
    raise ProcessorImportError(f"{processor!r} is neither a processor class nor a function")


def _is_factory(candidate: Callable[..., Any]) -> bool:
    """A callable that takes no argument (and cannot take one) is a factory of processors;
    anything that accepts the batch is a record function."""
    try:
        signature = inspect.signature(candidate)
    except (TypeError, ValueError):  # builtins without a signature: call them with the batch
        return False
    try:
        signature.bind()
    except TypeError:
        return False
    try:
        signature.bind([])
    except TypeError:
        return True
    return False


def import_processor(path: str) -> object:
    """Import ``pkg.module:attr`` and check that it can be a processor; returns the object
    (to pass as ``processor=`` to a consumer)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ProcessorImportError(
            f"invalid processor {path!r}: expected 'package.module:function' "
            "(for example myapp.handlers:handle)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProcessorImportError(
            f"cannot import module {module_name!r} for processor {path!r}: {exc}. "
            "Check the name and that it is on PYTHONPATH (the current directory is included)."
        ) from None
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ProcessorImportError(
                f"module {module_name!r} has no attribute {attr!r} (processor {path!r})"
            ) from None
    as_processor_factory(target)  # validates: raises ProcessorImportError with the reason
    return target


def load_processor(path: str) -> ProcessorFactory:
    """Import ``pkg.module:attr`` and adapt it with :func:`as_processor_factory`."""
    return as_processor_factory(import_processor(path))

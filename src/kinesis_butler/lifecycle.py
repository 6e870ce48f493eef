"""The per-shard state machine and the loop that drives one processor through it.

::

    WAITING_ON_PARENT_SHARDS ──► INITIALIZING ──► PROCESSING ──┬──► SHARD_ENDED ───────┐
              │                       │               │        ├──► SHUTDOWN_REQUESTED ─┤
              │                       │               │        └──► LEASE_LOST ────────┤
              └───────────────────────┴───────────────┴──► (any of the three) ──────────┴──► SHUTDOWN_COMPLETE

* WAITING_ON_PARENT_SHARDS: a child shard waits until every parent lease reached SHARD_END.
* INITIALIZING: ``processor.initialize`` with the checkpoint it resumes from.
* PROCESSING: batches from the RecordSource go to ``process_records``; a processor that raises
  gets the same batch again after a backoff, up to ``processor_max_attempts``.
* SHARD_ENDED: ``shard_ended`` is called, then the library writes SHARD_END and the children's
  leases, and releases the lease.
* SHUTDOWN_REQUESTED: the in-flight batch finishes, ``shutdown_requested`` may checkpoint,
  the lease is released for another worker to take at once.
* LEASE_LOST: processing is cancelled, ``lease_lost`` is called; no checkpoint is possible.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

from kinesis_butler.config import ConsumerConfig
from kinesis_butler.errors import CheckpointError, LeaseLost, ProcessorFailed, StoreError, StoreUnavailable
from kinesis_butler.leasing import HeldLease, LeaseCoordinator
from kinesis_butler.models import SHARD_END, TRIM_HORIZON, ExtendedSequenceNumber, Lease, Record
from kinesis_butler.processor import (
    CheckpointTarget,
    InitializationInput,
    LeaseLostInput,
    ProcessRecordsInput,
    RecordProcessor,
    ShardEndedInput,
    ShutdownRequestedInput,
    call_maybe_async,
)
from kinesis_butler.retrieval.base import Batch, RecordSource
from kinesis_butler.stores.base import LeaseStore

__all__ = ["TRANSITIONS", "IllegalTransition", "ShardCheckpointer", "ShardConsumer", "ShardState"]

log = logging.getLogger("kinesis_butler.lifecycle")


class ShardState(enum.Enum):
    WAITING_ON_PARENT_SHARDS = "waiting_on_parent_shards"  # a parent has not reached SHARD_END
    INITIALIZING = "initializing"  # processor.initialize is running
    PROCESSING = "processing"  # batches are flowing
    SHARD_ENDED = "shard_ended"  # the shard was read to its end; writing SHARD_END
    SHUTDOWN_REQUESTED = "shutdown_requested"  # graceful stop: finish, checkpoint, release
    LEASE_LOST = "lease_lost"  # another worker owns the shard; no more checkpoints
    SHUTDOWN_COMPLETE = "shutdown_complete"  # terminal
    FAILED = "failed"  # the processor kept raising; the shard is stopped (terminal)


_ENDINGS: Final = frozenset({ShardState.SHUTDOWN_REQUESTED, ShardState.LEASE_LOST, ShardState.FAILED})

TRANSITIONS: Final[dict[ShardState, frozenset[ShardState]]] = {
    ShardState.WAITING_ON_PARENT_SHARDS: frozenset({ShardState.INITIALIZING}) | _ENDINGS,
    ShardState.INITIALIZING: frozenset({ShardState.PROCESSING}) | _ENDINGS,
    ShardState.PROCESSING: frozenset({ShardState.SHARD_ENDED}) | _ENDINGS,
    ShardState.SHARD_ENDED: frozenset(
        {ShardState.SHUTDOWN_COMPLETE, ShardState.LEASE_LOST, ShardState.FAILED}
    ),
    ShardState.SHUTDOWN_REQUESTED: frozenset({ShardState.SHUTDOWN_COMPLETE, ShardState.LEASE_LOST}),
    ShardState.LEASE_LOST: frozenset({ShardState.SHUTDOWN_COMPLETE}),
    ShardState.FAILED: frozenset(),
    ShardState.SHUTDOWN_COMPLETE: frozenset(),
}
"""Every legal move. Anything else raises IllegalTransition."""


class IllegalTransition(RuntimeError):
    """A shard loop tried a move the state machine does not allow (a bug, not user error)."""


class ShardCheckpointer:
    """The Checkpointer handed to processors: validates, then writes through the coordinator."""

    def __init__(self, coordinator: LeaseCoordinator, held: HeldLease) -> None:
        self._coordinator = coordinator
        self._held = held
        self.last_delivered: ExtendedSequenceNumber | None = None
        self.at_shard_end = False  # set once the shard was read to its end: SHARD_END is allowed
        self.changed = asyncio.Event()  # set after every checkpoint written

    @property
    def last_checkpoint(self) -> ExtendedSequenceNumber:
        return self._held.lease.checkpoint

    @staticmethod
    def _position(target: CheckpointTarget) -> ExtendedSequenceNumber | None:
        if target is None:
            return None
        if isinstance(target, Record):
            return ExtendedSequenceNumber(target.sequence_number, target.sub_sequence_number)
        if isinstance(target, ExtendedSequenceNumber):
            return target
        if isinstance(target, str):
            return ExtendedSequenceNumber(target)
        sequence, sub_sequence = target
        return ExtendedSequenceNumber(sequence, sub_sequence)

    async def checkpoint(self, target: CheckpointTarget = None, *, wait: bool = True) -> None:
        position = self._position(target)
        if position is None:
            position = self.last_delivered
            if position is None:
                return  # nothing delivered yet: nothing to record
        elif position.is_shard_end:
            if not self.at_shard_end:
                raise CheckpointError(
                    f"cannot checkpoint SHARD_END on shard {self._held.key}: it has not been read to its end"
                )
        elif position.is_sentinel:
            raise CheckpointError(f"cannot checkpoint at {position.sequence} on shard {self._held.key}")
        elif self.last_delivered is None or position > self.last_delivered:
            raise CheckpointError(
                f"checkpoint {position} on shard {self._held.key} is beyond the last delivered record "
                f"({self.last_delivered})"
            )
        await self._coordinator.checkpoint(self._held, position, wait=wait)
        self.changed.set()

    @property
    def caught_up(self) -> bool:
        """True when everything delivered so far is checkpointed."""
        done = self._held.unwritten_checkpoint or self._held.lease.checkpoint
        return self.last_delivered is None or not done < self.last_delivered

    async def wait_caught_up(self) -> None:
        """Wait until everything delivered so far is checkpointed."""
        while not self.caught_up:
            self.changed.clear()
            await self.changed.wait()


class ShardConsumer:
    """Drives one processor through one shard lease. See the module docstring."""

    def __init__(
        self,
        *,
        held: HeldLease,
        stream: str,
        coordinator: LeaseCoordinator,
        store: LeaseStore,
        processor: RecordProcessor,
        source: RecordSource,
        config: ConsumerConfig,
        on_batch: Callable[[str, int], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.held = held
        self.stream = stream
        self.shard_id = held.lease.shard
        self._coordinator = coordinator
        self._store = store
        self._processor = processor
        self._source = source
        self._config = config
        self._on_batch = on_batch
        self._sleep = sleep
        self.state = ShardState.WAITING_ON_PARENT_SHARDS
        self.checkpointer = ShardCheckpointer(coordinator, held)
        self.records_processed = 0
        self.shutdown = asyncio.Event()  # set to ask for a graceful shutdown
        self.error: ProcessorFailed | None = None

    def _move(self, new: ShardState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"shard {self.shard_id}: {self.state.name} -> {new.name} is not allowed")
        log.debug("shard %s: %s -> %s", self.shard_id, self.state.name, new.name)
        self.state = new

    async def run(self) -> None:
        """Run to SHUTDOWN_COMPLETE (or FAILED). Lease loss and processor failures end here;
        other errors (the stream was deleted, ``initialize`` raised) propagate to the caller."""
        work = asyncio.ensure_future(self._work())
        lost = asyncio.ensure_future(self.held.lost.wait())
        deadline = asyncio.ensure_future(self._handoff_deadline())
        try:
            await asyncio.wait({work, lost, deadline}, return_when=asyncio.FIRST_COMPLETED)
            if work.done() or self.held.released:
                await work  # finished, or our own release (shutdown, shard end, handoff) is finishing
            else:
                # Fencing: the lease is gone (or a handoff ran out of time), so in-flight
                # processing must stop now.
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                if deadline.done():
                    log.warning(
                        "shard %s: handoff timed out; handing over at the last checkpoint", self.shard_id
                    )
                    await self._source.aclose()
                    await self._coordinator.release(self.held)
                await self._lease_lost()
        except LeaseLost:
            await self._lease_lost()
        finally:
            for task in (work, lost, deadline):
                task.cancel()
            await asyncio.gather(work, lost, deadline, return_exceptions=True)
            await self._source.aclose()

    async def _handoff_deadline(self) -> None:
        # The new owner takes over if we do not finish within the failover time; stop well
        # before that so our final checkpoint is the one it starts from.
        await self.held.handoff.wait()
        await self._sleep(self._config.failover_time / 2)

    async def _lease_lost(self) -> None:
        if self.state in (ShardState.SHUTDOWN_COMPLETE, ShardState.FAILED):
            return
        if self.state is not ShardState.LEASE_LOST:
            self._move(ShardState.LEASE_LOST)
        try:
            await call_maybe_async(self._processor.lease_lost, LeaseLostInput(self.shard_id, self.stream))
        except Exception:
            log.exception("shard %s: lease_lost callback raised", self.shard_id)
        self._move(ShardState.SHUTDOWN_COMPLETE)

    async def _through_outage(self, write: Callable[[], Awaitable[object]]) -> None:
        """Retry a store write through an outage for as long as we hold the lease (the lease
        watchdog ends the wait: lost.is_set() then cancels this work)."""
        delay = 0.2
        while True:
            try:
                await write()
                return
            except StoreUnavailable as exc:
                log.warning("shard %s: store unavailable (retry in %.1f s): %s", self.shard_id, delay, exc)
                await self._sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _work(self) -> None:
        if self.held.lease.checkpoint.is_shard_end:  # finished already (e.g. handed over at its end)
            await self._shutdown_requested(notify=False)
            return
        if not await self._wait_for_parents():
            await self._shutdown_requested(notify=False)  # never initialized: nothing to tell
            return
        lease = self.held.lease
        self._move(ShardState.INITIALIZING)
        await call_maybe_async(
            self._processor.initialize,
            InitializationInput(self.shard_id, self.stream, lease.checkpoint, lease.pending_checkpoint),
        )
        self._move(ShardState.PROCESSING)
        await self._source.start(lease.checkpoint)
        while True:
            batch_task = asyncio.ensure_future(self._source.next_batch())
            stop_task = asyncio.ensure_future(self.shutdown.wait())
            try:
                await asyncio.wait({batch_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_task.cancel()
                if not batch_task.done():
                    batch_task.cancel()
                    await asyncio.gather(batch_task, return_exceptions=True)
            if batch_task.cancelled():
                await self._shutdown_requested()
                return
            batch = batch_task.result()
            if batch.records:
                await self._deliver(batch.records, batch.millis_behind_latest)
                if self.state is ShardState.FAILED:
                    return
            if batch.shard_end:
                await self._shard_ended(batch)
                return
            if self.shutdown.is_set():
                await self._shutdown_requested()
                return

    async def _wait_for_parents(self) -> bool:
        parents = self.held.lease.parent_shard_ids
        delay = 0.2
        while parents:
            pending = []
            for parent in sorted(parents):
                try:
                    lease = await self._store.get_lease(self.held.lease.key_for(parent))
                except StoreUnavailable as exc:  # ask again later; the lease watchdog decides loss
                    log.warning("shard %s: cannot read parent %s yet: %s", self.shard_id, parent, exc)
                    pending.append(parent)
                    continue
                if lease is not None and not lease.checkpoint.is_shard_end:
                    pending.append(parent)
            if not pending:
                break
            log.debug("shard %s: waiting for parents %s", self.shard_id, pending)
            try:
                await asyncio.wait_for(self.shutdown.wait(), timeout=delay)
                return False
            except TimeoutError:
                delay = min(delay * 2, 2.0)
        return True

    async def _deliver(self, records: list[Record], millis_behind: int | None) -> None:
        last = records[-1]
        self.checkpointer.last_delivered = ExtendedSequenceNumber(
            last.sequence_number, last.sub_sequence_number
        )
        attempt = 1
        while True:
            try:
                await call_maybe_async(
                    self._processor.process_records,
                    ProcessRecordsInput(
                        records, self.checkpointer, self.shard_id, self.stream, millis_behind, attempt
                    ),
                )
                break
            except (LeaseLost, asyncio.CancelledError):
                raise
            except ProcessorFailed as exc:  # the processor retried on its own and gave up: final
                await self._fail(exc)
                return
            except Exception as exc:  # noqa: BLE001 - any processor error means: retry the batch
                if attempt >= self._config.processor_max_attempts:
                    error = ProcessorFailed(
                        f"processor failed {attempt} times on shard {self.shard_id} "
                        f"at {records[0].sequence_number}; "
                        f"the shard is stopped (last error: {type(exc).__name__}: {exc})",
                        shard_id=self.shard_id,
                        attempts=attempt,
                    )
                    error.__cause__ = exc
                    await self._fail(error)
                    return
                delay = random.uniform(
                    0,
                    min(
                        self._config.processor_retry_cap,
                        self._config.processor_retry_base * 2 ** (attempt - 1),
                    ),
                )
                log.warning(
                    "shard %s: processor raised %s: %s; retrying the batch in %.1f s (attempt %d of %d)",
                    self.shard_id,
                    type(exc).__name__,
                    exc,
                    delay,
                    attempt + 1,
                    self._config.processor_max_attempts,
                )
                attempt += 1
                await self._sleep(delay)
        self.records_processed += len(records)
        if self._on_batch is not None:
            self._on_batch(self.shard_id, len(records))

    async def _fail(self, error: ProcessorFailed) -> None:
        self.error = error
        log.error("%s", error)
        self._move(ShardState.FAILED)
        self._coordinator.refuse(self.held.key)
        await self._release()

    async def _release(self) -> None:
        """Stop reading, then give the lease up: the next owner's first read (a fan-out
        subscription above all) must not meet ours still open."""
        await self._source.aclose()
        await self._coordinator.release(self.held)

    async def _shard_ended(self, batch: Batch) -> None:
        child_parents = batch.child_parents
        ranges = {child: (first, last) for child, first, last in batch.child_hash_ranges}
        self._move(ShardState.SHARD_ENDED)
        self.checkpointer.at_shard_end = True
        try:
            await call_maybe_async(
                self._processor.shard_ended, ShardEndedInput(self.shard_id, self.stream, self.checkpointer)
            )
        except ProcessorFailed as exc:  # records of the shard were not processed: no SHARD_END
            await self._fail(exc)
            return
        if getattr(self._processor, "explicit_checkpoints", False) and not self.checkpointer.caught_up:
            # The user had not checkpointed every record when we were asked to stop: leave the
            # shard open in the table, so whoever takes it reads the unconfirmed tail again.
            await self._release()
            self._move(ShardState.SHUTDOWN_COMPLETE)
            return
        # Children first: once SHARD_END is visible, their workers may start them.
        for child, parents in child_parents:
            first, last = ranges.get(child, (None, None))
            child_lease = Lease(
                lease_key=self.held.lease.key_for(child),
                checkpoint=TRIM_HORIZON,
                parent_shard_ids=frozenset(parents),
                starting_hash_key=first,
                ending_hash_key=last,
                stream_name=self.held.lease.stream_name,
                shard_id=child,
            )
            await self._through_outage(partial(self._store.create_lease_if_absent, child_lease))
        if child_parents:
            await self._coordinator.update_children(self.held, frozenset(c for c, _ in child_parents))
        await self._coordinator.checkpoint(self.held, SHARD_END)
        await self._release()
        log.info("shard %s: reached SHARD_END; children %s", self.shard_id, [c for c, _ in child_parents])
        self._move(ShardState.SHUTDOWN_COMPLETE)

    async def _shutdown_requested(self, *, notify: bool = True) -> None:
        self._move(ShardState.SHUTDOWN_REQUESTED)
        try:
            if notify:
                await call_maybe_async(
                    self._processor.shutdown_requested,
                    ShutdownRequestedInput(self.shard_id, self.stream, self.checkpointer),
                )
        except LeaseLost:
            raise
        except ProcessorFailed as exc:  # the processor gave up on a record: report it, release
            self.error = exc
            log.error("%s", exc)  # noqa: TRY400 - the message carries the cause
        except Exception:
            log.exception("shard %s: shutdown_requested callback raised", self.shard_id)
        try:
            await self._release()
        except StoreError as exc:
            log.warning("shard %s: could not release the lease (it will expire): %s", self.shard_id, exc)
        self._move(ShardState.SHUTDOWN_COMPLETE)

"""One prefetch byte budget for the whole process, so 1,000 shards stay bounded in memory.

Every polling source asks the budget for bytes *before* it calls GetRecords and sizes the call's
``Limit`` from what it was granted (records x the shard's measured bytes per record), then trues
the grant up to what the answer really holds. The bytes stay charged while the batch waits in
the prefetch queue and while the processor works on it; they are returned when the processor
asks for the next batch. A grant is at most the fair share (budget / sources), at least one
record's worth, so one busy shard cannot starve the others and a shard whose single record
exceeds the whole budget still makes progress (alone).

What is counted is an estimate of the memory a batch holds in Python (payload + partition key +
the Record object and its sequence-number string), not the wire size; see :func:`record_cost`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Final

from kinesis_butler.models import Record

__all__ = ["DEFAULT_BUDGET_BYTES", "PER_RECORD_OVERHEAD", "ByteBudget", "process_budget", "record_cost"]

log = logging.getLogger("kinesis_butler.retrieval")

DEFAULT_BUDGET_BYTES: Final = 256 * 1024 * 1024
PER_RECORD_OVERHEAD: Final = 360
"""Python memory of one decoded Record beyond its payload and partition key, measured with
tracemalloc on msgspec decodes of GetRecords answers: the Struct 88 B, the sequence-number
string 106 B, the partition-key and payload object headers 49 + 33 B, the timestamp float 24 B,
the list slot 8 B (309 B), plus pymalloc's rounding to 16-byte sizes (~50 B)."""


def record_cost(records: list[Record]) -> int:
    """The budget charge of a batch: payload and partition keys plus the per-record overhead."""
    total = PER_RECORD_OVERHEAD * len(records)
    for record in records:
        total += len(record.data) + len(record.partition_key)
    return total


class ByteBudget:
    """A byte budget shared by many sources. Not thread-safe: one event loop.

    ``acquire`` waits until at least ``minimum`` bytes are free (or nothing is held at all),
    then grants up to ``want`` capped at the fair share. ``settle`` replaces a grant by the
    bytes a batch really holds (which may exceed the grant by one record's error: the cost
    of a GetRecords answer is only known after it arrives). ``release`` returns bytes.
    """

    def __init__(self, limit: int = DEFAULT_BUDGET_BYTES) -> None:
        if limit < 1:
            raise ValueError(f"budget limit must be >= 1 byte, got {limit}")
        self.limit = limit
        self.used = 0
        self.high_water = 0
        self.sources = 0
        self._waiters: collections.deque[tuple[int, int, asyncio.Future[int]]] = collections.deque()

    def __repr__(self) -> str:
        return f"ByteBudget(used={self.used}, limit={self.limit}, sources={self.sources})"

    @property
    def fair_share(self) -> int:
        return max(1, self.limit // max(1, self.sources))

    def register(self) -> None:
        self.sources += 1

    def unregister(self) -> None:
        self.sources = max(0, self.sources - 1)

    def _fits(self, minimum: int) -> bool:
        return self.used == 0 or self.limit - self.used >= minimum

    async def acquire(self, want: int, minimum: int) -> int:
        """Wait for room, then charge and return the grant (between ``minimum`` and ``want``).

        Waiters are served first come, first served, so a large request is not overtaken forever;
        a waiter's bytes are charged when it is woken, so nobody slips in between.
        """
        minimum = max(1, min(minimum, want))
        if not self._waiters and self._fits(minimum):
            return self._grant(want, minimum)
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = (want, minimum, waiter)
        self._waiters.append(entry)
        try:
            return await waiter
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif waiter.done() and not waiter.cancelled():
                self._charge(-waiter.result())  # woken and charged, then cancelled: give it back
            self._wake()
            raise

    def _grant(self, want: int, minimum: int) -> int:
        grant = max(minimum, min(want, self.fair_share, self.limit - self.used))
        self._charge(grant)
        return grant

    def settle(self, granted: int, actual: int) -> None:
        """Replace a grant by what the batch really holds."""
        self._charge(actual - granted)
        self._wake()

    def release(self, amount: int) -> None:
        if amount:
            self._charge(-amount)
            self._wake()

    def _charge(self, delta: int) -> None:
        self.used = max(0, self.used + delta)
        self.high_water = max(self.high_water, self.used)

    def _wake(self) -> None:
        """Grant waiters in order while the head one fits."""
        while self._waiters:
            want, minimum, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if not self._fits(minimum):
                return
            self._waiters.popleft()
            waiter.set_result(self._grant(want, minimum))


_budgets: dict[asyncio.AbstractEventLoop, ByteBudget] = {}


def process_budget(limit: int) -> ByteBudget:
    """The budget every consumer on the running event loop shares.

    One process normally runs one loop; each loop gets its own budget because asyncio
    primitives belong to one loop. When consumers ask for different limits the largest wins.
    """
    loop = asyncio.get_running_loop()
    for other in [known for known in _budgets if known.is_closed()]:
        del _budgets[other]
    budget = _budgets.get(loop)
    if budget is None:
        budget = _budgets[loop] = ByteBudget(limit)
    elif limit > budget.limit:
        log.info("prefetch budget raised from %d to %d bytes by a consumer's config", budget.limit, limit)
        budget.limit = limit
    return budget

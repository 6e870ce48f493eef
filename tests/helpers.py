"""Small shared test helpers: waiting on conditions with deadlines (never fixed sleeps)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from kinesis_butler import AsyncConsumer, Record

POLL_INTERVAL = 0.01  # how often a wait re-checks its condition


async def wait_until(
    condition: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL)


async def wait_until_async(
    condition: Callable[[], Awaitable[object]], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Like :func:`wait_until`, for a condition that must be awaited (e.g. reads a store)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL)


def wait_until_sync(condition: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


class Collector:
    """A processor function that remembers every record, in delivery order."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    async def __call__(self, records: list[Record]) -> None:
        self.records.extend(records)

    @property
    def numbers(self) -> list[int]:
        """The ``n`` of each ``{"n": ...}`` payload, in delivery order."""
        return [json.loads(r.data)["n"] for r in self.records]


async def consume_until(
    consumer: AsyncConsumer, condition: Callable[[], bool], *, timeout: float = 60.0
) -> None:
    """Run ``consumer`` until ``condition`` holds, then stop it gracefully and wait for it."""
    runner = asyncio.create_task(consumer.run())
    try:
        await wait_until(condition, timeout=timeout, what="records to arrive")
    finally:
        consumer.request_stop()
        await runner

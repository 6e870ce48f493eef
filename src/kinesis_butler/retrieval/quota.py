"""Per-shard read quotas: 5 GetRecords per second and 2 MiB per second, for everything that reads
the shard from this process.

Kinesis enforces both per shard, shared by every application polling it. Within one application
a lease guarantees a single reader across processes (a handoff stops the old reader before the
new one starts), but inside one process two sources may read one shard at once: a lease lost and
re-acquired while the old fetch still runs, or two consumer apps on the same stream. So the
pacer is keyed by (stream, shard) and shared by every source on the event loop.

The rates are the quota times ConsumerConfig.read_quota_share, which lets several polling apps
on one stream split the quota instead of throttling each other: with two apps at 0.5 each,
neither is ever throttled.

Byte pacing: a call that returned ``n`` bytes moves the shard's next allowed call to
``n / bytes_per_second`` seconds after it (a 10 MiB answer waits 5 s, which is exactly the
penalty Kinesis would otherwise impose with a throttling error).
"""

from __future__ import annotations

import asyncio

__all__ = ["ShardPacer", "pacer_for"]


def _now() -> float:
    # The loop's clock, not time.monotonic(): the deterministic simulation runs on virtual time.
    return asyncio.get_running_loop().time()


class ShardPacer:
    """When the next GetRecords on one shard may start."""

    __slots__ = ("_next", "_users", "bytes_per_second", "min_interval")

    def __init__(self, calls_per_second: float = 5.0, bytes_per_second: float = 2 * 1024 * 1024) -> None:
        self.min_interval = 1.0 / calls_per_second
        self.bytes_per_second = bytes_per_second
        self._next = 0.0
        self._users = 0

    def delay(self, now: float | None = None) -> float:
        """Seconds until a call is allowed (0 when it is)."""
        return max(0.0, self._next - (_now() if now is None else now))

    def went_out(self, at: float) -> None:
        """A call reserved earlier really started at ``at`` (after waiting for memory)."""
        self._next = max(self._next, at + self.min_interval)

    def received(self, started: float, nbytes: int) -> None:
        """The call that started at ``started`` returned ``nbytes`` of records."""
        self._next = max(self._next, started + nbytes / self.bytes_per_second)

    def hold_off(self, seconds: float) -> None:
        """Nobody calls for ``seconds`` (after throttling)."""
        self._next = max(self._next, _now() + seconds)

    async def wait(self, not_before: float = 0.0) -> float:
        """Reserve the next free call slot no earlier than ``not_before``, sleep until it, and
        return it. Slots are handed out in the order callers ask, so two readers of one shard
        alternate instead of one starving the other."""
        now = _now()
        slot = max(self._next, now, not_before)
        self._next = slot + self.min_interval
        if slot > now:
            await asyncio.sleep(slot - now)
        return slot


_pacers: dict[asyncio.AbstractEventLoop, dict[tuple[str, str, str], ShardPacer]] = {}


class _Lease:
    """A reference to a shared pacer; ``release`` drops the registry entry with the last user."""

    __slots__ = ("_key", "_loop", "pacer")

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, str, str], pacer: ShardPacer) -> None:
        self._loop, self._key, self.pacer = loop, key, pacer

    def release(self) -> None:
        pacer = self.pacer
        pacer._users -= 1
        table = _pacers.get(self._loop)
        if pacer._users <= 0 and table is not None and table.get(self._key) is pacer:
            del table[self._key]
            if not table:
                del _pacers[self._loop]


def pacer_for(
    stream: str,
    shard_id: str,
    calls_per_second: float = 5.0,
    bytes_per_second: float = 2 * 1024 * 1024,
    *,
    app: str = "",
) -> _Lease:
    """The pacer every source of ``app`` reading ``shard_id`` of ``stream`` on this loop shares.

    The rates are this app's part of the shard's quota (each app has its own pacer, at its own
    share); when two readers of one app ask for different rates the slower one applies."""
    loop = asyncio.get_running_loop()
    table = _pacers.setdefault(loop, {})
    key = (app, stream, shard_id)
    pacer = table.get(key)
    if pacer is None:
        pacer = table[key] = ShardPacer(calls_per_second, bytes_per_second)
    else:
        pacer.min_interval = max(pacer.min_interval, 1.0 / calls_per_second)
        pacer.bytes_per_second = min(pacer.bytes_per_second, bytes_per_second)
    pacer._users += 1
    return _Lease(loop, key, pacer)

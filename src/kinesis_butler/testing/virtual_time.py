"""A virtual-time asyncio event loop (trio's autojump clock, for asyncio).

:class:`VirtualEventLoop`'s clock only moves when nothing is ready to run, then jumps to the
next timer, so sleeps and timeouts end at once, in a fixed order; :func:`virtual_clocks` points
the library's ``time.monotonic``/``time.time`` at it for the duration of a run. No thread may
run (its work would not advance virtual time).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import selectors
import sys
import time
import types
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["EPOCH", "SimulationDeadlock", "VirtualEventLoop", "run_simulation", "virtual_clocks"]

_T = TypeVar("_T")
EPOCH = 1_795_000_000.0  # what time.time() reads at virtual time 0: a fixed date, deterministic


class SimulationDeadlock(RuntimeError):
    """Nothing is ready and no timer is scheduled: the simulated system waits forever."""


class _AutojumpSelector(selectors.DefaultSelector):
    """Polls the loop's self-pipe without blocking; a wait for the next timer becomes a jump."""

    def __init__(self, advance: Callable[[float], None]) -> None:
        super().__init__()
        self._advance = advance

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:  # no timer at all: only another thread could still wake us
            if not (ready := super().select(1.0)):
                raise SimulationDeadlock("every task waits and no timer is scheduled")
            return ready
        self._advance(timeout)
        return []


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock that jumps to the next timer when nothing is ready."""

    def __init__(self, start: float = 0.0) -> None:
        self._sim_now = start
        super().__init__(_AutojumpSelector(self._sim_advance))

    def time(self) -> float:
        return self._sim_now

    def _sim_advance(self, seconds: float) -> None:
        self._sim_now += seconds


class _VirtualTime:
    """Stands in for the ``time`` module inside ``kinesis_butler`` during a simulation."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.monotonic = self.perf_counter = loop.time
        self.time = lambda: EPOCH + loop.time()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextlib.contextmanager
def virtual_clocks(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Make ``kinesis_butler.*`` read ``loop.time()`` where it reads the real clock: ``time`` or
    its clocks as module globals, and as keyword-only defaults of functions and methods
    (``LeaseCoordinator(clock=time.monotonic)``). Undone on exit."""
    shim = _VirtualTime(loop)
    by_id: dict[int, Any] = {id(time): shim, id(time.monotonic): shim.monotonic}
    by_id |= {id(time.time): shim.time, id(time.perf_counter): shim.perf_counter}
    undo: list[tuple[Any, str, Any]] = []

    def swap(value: Any) -> Any:
        return by_id.get(id(value), value)

    def patch(owner: Any, attr: str, value: Any) -> None:
        undo.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    for name, module in list(sys.modules.items()):
        if module is None or name.partition(".")[0] != "kinesis_butler":
            continue
        for attr, value in list(vars(module).items()):
            if swap(value) is not value:
                patch(module, attr, swap(value))
            members = vars(value).values() if isinstance(value, type) and value.__module__ == name else ()
            for func in [value, *(getattr(m, "__func__", m) for m in members)]:  # methods, static too
                kw = getattr(func, "__kwdefaults__", None)  # keyword-only: clock=..., sleep=...
                if isinstance(func, types.FunctionType) and kw and any(swap(v) is not v for v in kw.values()):
                    patch(func, "__kwdefaults__", {k: swap(v) for k, v in kw.items()})
    try:
        yield
    finally:
        for owner, attr, value in reversed(undo):
            setattr(owner, attr, value)


def run_simulation(main: Callable[[], Coroutine[Any, Any, _T]], *, seed: int = 0) -> _T:
    """Run ``main()`` on a fresh :class:`VirtualEventLoop` with :func:`virtual_clocks` and
    ``random`` seeded with ``seed`` (its state is restored afterwards)."""
    state = random.getstate()
    random.seed(seed)
    loop = VirtualEventLoop()
    try:
        with virtual_clocks(loop), asyncio.Runner(loop_factory=lambda: loop) as runner:
            return runner.run(main())
    finally:
        random.setstate(state)

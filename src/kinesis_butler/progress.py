"""A dependency-free progress bar for the CLI and the demo (stderr; plain lines when not a TTY)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """Draws ``[#####.....] done/total unit  rate/s`` at most ten times a second."""

    def __init__(
        self, total: int | None, *, unit: str = "records", stream: TextIO | None = None, width: int = 30
    ) -> None:
        self.total = total
        self.unit = unit
        self.done = 0
        self._stream = stream or sys.stderr
        self._width = width
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._tty = self._stream.isatty()
        self._last_quarter = -1

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._tty:
            if now - self._last_draw >= 0.1 or self._finished:
                self._last_draw = now
                self._stream.write("\r" + self._line(now))
                self._stream.flush()
        elif self.total:
            quarter = min(4, self.done * 4 // self.total)
            if quarter > self._last_quarter:
                self._last_quarter = quarter
                self._stream.write(self._line(now) + "\n")
                self._stream.flush()

    @property
    def _finished(self) -> bool:
        return self.total is not None and self.done >= self.total

    def _line(self, now: float) -> str:
        rate = self.done / max(now - self._started, 1e-6)
        if self.total:
            filled = min(self._width, self._width * self.done // self.total)
            bar = "#" * filled + "." * (self._width - filled)
            return f"[{bar}] {self.done}/{self.total} {self.unit}  {rate:,.0f}/s "
        return f"{self.done} {self.unit}  {rate:,.0f}/s "

    def close(self) -> None:
        if self._tty:
            self._stream.write("\r" + self._line(time.monotonic()) + "\n")
            self._stream.flush()

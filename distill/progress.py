"""A small progress bar on stderr: count/total, items/s and ETA (turned off by --quiet).

It always prints when enabled (also to a non-TTY, then one line every few seconds) so that logs of
long runs show a rate. Stages take a ``Bar`` or ``None``.
"""
from __future__ import annotations

import sys
import time


def _fmt_time(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Bar:
    def __init__(self, total: int | None, desc: str, unit: str = "it", stream=None, min_interval: float | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval = min_interval if min_interval is not None else (0.2 if self.tty else 5.0)
        self.n = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.min_interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        dt = max(now - self.t0, 1e-9)
        rate = self.n / dt
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(frac * 24)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            text = f"{self.desc}: {frac:4.0%} |{bar:<24}| {self.n}/{self.total} [{_fmt_time(dt)}<{_fmt_time(eta)}, {rate:,.1f} {self.unit}/s]"
        else:
            text = f"{self.desc}: {self.n} [{_fmt_time(dt)}, {rate:,.1f} {self.unit}/s]"
        if self.tty:
            self.stream.write("\r" + text + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.perf_counter(), end="\n")


def bar(total: int | None, desc: str, unit: str = "it", quiet: bool = False) -> Bar | None:
    return None if quiet else Bar(total, desc, unit)

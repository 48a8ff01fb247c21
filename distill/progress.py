"""Progress bars: tqdm on stderr (turned off by --quiet). On a non-TTY (logs of long runs) it
redraws at most every 5 s, so a log shows the rate without flooding."""
from __future__ import annotations

import sys


def note(msg: str, quiet: bool = False) -> None:
    """One line on stderr, prefixed ``distill:`` (warnings and notes of the stages)."""
    if not quiet:
        sys.stderr.write(f"distill: {msg}\n")
        sys.stderr.flush()


def bar(total: int | None, desc: str, unit: str = "it", quiet: bool = False):
    """A tqdm bar, or None when quiet (call sites do ``if pbar: pbar.update(n)``; a bar is always true,
    also without a total, where tqdm's own ``bool()`` raises)."""
    if quiet:
        return None
    from tqdm import tqdm

    class _Bar(tqdm):
        def __bool__(self) -> bool:
            return True

    tty = sys.stderr.isatty()
    return _Bar(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=0.2 if tty else 5.0,
                dynamic_ncols=tty, unit_scale=True)

"""Test hooks: faults the test suite and ``tools/faults.py`` inject into real runs.

They are read once, from the ``DISTILL_FAULT_*`` environment variables, when this module is first
imported (a test that sets one in-process calls ``reload()``). With none set, ``ACTIVE`` is False and a
call site costs one attribute read: ``if hooks.ACTIVE: hooks.fire(...)``.

* ``DISTILL_FAULT_TRAIN_RANK=R``: training rank R's data stream raises ``UserError`` at its third batch
  (``fire("train-batch", rank=R, batch=i)``).
"""
from __future__ import annotations

import os

PREFIX = "DISTILL_FAULT_"
TRAIN_RANK_ENV = "DISTILL_FAULT_TRAIN_RANK"
ENV: dict[str, str] = {}
ACTIVE = False


def reload() -> None:
    """Read the hooks from the environment again."""
    global ENV, ACTIVE
    ENV = {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
    ACTIVE = bool(ENV)


def fire(point: str, **where) -> None:
    """Inject the fault the environment asks for at ``point``, if any."""
    if point == "train-batch" and where.get("batch") == 2 and ENV.get(TRAIN_RANK_ENV) == str(where.get("rank")):
        from .files import UserError
        raise UserError(f"injected fault ({TRAIN_RANK_ENV}={where['rank']}) in the training stream at batch 2")


reload()

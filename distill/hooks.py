"""Test hooks: faults the test suite and ``tools/faults.py`` inject into real runs.

They are read once, from the ``DISTILL_FAULT_*`` environment variables, when this module is first
imported (a test that sets one in-process calls ``reload()``). With none set, ``ACTIVE`` is False and a
call site costs one attribute read: ``if hooks.ACTIVE: hooks.fire(...)``.

* ``DISTILL_FAULT_TRAIN_RANK=R``: training rank R's data stream raises ``UserError`` at its third batch
  (``fire("train-batch", rank=R, batch=i)``).
* ``DISTILL_FAULT_KILL_AT_STEP=N``: the training process SIGKILLs itself right after optimiser step N
  (``fire("train-step", step=n)``): a real, unannounced death between checkpoints.

(Writes have their own hook, ``files.KILL_AT_ENV``, and cache-teacher's shard tasks and shard reads theirs:
``engine.FAULT_ENV``, ``shards.READ_FAULT_ENV``; each is read once per write, task or shard, not per batch.)
"""
from __future__ import annotations

import os

PREFIX = "DISTILL_FAULT_"
TRAIN_RANK_ENV = "DISTILL_FAULT_TRAIN_RANK"
KILL_AT_STEP_ENV = "DISTILL_FAULT_KILL_AT_STEP"
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
    if point == "train-step" and ENV.get(KILL_AT_STEP_ENV) == str(where.get("step")):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


reload()

"""Test hooks: the faults the test suite and ``tools/faults.py`` inject into real runs, all here.

They are read once, from the ``DISTILL_FAULT_*`` environment variables, when this module is first
imported (Ray workers get them through the engine's runtime environment; a test that sets one in its
own process calls ``reload()``). With none set ``ACTIVE`` is False, and a call site costs one attribute
read: ``if hooks.ACTIVE: hooks.fire(...)``.

* ``DISTILL_FAULT_TRAIN_RANK=R``: training rank R's data stream raises ``error`` (a ``UserError``) at its third batch.
* ``DISTILL_FAULT_KILL_AT_STEP=N``: the training process SIGKILLs itself right after optimiser step N.
* ``DISTILL_FAULT_KILL_AT=NAME:N[:before]``: SIGKILL right after the Nth atomic write of a file named
  NAME is renamed into place, or right before that rename (the complete temporary file is left).
* ``DISTILL_FAULT_KILL_ONCE=MARKER``: the first cache-teacher shard task that finds MARKER absent
  creates it and kills its own worker process.
* ``DISTILL_FAULT_READ_ONCE=MARKER``: the first shard read that finds MARKER absent creates it and fails
  with an I/O error after the member it just read.
* ``DISTILL_FAULT_STORE_DELAY_MS=D``: every request to an object store (GET, HEAD, list, PUT) waits D ms
  first (a store's request latency, on loopback: ``tools/bench_storage.py``).
"""
from __future__ import annotations

import os
import signal

PREFIX = "DISTILL_FAULT_"
TRAIN_RANK_ENV = "DISTILL_FAULT_TRAIN_RANK"
KILL_AT_STEP_ENV = "DISTILL_FAULT_KILL_AT_STEP"
KILL_AT_ENV = "DISTILL_FAULT_KILL_AT"
KILL_ONCE_ENV = "DISTILL_FAULT_KILL_ONCE"
READ_ONCE_ENV = "DISTILL_FAULT_READ_ONCE"
STORE_DELAY_ENV = "DISTILL_FAULT_STORE_DELAY_MS"
ENV: dict[str, str] = {}
ACTIVE = False
_writes: dict[str, int] = {}


def reload() -> None:
    """Read the hooks from the environment again."""
    global ENV, ACTIVE
    ENV = {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
    ACTIVE = bool(ENV)


def _first_time(marker: str | None) -> bool:
    """True once per marker file: creates it."""
    if not marker or os.path.exists(marker):
        return False
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    return True


def fire(point: str, **at) -> None:
    """Inject the fault the environment asks for at ``point``, if any."""
    if point == "train-batch" and at["batch"] == 2 and ENV.get(TRAIN_RANK_ENV) == str(at["rank"]):
        raise at["error"](f"injected fault ({TRAIN_RANK_ENV}={at['rank']}) in the training stream at batch 2")
    if point == "train-step" and ENV.get(KILL_AT_STEP_ENV) == str(at["step"]):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "atomic-write" and ENV.get(KILL_AT_ENV):
        want, n, *when = ENV[KILL_AT_ENV].split(":")
        if want == at["name"] and at["before"] == (when == ["before"]):
            _writes[want] = _writes.get(want, 0) + 1
            if _writes[want] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
    if point == "store-request" and ENV.get(STORE_DELAY_ENV):
        import time
        time.sleep(float(ENV[STORE_DELAY_ENV]) / 1000)
    if point == "shard-task" and _first_time(ENV.get(KILL_ONCE_ENV)):
        os._exit(1)
    if point == "shard-read" and _first_time(ENV.get(READ_ONCE_ENV)):
        raise OSError(5, f"Input/output error (injected by {READ_ONCE_ENV})")


reload()

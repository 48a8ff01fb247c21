"""The only Ray user: start or join Ray, run one task per shard on a pool of actors, retry shards
whose worker died or raised, report progress.

Workers are plain Python classes with ``__init__(**kwargs)``, an optional ``probe()`` and
``run(task: dict) -> dict``. The engine wraps them in ``ray.remote`` actors. A worker that dies
(process killed, node lost) is replaced and its shard resubmitted, up to ``retries`` times; a
Python exception inside ``run`` is reported at once on stderr (shard, last line) and the shard is
resubmitted up to ``retries`` times too (a UserError is not retried), then it is that shard's
failure and the other shards go on.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from .files import UserError

FAULT_ENV = "DISTILL_FAULT_KILL_ONCE"   # test hook: path of a marker file; the first run() that finds it absent creates it and kills its own process


@dataclass
class ShardOutcome:
    task: dict
    result: dict | None = None
    error: str | None = None
    attempts: int = 0


@dataclass
class RayContext:
    """Embedded local Ray (started here, stopped at exit) or a cluster given by address."""
    address: str | None = None
    num_cpus: int | None = None
    started: bool = field(default=False, init=False)

    def __enter__(self):
        import ray
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if ray.is_initialized():
            return self
        kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, configure_logging=True,
                                  logging_level="ERROR")
        try:
            if address:
                ray.init(address=address, **kw)
            else:
                env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
                # address="local": always a new embedded Ray, even when a `ray start` cluster runs here
                ray.init(address="local", num_cpus=self.num_cpus or os.cpu_count(), runtime_env={"env_vars": env}, **kw)
        except ConnectionError as e:
            raise UserError(f"cannot connect to Ray at {address}: {e}") from None
        self.started = True
        return self

    def __exit__(self, *exc):
        if self.started:
            import ray
            ray.shutdown()
        return False


def cluster_resources() -> dict:
    import ray
    return ray.cluster_resources()


def maybe_inject_fault() -> None:
    """Kill this worker process once, when the test hook asks for it (real process death)."""
    marker = os.environ.get(FAULT_ENV)
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)


class Progress:
    """A Ray actor that counts items done across workers; the driver polls it."""

    def __init__(self):
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def get(self) -> int:
        return self.n


def run_pool(worker_cls, init_kwargs: dict, tasks: list[dict], *, workers: int, num_cpus: float = 1,
             num_gpus: float = 0, retries: int = 2, on_result: Callable[[ShardOutcome], None] | None = None,
             on_progress: Callable[[int], None] | None = None, probe: Callable[[Any], None] | None = None
             ) -> list[ShardOutcome]:
    """Run ``worker.run(task)`` for every task on ``workers`` actors; returns outcomes in task order.

    ``probe(result_of_worker.probe())`` runs once before any task, so that a bad teacher is refused
    before work starts (raise UserError there)."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

    died = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)
    opts: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)
    if os.environ.get(FAULT_ENV):   # test hook travels to the workers
        opts["runtime_env"] = {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}}
    Actor = ray.remote(**opts)(worker_cls)
    counter = ray.remote(num_cpus=0)(Progress).remote()
    init_kwargs = dict(init_kwargs, progress=counter)
    outcomes = [ShardOutcome(task=t) for t in tasks]
    workers = max(1, min(workers, len(tasks))) if tasks else 0
    actors = [Actor.remote(**init_kwargs) for _ in range(workers)]
    if probe is not None and actors:
        try:
            probe(ray.get(actors[0].probe.remote()))
        except died as e:
            raise RuntimeError(f"worker failed to start: {e}") from None
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None
    pending: dict[Any, tuple[int, int]] = {}   # future -> (task index, actor slot)
    queue = list(range(len(tasks)))
    queue.reverse()

    def submit(slot: int) -> None:
        if queue:
            i = queue.pop()
            outcomes[i].attempts += 1
            pending[actors[slot].run.remote(tasks[i])] = (i, slot)

    for slot in range(workers):
        submit(slot)
    last = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        if on_progress is not None:
            n = ray.get(counter.get.remote())
            if n != last:
                on_progress(n - last)
                last = n
        if not ready:
            continue
        fut = ready[0]
        i, slot = pending.pop(fut)
        try:
            outcomes[i].result = ray.get(fut)
        except died as e:
            ray.kill(actors[slot], no_restart=True)
            actors[slot] = Actor.remote(**init_kwargs)
            if outcomes[i].attempts <= retries:
                queue.append(i)        # retry this shard next, on the fresh worker
            else:
                outcomes[i].error = f"worker died {outcomes[i].attempts} times: {type(e).__name__}"
        except ray.exceptions.RayTaskError as e:
            if _raised(outcomes[i], _unwrap(e), retries):
                queue.append(i)        # a Python exception may be transient (I/O): retried, bounded
        if outcomes[i].result is not None or outcomes[i].error is not None:
            if on_result is not None:
                on_result(outcomes[i])
        submit(slot)
    if on_progress is not None:
        n = ray.get(counter.get.remote())
        if n != last:
            on_progress(n - last)
    for a in actors:
        ray.kill(a, no_restart=True)
    ray.kill(counter)
    return outcomes


def _raised(outcome: ShardOutcome, err: BaseException, retries: int) -> bool:
    """Report a task's exception at once (shard, last line of the error); True when it is to be
    retried, else the outcome's error is set. A UserError is not retried."""
    line = (str(err).strip().splitlines() or [""])[-1]
    msg = f"{type(err).__name__}: {line}"
    again = outcome.attempts <= retries and not isinstance(err, UserError)
    sys.stderr.write(f"distill: shard {outcome.task.get('name', '?')} failed (attempt {outcome.attempts}"
                     f"{', retrying' if again else ''}): {msg}\n")
    if not again:
        outcome.error = msg
    return again


def _unwrap(e) -> BaseException:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return RuntimeError(str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))

"""The only Ray user: start or join Ray, run one task per shard on a pool of actors, retry shards
whose worker died or raised, report progress.

Workers are plain Python classes with ``__init__(**kwargs)``, an optional ``probe()`` and
``run(task: dict) -> dict``. The engine wraps them in ``ray.remote`` actors and gives a task only
to a worker that is up (its ``__ray_ready__`` returned). A worker that dies (process killed, node
lost) leaves the pool, which goes on with the live workers: its shard is resubmitted to the next
free one, up to ``retries`` times, and a replacement is requested that joins once Ray has placed
it (on a cluster that lost a node it may never be: nothing waits for it while a worker is live).
With no live worker and none up within ``wait_s`` the run stops with one line (rerun to resume).
A Python exception inside ``run`` is reported at once on stderr (shard, last line) and the shard is
resubmitted up to ``retries`` times too (a UserError is not retried), then it is that shard's
failure and the other shards go on.

A Python exception in a worker's ``__init__`` is caught in the worker and reported to the driver: a
UserError ends the run at once, another one when no worker is left to run the shards (an exception
in ``probe`` at once); each as one UserError line. What reaches the terminal of any worker error is
one plain line (the exception's type and last line, ANSI codes removed); its full traceback is
appended to ``log_path`` and the line names that file.
"""
from __future__ import annotations

import datetime
import itertools
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from .files import UserError

ERRORS_LOG = ".distill.errors.log"     # in a stage's output directory: full tracebacks of worker errors


@dataclass
class ShardOutcome:
    task: dict
    result: dict | None = None
    error: str | None = None
    attempts: int = 0


# The embedded Ray's settings. Ray runs its workers at nice 15 (``worker_niceness``): in an embedded run the
# workers are the job, and at 15 they lose every time slice to Ray's own daemons and the driver, which
# stalls a CPU teacher's intra-op threads at each barrier; here they run at the driver's priority. Idle
# prestarted workers and the metrics agent's periodic collection cost a few percent of a core each, which
# a small machine feels and an embedded run does not use.
EMBEDDED_RAY_CONFIG = {"worker_niceness": 0, "enable_worker_prestart": False, "prestart_worker_first_driver": False,
                       "enable_metrics_collection": False}


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
        # ray.init replaces the SIGTERM handler (its core worker prints a C++ dump and exits 1): the
        # caller's (the CLI's: SIGTERM is handled as Ctrl-C) is put back once Ray runs
        on_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        try:
            if address:
                ray.init(address=address, **kw)
            else:
                env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
                # address="local": always a new embedded Ray, even when a `ray start` cluster runs here
                ray.init(address="local", num_cpus=self.num_cpus or os.cpu_count(), runtime_env={"env_vars": env},
                         _system_config=EMBEDDED_RAY_CONFIG, **kw)
        except ConnectionError as e:
            raise UserError(f"cannot connect to Ray at {address}: {e}") from None
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
        self.started = True
        return self

    def __exit__(self, *exc):
        if self.started:
            import ray
            if not (self.address or os.environ.get("RAY_ADDRESS")):
                _stop_autoscaler_monitor()
            ray.shutdown()
        return False


def _stop_autoscaler_monitor() -> None:
    """Kill the embedded Ray's autoscaler monitor ahead of ``ray.shutdown``. Shutdown stops Ray's daemons
    one at a time, giving each 1 s to exit on SIGTERM before it sends SIGKILL; the monitor never exits in
    that second (measured: 1.02 of shutdown's 1.38 s, at the end of every command). It holds nothing of
    ours: a single embedded node does not autoscale. Private Ray state, so any surprise leaves it to
    shutdown as before."""
    try:
        from ray._private import worker
        for info in worker._global_node.all_processes.get("monitor", []):
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001 - an optimisation only; shutdown still stops it
        pass


def cluster_resources() -> dict:
    import ray
    return ray.cluster_resources()


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
             on_progress: Callable[[int], None] | None = None, probe: Callable[[Any], None] | None = None,
             wait_s: float = 120.0, log_path: str | os.PathLike | None = None) -> list[ShardOutcome]:
    """Run ``worker.run(task)`` for every task on ``workers`` actors; returns outcomes in task order.

    ``probe(result_of_worker.probe())`` runs once, on the first worker up, before any task, so that
    a bad teacher is refused before work starts (raise UserError there). ``wait_s``: how long the
    pool may have no live worker (none up yet, or all died) before it gives up with a UserError.
    ``log_path``: the file worker errors' full tracebacks are appended to (their one line names it)."""
    import ray

    opts: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)
    faults = {k: v for k, v in os.environ.items() if k.startswith("DISTILL_FAULT_")}
    if faults:                      # test hooks (distill.hooks) travel to the workers
        opts["runtime_env"] = {"env_vars": faults}
    # the progress counter (an actor the workers add to) only when something shows progress
    counter = (ray.remote(num_cpus=0, scheduling_strategy=_on_this_node())(Progress).remote()
               if on_progress is not None else None)
    outcomes = [ShardOutcome(task=t) for t in tasks]
    n = max(1, min(workers, len(tasks))) if tasks else 0
    log = _ErrorLog(log_path)
    pool = _Pool(ray.remote(**opts)(_hosted(worker_cls)), dict(init_kwargs, progress=counter), n, wait_s, log)
    pending: dict[Any, tuple[int, int]] = {}   # future -> (task index, worker id)
    queue = list(range(len(tasks)))
    queue.reverse()
    poll = _Poll(counter, on_progress)
    probed = probe is None
    try:
        while queue or pending:
            if not pool.live:
                pool.check(len(queue))             # raises when no worker came up in time
            ready, _ = ray.wait(list(pending) + list(pool.starting), num_returns=1, timeout=0.5)
            poll()
            for fut in ready:
                if fut in pool.starting:
                    pool.came_up(fut)
                    continue
                i, k = pending.pop(fut)
                if _settle(fut, outcomes[i], k, pool, retries, log):
                    queue.append(i)                # retried next, on the next free live worker
                elif on_result is not None:
                    on_result(outcomes[i])
            if not probed and pool.idle:
                _probe(pool.actors[pool.idle[0]], probe, log)
                probed = True
            while probed and queue and pool.idle:
                i, k = queue.pop(), pool.idle.pop()
                outcomes[i].attempts += 1
                pool.busy.add(k)
                pending[pool.actors[k].run.remote(tasks[i])] = (i, k)
        poll()
    finally:
        pool.close()
        if counter is not None:
            ray.kill(counter)
    return outcomes


ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")     # colour and other CSI/escape sequences


def plain(text: str) -> str:
    """Text without ANSI escape codes (Ray colours its tracebacks)."""
    return ANSI.sub("", str(text))


def _last_line(err: BaseException | str) -> str:
    return (plain(str(err)).strip().splitlines() or [""])[-1].strip()


class _ErrorLog:
    """Appends worker errors' full tracebacks to a file; ``write`` returns what their line says about it."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = os.fspath(path) if path is not None else None

    def write(self, what: str, text: str) -> str:
        if self.path is None:
            return ""
        try:
            with open(self.path, "a") as f:
                f.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} {what}\n"
                        f"{plain(text).rstrip()}\n\n")
        except OSError:
            return ""
        return f" (full traceback: {self.path})"


def _hosted(worker_cls):
    """``worker_cls`` whose ``__init__`` exceptions are kept, not raised: ``distill_ready()`` returns
    None, or (type name, is a UserError, last line, traceback) for the driver to report as one line
    (raised, it would reach the terminal as Ray's colour traceback of a dead actor)."""

    class Hosted(worker_cls):
        def __init__(self, **kwargs):
            self._distill_init_error = None
            try:
                super().__init__(**kwargs)
            except Exception as e:
                self._distill_init_error = (type(e).__name__, isinstance(e, UserError), _last_line(e),
                                            traceback.format_exc())

        def distill_ready(self):
            return self._distill_init_error

    Hosted.__name__ = Hosted.__qualname__ = worker_cls.__name__
    return Hosted


def _died_errors() -> tuple:
    """Ray's errors for a task whose worker is gone (process killed, node lost; a lost result too)."""
    from ray import exceptions as x
    return (x.RayActorError, x.ActorDiedError, x.ActorUnavailableError, x.WorkerCrashedError, x.ObjectLostError,
            x.NodeDiedError)


def _on_this_node():
    """Pin an actor to the driver's node: the progress counter must not be lost with a worker node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


class _Pool:
    """The workers of one run_pool. A worker is *starting* from its request until its
    ``__ray_ready__`` returns (placed, ``__init__`` done), then *live* (idle or busy) until it dies.
    Tasks go only to live workers, so a replacement that is never placed (its node is gone, every
    other GPU is held) blocks nothing while live workers remain: the pool shrinks and goes on."""

    def __init__(self, Actor, init_kwargs: dict, n: int, wait_s: float, log: _ErrorLog | None = None):
        self.Actor, self.init_kwargs, self.wait_s, self.requested = Actor, init_kwargs, wait_s, n
        self.log = log or _ErrorLog(None)
        self.actors: dict[int, Any] = {}        # worker id -> actor handle (starting or live)
        self.starting: dict[Any, int] = {}      # ready future -> worker id
        self.idle: list[int] = []
        self.busy: set[int] = set()
        self.died, self.was_up, self.start_error = 0, False, ""
        self._ids = itertools.count()
        self.none_since = time.monotonic()      # since when no worker is live
        for _ in range(n):
            self.request()

    @property
    def live(self) -> int:
        return len(self.idle) + len(self.busy)

    def request(self) -> None:
        """Ask Ray for one more worker; it gets tasks once it is up."""
        k = next(self._ids)
        self.actors[k] = a = self.Actor.remote(**self.init_kwargs)
        self.starting[a.distill_ready.remote()] = k

    def came_up(self, fut) -> None:
        """A starting worker's ready future resolved: it is live, or it died before it was up."""
        import ray
        k = self.starting.pop(fut)
        try:
            failed = ray.get(fut)
        except _died_errors() as e:                 # its process died before __init__ returned
            self.actors.pop(k)
            self.start_error = _last_line(e) + self.log.write("a Ray worker died while starting", str(e))
            sys.stderr.write(f"distill: a Ray worker failed to start: {self.start_error}\n")
            return
        if failed is not None:                      # its __init__ raised
            ray.kill(self.actors.pop(k), no_restart=True)
            name, user, line, tb = failed
            suffix = self.log.write("a Ray worker failed to start", tb)
            if user:                                 # the user's input: every worker would refuse it
                raise UserError(f"a Ray worker failed to start: {line}{suffix}")
            self.start_error = f"{name}: {line}{suffix}"
            if self.live or self.starting:          # the run goes on without it; else check() says it, once
                sys.stderr.write(f"distill: a Ray worker failed to start: {self.start_error}\n")
            return
        self.idle.append(k)
        self.was_up = True

    def lose(self, k: int) -> None:
        """A live worker died: drop it and request one replacement (used once it is up)."""
        import ray
        self.busy.discard(k)
        ray.kill(self.actors.pop(k), no_restart=True)
        self.died += 1
        if not self.live:
            self.none_since = time.monotonic()
        self.request()

    def check(self, unfinished: int) -> None:
        """With no live worker: wait while one may still come up within ``wait_s``, else raise."""
        if self.live or (self.starting and time.monotonic() - self.none_since < self.wait_s):
            return
        if not self.was_up and self.start_error and not self.starting:
            raise UserError(f"a Ray worker failed to start: {self.start_error}")
        if not self.was_up:
            raise UserError(f"no Ray worker became ready within {self.wait_s:g} s ({self.requested} requested; "
                            f"does the cluster have the CPUs/GPUs they ask for?); {unfinished} shard(s) not run")
        why = (f"its replacement failed to start ({self.start_error})" if not self.starting else
               f"a replacement was not placed within {self.wait_s:g} s (a lost node?)")
        raise UserError(f"no Ray worker left: {self.died} died, 0 alive, {why}; {unfinished} shard(s) "
                        "unfinished; rerun to resume")

    def close(self) -> None:
        import ray
        for a in self.actors.values():
            ray.kill(a, no_restart=True)


class _Poll:
    """Hands the progress counter's increments to ``on_progress`` (nothing when it is None)."""

    def __init__(self, counter, on_progress: Callable[[int], None] | None):
        self.counter, self.on_progress, self.last = counter, on_progress, 0

    def __call__(self) -> None:
        import ray
        if self.on_progress is None:
            return
        n = ray.get(self.counter.get.remote())
        if n != self.last:
            self.on_progress(n - self.last)
            self.last = n


def _probe(actor, probe: Callable[[Any], None], log: _ErrorLog) -> None:
    import ray
    try:
        result = ray.get(actor.probe.remote())
    except _died_errors() as e:
        raise UserError(f"a Ray worker died before its first task: {type(e).__name__}"
                        + log.write("a Ray worker died in probe()", str(e))) from None
    except ray.exceptions.RayTaskError as e:
        err = _unwrap(e)
        suffix = log.write("a Ray worker's probe() raised", str(e))
        if isinstance(err, UserError):
            raise UserError(_last_line(err) + suffix) from None
        raise UserError(f"a Ray worker failed before its first task: {type(err).__name__}: {_last_line(err)}"
                        + suffix) from None
    probe(result)


def _settle(fut, outcome: ShardOutcome, k: int, pool: _Pool, retries: int, log: _ErrorLog | None = None) -> bool:
    """Take a finished task's result or error; True when the shard is to be run again. A worker
    that died is dropped from the pool; one whose task raised stays and is free again."""
    import ray
    try:
        outcome.result = ray.get(fut)
    except _died_errors() as e:
        pool.lose(k)
        again = outcome.attempts <= retries
        sys.stderr.write(f"distill: shard {outcome.task.get('name', '?')}: its Ray worker died (attempt "
                         f"{outcome.attempts}{', retrying' if again else ''}; {pool.live} worker(s) live): "
                         f"{type(e).__name__}\n")
        if not again:
            outcome.error = f"worker died {outcome.attempts} times: {type(e).__name__}"
        return again
    except ray.exceptions.RayTaskError as e:
        pool.busy.discard(k)
        pool.idle.append(k)
        suffix = (log or _ErrorLog(None)).write(f"shard {outcome.task.get('name', '?')}, attempt {outcome.attempts}",
                                                str(e))
        return _raised(outcome, _unwrap(e), retries, suffix)   # a Python exception may be transient (I/O): bounded
    pool.busy.discard(k)
    pool.idle.append(k)
    return False


def _raised(outcome: ShardOutcome, err: BaseException, retries: int, suffix: str = "") -> bool:
    """Report a task's exception at once (shard, last line of the error); True when it is to be
    retried, else the outcome's error is set. A UserError is not retried."""
    msg = f"{type(err).__name__}: {_last_line(err)}"
    again = outcome.attempts <= retries and not isinstance(err, UserError)
    sys.stderr.write(f"distill: shard {outcome.task.get('name', '?')} failed (attempt {outcome.attempts}"
                     f"{', retrying' if again else ''}): {msg}{suffix}\n")
    if not again:
        outcome.error = msg
    return again


def _unwrap(e) -> BaseException:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return RuntimeError(_last_line(e) or repr(e))

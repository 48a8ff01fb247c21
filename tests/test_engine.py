"""engine.run_pool on a real (embedded) Ray: retries of shards whose worker raised or died; a pool
that loses a worker goes on without it, and one left with no worker stops with one line, never hangs."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from distill import engine
from distill.files import UserError

pytestmark = pytest.mark.usefixtures("ray_local")


class FlakyWorker:
    """``run`` raises OSError on a task's first attempts (counted in marker files), then succeeds."""

    def __init__(self, marker_dir: str, fail_times: int, progress=None):
        self.dir, self.fail_times = Path(marker_dir), fail_times

    def run(self, task: dict) -> dict:
        if task.get("user_error"):
            raise UserError(f"bad input in {task['name']}")
        marks = self.dir / task["name"]
        n = int(marks.read_text()) if marks.exists() else 0
        marks.write_text(str(n + 1))
        if n < self.fail_times:
            raise OSError(f"transient read error in {task['name']}\nsecond line: the last one is reported")
        return {"name": task["name"], "attempt": n + 1}


def test_a_raising_shard_is_retried_then_succeeds(tmp_path, capfd):
    tasks = [{"name": "a"}, {"name": "b"}]
    progress = []                          # the progress callback keeps working across a failure
    out = engine.run_pool(FlakyWorker, {"marker_dir": str(tmp_path), "fail_times": 1}, tasks, workers=1, retries=2,
                          on_progress=progress.append)
    assert all(isinstance(n, int) for n in progress)
    assert [o.result for o in out] == [{"name": "a", "attempt": 2}, {"name": "b", "attempt": 2}]
    assert all(o.error is None and o.attempts == 2 for o in out)
    err = capfd.readouterr().err
    assert "shard a failed (attempt 1, retrying): OSError: second line: the last one is reported" in err


def test_retries_are_bounded_and_user_errors_are_not_retried(tmp_path, capfd):
    tasks = [{"name": "c"}, {"name": "d", "user_error": True}]
    out = engine.run_pool(FlakyWorker, {"marker_dir": str(tmp_path), "fail_times": 5}, tasks, workers=1, retries=2)
    assert out[0].result is None and out[0].attempts == 3 and "OSError" in out[0].error
    assert (tmp_path / "c").read_text() == "3"
    assert out[1].attempts == 1 and "UserError: bad input in d" == out[1].error
    err = capfd.readouterr().err
    assert err.count("shard c failed") == 3 and "(attempt 3)" in err


class DyingWorker:
    """``run`` kills its own process (``os._exit``) on the task named ``die_on``, once (a marker
    file). With ``up_to=N`` only the first N workers to start come up: any later one (a replacement)
    blocks in ``__init__`` and is never up, which to the pool looks like a worker Ray cannot place
    (a lost GPU node)."""

    def __init__(self, marker_dir: str, die_on: str = "", up_to: int = 0, fail_init: bool = False, progress=None):
        if fail_init:
            raise ValueError("no teacher here")
        self.dir, self.die_on = Path(marker_dir), die_on
        if up_to and self._claim() >= up_to:
            time.sleep(3600)                      # never up; run_pool kills it when it ends

    def _claim(self) -> int:
        """This worker's start number: the first free ``started-<n>`` file, created exclusively."""
        n = 0
        while True:
            try:
                os.close(os.open(self.dir / f"started-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return n
            except FileExistsError:
                n += 1

    def run(self, task: dict) -> dict:
        marker = self.dir / "died"
        if task["name"] == self.die_on and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        time.sleep(0.2)
        return {"name": task["name"], "pid": os.getpid()}


def test_a_dead_worker_leaves_the_pool_which_goes_on_without_its_replacement(tmp_path, capfd):
    tasks = [{"name": n} for n in "abcdef"]
    seen = []
    t0 = time.monotonic()
    out = engine.run_pool(DyingWorker, {"marker_dir": str(tmp_path), "die_on": "b", "up_to": 2},
                          tasks, workers=2, retries=2, on_result=seen.append, wait_s=30)
    assert time.monotonic() - t0 < 60
    assert (tmp_path / "died").exists(), "the worker did not die"
    assert [o.result["name"] for o in out] == list("abcdef") and all(o.error is None for o in out)
    assert [o.attempts for o in out] == [1, 2, 1, 1, 1, 1]
    assert len({o.result["pid"] for o in out if o.task["name"] != "a"}) == 1    # b..f: the one survivor
    assert sorted(o.task["name"] for o in seen) == list("abcdef")
    err = capfd.readouterr().err
    assert "shard b: its Ray worker died (attempt 1, retrying;" in err


def test_no_worker_left_and_no_replacement_up_stops_within_wait_s(tmp_path):
    tasks = [{"name": "a"}, {"name": "b"}]
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:        # wait_s=10: time for the first worker to start on a busy machine
        engine.run_pool(DyingWorker, {"marker_dir": str(tmp_path), "die_on": "a", "up_to": 1},
                        tasks, workers=1, retries=2, wait_s=10)
    assert 10 <= time.monotonic() - t0 < 60
    assert str(e.value) == ("no Ray worker left: 1 died, 0 alive, a replacement was not placed within 10 s "
                            "(a lost node?); 2 shard(s) unfinished; rerun to resume")


def test_workers_that_cannot_be_placed_or_started_stop_the_run_at_once(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"^no Ray worker became ready within 2 s \(1 requested;"):
        engine.run_pool(DyingWorker, {"marker_dir": str(tmp_path)}, [{"name": "a"}], workers=1, num_cpus=64,
                        wait_s=2)   # more CPUs than the embedded Ray has: never placed
    assert time.monotonic() - t0 < 30
    with pytest.raises(UserError, match=r"^a Ray worker failed to start: ValueError: no teacher here$"):
        engine.run_pool(DyingWorker, {"marker_dir": str(tmp_path), "fail_init": True}, [{"name": "a"}, {"name": "b"}],
                        workers=2, probe=lambda _: None)

"""engine.run_pool on a real (embedded) Ray: retries of shards whose worker raised."""
from __future__ import annotations

import os
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

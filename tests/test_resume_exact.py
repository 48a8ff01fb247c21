"""Exact resume: train-student (drop path on) and adapt-teacher (RepAdapter dropout on), really killed
(SIGKILL, the ``DISTILL_FAULT_KILL_AT`` hook of ``files.atomic_writer``) at a checkpoint write and
resumed with ``--resume``, end with the uninterrupted run's weights bit for bit, one metrics row per
epoch and a true summary; training stops in one line at the first non-finite loss.

Every run is ``python -m distill.cli`` in a subprocess on the first 96 training and 64 validation
samples of the demo shards, 32 px, 2 epochs (of 6 steps for train-student, whose second epoch is its
best, 3 for adapt-teacher), one loader worker (persistent).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEMO_DIR, REPO, demo_head, nan_checkpoint, one_line_error, run_group
from distill.files import UserError
from distill.hooks import KILL_AT_ENV, KILL_AT_STEP_ENV
from test_train import _assert_same_weights

EPOCHS = 2
TIMELESS = ("img_s", "time_s")          # the metrics of a row that are timings (they differ run to run)

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "train" / "index.json").is_file(), reason="demo shards not generated")


def distill(*argv, kill_at: str | None = None, kill_at_step: int | None = None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(KILL_AT_ENV, None)
    env.pop(KILL_AT_STEP_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    if kill_at_step:
        env[KILL_AT_STEP_ENV] = str(kill_at_step)
    return run_group([sys.executable, "-m", "distill.cli", *argv], env=env, cwd=REPO, timeout=300)


def killed(r) -> bool:
    return r.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("resume")
    demo_head(tmp, 96)
    demo_head(tmp, 64, ["val-000000.tar"], "val")
    (tmp / "policy.toml").write_text('[policy]\nsize = 32\nscale = [0.35, 1.0]\nhflip = 0.5\nre_prob = 0.25\n')
    return tmp


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMELESS} for r in rows]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- the kill hook

WRITE3 = "from distill.files import atomic_write_bytes as w; [w({d!r} + '/f.bin', bytes([i])) for i in (1, 2, 3)]"


@pytest.mark.parametrize("spec, left", [("f.bin:2", b"\x02"), ("f.bin:2:before", b"\x01")])
def test_kill_hook_dies_at_the_nth_write_and_temp_files_are_removed(tmp_path, spec, left):
    """The hook kills at the 2nd write of f.bin, after its rename or before it (its temporary file left,
    then removed by ``sweep_temps``, which keeps every other file)."""
    from distill.files import sweep_temps
    env = dict(os.environ, PYTHONPATH=str(REPO), **{KILL_AT_ENV: spec})
    r = run_group([sys.executable, "-c", WRITE3.format(d=str(tmp_path))], env=env, timeout=60)
    assert killed(r) and (tmp_path / "f.bin").read_bytes() == left, (r.returncode, r.stderr)
    temps = list(tmp_path.glob(".f.bin.*.tmp"))
    assert len(temps) == (spec.endswith("before")) and (not temps or temps[0].read_bytes() == b"\x02")
    (tmp_path / ".keep.tmp").write_bytes(b"")
    sweep_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.tmp", "f.bin"]


# ----------------------------------------------------------------------------- train-student

def _train(data: Path, out: Path, *extra) -> list:
    return ["train-student", "--hard-labels", "--policy", data / "policy.toml", "--shards", data / "train",
            "--val-shards", data / "val", "--out", out, "--model", "tinyvit-tiny", "--image-size", "32",
            "--epochs", str(EPOCHS), "--batch-size", "16", "--recipe", "none", "--lr", "2e-3", "--drop-path", "0.1",
            "--loader-workers", "1", "--threads", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def student(data) -> Path:
    """The uninterrupted run."""
    out = data / "student"
    r = distill(*_train(data, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _assert_same_student(ref: Path, run: Path) -> None:
    """``run`` holds what the uninterrupted ``ref`` holds: weights and optimiser state bit for bit, one
    metrics row per epoch with the same numbers, a summary whose final is the last row and whose best is
    best.pt's epoch, best.json and last.json as the reference's, the last epoch's class statistics."""
    _assert_same_weights(ref / "last.pt", run / "last.pt")
    _assert_same_weights(ref / "best.pt", run / "best.pt")
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    assert _timeless(rows) == _timeless(_rows(ref))
    summary, want = _json(run / "summary.json"), _json(ref / "summary.json")
    assert summary["final"] == {"val_top1": rows[-1]["val_top1"], "val_top5": rows[-1]["val_top5"]}
    assert summary["schedule"]["last_lr"] == rows[-1]["lr"] and summary["epochs"] == EPOCHS and summary["complete"]
    assert summary["best"] == want["best"] and summary["images_seen"] == want["images_seen"]
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == summary["best"]["epoch"] == _json(run / "best.json")["epoch"]
    assert best["val_top1"] == summary["best"]["val_top1"] == rows[best["epoch"] - 1]["val_top1"]
    assert _json(run / "best.json") == _json(ref / "best.json") and _json(run / "last.json") == _json(ref / "last.json")
    with np.load(ref / "class_stats.npz") as a, np.load(run / "class_stats.npz") as b:
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert not list(run.glob(".*.tmp"))         # no temporary file of an interrupted write is left


def test_train_student_killed_twice_resumes_exactly(data, student, tmp_path):
    """Killed right after epoch 1's last.json, resumed and killed again right after the last epoch's
    last.pt (the files made from it not written), resumed again: the uninterrupted run's files, and
    epoch 2 was trained in a new process with drop path on."""
    assert _json(student / "summary.json")["best"]["epoch"] == EPOCHS     # the second kill comes before best.pt
    out = tmp_path / "run"
    r = distill(*_train(data, out), kill_at="last.json:1")
    assert killed(r), (r.returncode, r.stderr[-2000:])
    r = distill(*_train(data, out, "--resume"), kill_at="last.pt:1")
    assert killed(r), (r.returncode, r.stderr[-2000:])
    assert not (out / "summary.json").exists()
    r = distill(*_train(data, out, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_student(student, out)


def test_train_student_killed_mid_epoch_loses_at_most_checkpoint_every_steps(data, tmp_path):
    """--checkpoint-every 2 (6 steps an epoch): killed right after steps 5 and 9 (between checkpoints),
    each time last.pt holds the step before (1 step lost, <= 2), and the resumed runs end with the
    uninterrupted run's files (same --checkpoint-every: the RNGs are seeded afresh at each checkpoint)."""
    ref = tmp_path / "ref"
    assert distill(*_train(data, ref, "--checkpoint-every", "2")).returncode == 0
    out = tmp_path / "run"
    args = _train(data, out, "--checkpoint-every", "2")
    for step, resume in ((5, ()), (9, ("--resume",))):
        r = distill(*args, *resume, kill_at_step=step)
        assert killed(r), (r.returncode, r.stderr[-2000:])
        ck = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        assert step - 2 <= ck["step"] < step and ck["state"]["partial"]["taken"] == ck["step"] % 6, ck["step"]
    r = distill(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_student(ref, out)


def _kill_points(name: str, times: int) -> list[str]:
    return [f"{name}:{n}" for n in range(1, times + 1)]


# every atomic write of a run (a point a run does not reach is skipped), and last.pt's before its rename
STUDENT_KILLS = (_kill_points("metrics.jsonl", EPOCHS + 1) + _kill_points("last.pt", EPOCHS)
                 + [f"last.pt:{n}:before" for n in range(1, EPOCHS + 1)] + _kill_points("last.json", EPOCHS)
                 + _kill_points("best.pt", EPOCHS) + _kill_points("best.json", EPOCHS)
                 + ["config.json:1", "class_stats.npz:1", "summary.json:1"])


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", STUDENT_KILLS)
def test_train_student_killed_at_every_write_resumes_exactly(data, student, tmp_path, kill_at):
    out = tmp_path / "run"
    r = distill(*_train(data, out), kill_at=kill_at)
    if r.returncode == 0:
        pytest.skip(f"the run writes no {kill_at}")
    assert killed(r), (r.returncode, r.stderr[-2000:])
    r = distill(*_train(data, out, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_student(student, out)


def test_train_student_stops_at_the_first_non_finite_loss(data, tmp_path):
    from distill.models import create_model
    init = nan_checkpoint(create_model("tinyvit-tiny", 10, img_size=32), tmp_path / "nan.pth")
    r = distill(*_train(data, tmp_path / "run", "--init", init))
    line = one_line_error(r, "not finite", "at epoch 1, step 1 ", "--lr", "--weight-decay", "the labels")
    assert not (tmp_path / "run" / "last.pt").exists(), line


# ----------------------------------------------------------------------------- adapt-teacher

def _adapt(data: Path, out: Path, *extra) -> list:
    return ["adapt-teacher", "--base", "vit-mini", "--method", "repadapter", "--adapter-dropout", "0.1",
            "--shards", data / "train", "--val-shards", data / "val", "--policy", data / "policy.toml",
            "--out", out, "--epochs", str(EPOCHS), "--batch-size", "32", "--image-size", "32",
            "--loader-workers", "1", "--threads", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def teacher(data) -> Path:
    """The uninterrupted adapt-teacher run."""
    out = data / "teacher"
    r = distill(*_adapt(data, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same_teacher(ref: Path, run: Path) -> None:
    _assert_same_weights(ref / "last.pt", run / "last.pt")
    a, b = (torch.load(d / "weights.pth", weights_only=True) for d in (ref, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _sha(ref / "teacher.pt2") == _sha(run / "teacher.pt2")
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1)) and _timeless(rows) == _timeless(_rows(ref))
    got, want = _json(run / "teacher.json"), _json(ref / "teacher.json")
    assert got["weights_sha256"] == want["weights_sha256"] and got["state_dict_sha256"] == want["state_dict_sha256"]
    for k in ("val_top1", "val_top1_merged", "best_val_top1", "epochs"):
        assert got["metrics"][k] == want["metrics"][k], k
    assert _json(run / "last.json") == _json(ref / "last.json")
    assert not list(run.glob(".*.tmp"))


def test_adapt_teacher_killed_after_a_checkpoint_resumes_exactly(data, teacher, tmp_path):
    """Killed right after epoch 1's last.pt (its last.json and metrics row not yet written), resumed:
    epoch 2 (RepAdapter dropout on) in a new process gives the uninterrupted run's teacher, byte for byte."""
    out = tmp_path / "run"
    r = distill(*_adapt(data, out), kill_at="last.pt:1")
    assert killed(r), (r.returncode, r.stderr[-2000:])
    assert _rows(out) == [] and not (out / "last.json").exists()
    r = distill(*_adapt(data, out, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_teacher(teacher, out)


ADAPT_KILLS = (_kill_points("metrics.jsonl", EPOCHS + 1) + _kill_points("last.pt", EPOCHS)
               + [f"last.pt:{n}:before" for n in range(1, EPOCHS + 1)] + _kill_points("last.json", EPOCHS)
               + ["config.json:1", "teacher.pt2:1", "weights.pth:1", "teacher.json:1"])


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ADAPT_KILLS)
def test_adapt_teacher_killed_at_every_write_resumes_exactly(data, teacher, tmp_path, kill_at):
    out = tmp_path / "run"
    r = distill(*_adapt(data, out), kill_at=kill_at)
    assert killed(r), (r.returncode, r.stderr[-2000:])
    r = distill(*_adapt(data, out, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_teacher(teacher, out)


def test_adapt_teacher_stops_at_the_first_non_finite_loss(data, tmp_path):
    from distill.adapt import adapt_teacher
    from distill.config import AdaptConfig
    from distill.adapt.base import _preset
    base = nan_checkpoint(_preset("vit-mini", 10, 32), tmp_path / "nan.pth")
    cfg = AdaptConfig(base="vit-mini", base_checkpoint=str(base), shards=str(data / "train"),
                      val_shards=str(data / "val"), out=str(tmp_path / "run"), epochs=1, batch_size=32,
                      image_size=32, loader_workers=0, threads=1, quiet=True)
    with pytest.raises(UserError, match=r"not finite\) at epoch 1, step 1 of 3: .*--lr.*--weight-decay"):
        adapt_teacher(cfg, {"size": 32})
    assert not (tmp_path / "run" / "last.pt").exists()

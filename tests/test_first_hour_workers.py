"""A new user's first hour with a timm teacher (issue 15, items 1b and 2): a checkpoint of another
class count is refused on the driver in one line that names the key, the shapes and
--teacher-num-classes; an error only a Ray worker meets reaches the terminal as one plain line that
names the log file holding its traceback; timm's default input size, mean and std are used and said.

The driver's checks run the CLI's ``main`` here (they start no Ray); the cases that reach Ray workers
run the CLI in a subprocess (real Ray, real torch and timm models, the demo shards), so that stderr
is exactly what a terminal shows."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, demo_head

sys.path.insert(0, str(REPO / "tests"))
from helpers.timm_stub import STUB, import_timm  # noqa: E402

from distill.engine import ERRORS_LOG  # noqa: E402

SHARD = REPO / "shards" / "demo" / "train" / "train-000000.tar"     # 360 samples, index.json: 10 classes
SPEC = "timm:test_resnet"          # timm's tiny test ResNet: 0.5 M parameters, 160 px, mean/std 0.5


def _cli(*args, pythonpath=(), env=None) -> subprocess.CompletedProcess:
    path = [str(REPO), *map(str, pythonpath)]
    if STUB in sys.path:              # timm needs the stub torchvision here: so do the CLI and its workers
        path.append(STUB)
    full = dict(os.environ, PYTHONPATH=os.pathsep.join(path), **(env or {}))
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=300)


def _main(capfd, *args) -> subprocess.CompletedProcess:
    """The CLI in this process (the driver's checks start no Ray): its exit status and output."""
    from distill.cli import main
    capfd.readouterr()
    rc = main([str(a) for a in args])
    got = capfd.readouterr()
    return subprocess.CompletedProcess(args, rc, got.out, got.err)


def _one_plain_line(r: subprocess.CompletedProcess) -> str:
    """The run ended with exit 2 and exactly one line on stderr, plain text; returns it."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "\x1b" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("distill: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def ft4(tmp_path_factory):
    """A 4-class fine-tune of the test ResNet: its state dict, as torch.save writes it."""
    timm = import_timm()
    path = tmp_path_factory.mktemp("ckpt") / "ft4.pth"
    torch.save(timm.create_model(SPEC[5:], num_classes=4).state_dict(), path)
    return path


def test_a_checkpoint_of_another_class_count_is_one_line_naming_key_shapes_and_the_flag(ft4, tmp_path, capfd):
    out = tmp_path / "cache"
    r = _main(capfd, "cache-teacher", "--shards", SHARD, "--teacher", SPEC, "--teacher-checkpoint", ft4, "--out", out,
             "--quiet")
    line = _one_plain_line(r)
    assert line == (f"distill: error: --teacher-checkpoint {ft4} does not fit {SPEC} with 10 classes: fc.weight is "
                    "[4, 96] in the file, [10, 96] in the model (also fc.bias); pass --teacher-num-classes 4 for a "
                    "4-class checkpoint (default: the shards' class count)")
    assert not out.exists()                                  # refused before --out is touched


def test_teacher_num_classes_loads_the_checkpoint_which_then_does_not_fit_the_shards(ft4, tmp_path, capfd):
    out = tmp_path / "cache"
    r = _main(capfd, "cache-teacher", "--shards", SHARD, "--teacher", SPEC, "--teacher-checkpoint", ft4,
             "--teacher-num-classes", "4", "--out", out, "--quiet")
    assert _one_plain_line(r) == ("distill: error: teacher outputs 4 classes but the shard index lists 10: the "
                                  "teacher must predict the shards' 10 classes, in the index's order")
    assert not out.exists()


def test_the_scorer_gets_the_same_check_in_its_own_flags(ft4, tmp_path, capfd):
    r = _main(capfd, "filter-labels", "--shards", SHARD, "--scorer", SPEC, "--scorer-checkpoint", ft4,
             "--out", tmp_path / "filter", "--quiet")
    line = _one_plain_line(r)
    assert f"--scorer-checkpoint {ft4} does not fit {SPEC} with 10 classes: fc.weight is [4, 96]" in line
    assert "pass --scorer-num-classes 4" in line and "--teacher" not in line
    assert not (tmp_path / "filter" / "scoring").exists()


def test_missing_and_unreadable_checkpoints_and_unknown_timm_models_are_one_line(tmp_path, capfd):
    import_timm()
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint\n")
    for extra, want in (((SPEC, "--teacher-checkpoint", tmp_path / "nope.pth"), "nope.pth not found"),
                        ((SPEC, "--teacher-checkpoint", junk), f"cannot read --teacher-checkpoint {junk}: not a checkpoint"),
                        (("timm:no_such_net", "--teacher-random-weights"), "timm cannot create 'no_such_net'")):
        r = _main(capfd, "cache-teacher", "--shards", SHARD, "--teacher", *extra, "--out", tmp_path / "c", "--quiet")
        assert want in _one_plain_line(r)
    assert not (tmp_path / "c").exists()


WORKER_ONLY = '''
import ray
import torch
from torch import nn


def build():
    """A teacher whose weights are on the driver's machine only: inside a Ray worker it raises, with
    the colours and the second line some libraries put in their messages."""
    if ray.is_initialized():      # the driver checks the teacher before Ray starts; a worker runs in Ray
        raise RuntimeError("cannot open the weights\\n\\x1b[31m/data/weights.bin: no such file on this node\\x1b[0m")
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
'''


def test_an_error_only_a_worker_meets_is_one_plain_line_and_its_traceback_is_in_the_log(tmp_path):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "worker_only_teacher.py").write_text(WORKER_ONLY)
    out = tmp_path / "cache"
    r = _cli("cache-teacher", "--shards", SHARD, "--teacher", "worker_only_teacher:build", "--out", out,
             "--teacher-input-size", "32", "--workers", "1", "--threads", "1", "--quiet", pythonpath=[tmp_path / "mod"])
    log = out / ERRORS_LOG
    assert _one_plain_line(r) == ("distill: error: a Ray worker failed to start: teacher worker_only_teacher:build "
                                  "raised RuntimeError: cannot open the weights /data/weights.bin: no such file on "
                                  f"this node (full traceback: {log})")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "worker_only_teacher.py" in text
    assert "raise RuntimeError" in text and "\x1b" not in text
    assert not list(out.glob("*.arrow")) and not (out / "manifest.json").exists()


def test_timm_default_input_size_mean_and_std_are_used_and_said(tmp_path):
    """No --teacher-input-size/-mean/-std, no --teacher-num-classes: timm's test ResNet is created with
    the index's 10 classes and views are cut at its 160 px, normalised with its mean/std 0.5."""
    timm = import_timm()
    want = timm.data.resolve_data_config({}, model=timm.create_model(SPEC[5:]))
    assert want["input_size"][-1] == 160 and tuple(want["mean"]) == (0.5, 0.5, 0.5)     # not ImageNet's
    out = tmp_path / "cache"
    shard = demo_head(tmp_path, 64) / "train-000000.tar"        # 64 samples of SHARD, index.json: 10 classes
    r = _cli("cache-teacher", "--shards", shard, "--teacher", SPEC, "--teacher-random-weights", "--out", out,
             "--topk", "3", "--workers", "1", "--batch-size", "32", "--quiet")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    said = f"{SPEC}: input 160, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5) from timm's default config"
    assert f"  note: {said}" in r.stdout                                   # in the summary
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["teacher"]
    assert (t["input_size"], t["mean"], t["std"], manifest["num_classes"]) == (160, [0.5] * 3, [0.5] * 3, 10)
    assert t["members"][0]["num_classes"] == 10       # a head other than timm's default: recorded for verify


class RaisingWorker:
    """``run`` raises an error with colours and two lines, as Ray and some libraries write them."""

    def __init__(self, progress=None):
        pass

    def run(self, task: dict) -> dict:
        raise OSError("first line\n\x1b[31mshard unreadable: Input/output error\x1b[0m")


def test_a_task_error_is_one_plain_line_naming_the_log_which_holds_the_traceback(tmp_path, capfd, ray_local):
    from distill import engine
    log = tmp_path / ERRORS_LOG
    capfd.readouterr()
    out = engine.run_pool(RaisingWorker, {}, [{"name": "a"}], workers=1, retries=1, log_path=log)
    err = capfd.readouterr().err
    assert out[0].error == "OSError: shard unreadable: Input/output error"
    lines = [x for x in err.splitlines() if x.startswith("distill: shard a failed")]
    assert lines == [f"distill: shard a failed (attempt 1, retrying): OSError: shard unreadable: Input/output error "
                     f"(full traceback: {log})",
                     f"distill: shard a failed (attempt 2): OSError: shard unreadable: Input/output error "
                     f"(full traceback: {log})"], err
    text = log.read_text()
    assert text.count("shard a, attempt") == 2 and 'raise OSError("first line' in text and "\x1b" not in text

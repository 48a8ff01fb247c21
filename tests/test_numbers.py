"""Every number checked before anything starts (flags and pipeline TOML alike: one line, exit 2, nothing
written), and the teacher's outputs checked (NaN, probabilities, dicts and tuples, other types)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import DEMO_POLICY, DEMO_TEACHER, REPO, cache_config, demo_head, one_line_error
from distill import cli, teachers
from distill.cache import cache_teacher, verify_cache
from distill.data.shards import Sample, iter_shard
from distill.files import atomic_write_json
from distill.format import MANIFEST_NAME, CacheFile, cache_manifest, encode_cache_shard, ipc_bytes

sys.path.insert(0, str(REPO / "tests"))
from helpers.tiny_teacher import DictOut, NanOnImages, Softmaxed, StrOut, build  # noqa: E402

TRAIN, VAL = REPO / "shards/demo/train", REPO / "shards/demo/val"


def _cli(argv, capsys) -> subprocess.CompletedProcess:
    """``distill ARGV`` in this process: (exit status, stdout, stderr) as a subprocess would give them."""
    argv = [str(a) for a in argv]
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, rc, out, err)


def _stage(stage: str, out) -> list:
    """A command line of ``stage`` on the demo shards that would run (its numbers sane)."""
    return [stage, *{
        "cache-teacher": ["--shards", TRAIN, "--teacher", DEMO_TEACHER, "--teacher-input-size", 32],
        "filter-labels": ["--shards", TRAIN, "--scorer", DEMO_TEACHER, "--scorer-input-size", 32],
        "train-student": ["--shards", TRAIN, "--hard-labels", "--image-size", 32, "--model", "tinyvit-5m"],
        "adapt-teacher": ["--base", "vit-mini", "--shards", TRAIN, "--val-shards", VAL, "--image-size", 32],
    }[stage], "--out", out, "--quiet"]


# ----------------------------------------------------------------------------- numbers

BAD = [
    ("cache-teacher", ["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    ("cache-teacher", ["--temperature", "inf"], "--temperature must be a finite number"),
    ("cache-teacher", ["--temperature", "0"], "--temperature must be in (0, 100]"),
    ("cache-teacher", ["--teacher-mean", "nan,nan,nan"], "--teacher-mean must be a finite number"),
    ("cache-teacher", ["--teacher-mean", "123.7,116.3,103.5"], "--teacher-mean must be in [0, 1]"),
    ("cache-teacher", ["--teacher-std", "0,0.2,0.2"], "--teacher-std must be in (0, 1]"),
    ("cache-teacher", ["--teacher-input-size", "100000"], "--teacher-input-size must be in [0, 2048]"),
    ("cache-teacher", ["--epochs", "100000"], "--allow-long-run"),
    ("cache-teacher", ["--prob-dtype", "float64"], "--prob-dtype must be one of float16, float32"),
    ("cache-teacher", ["--teacher-outputs", "softmax"], "--teacher-outputs must be one of logits, probs, log-probs"),
    ("cache-teacher", ["--batch-size", "65536", "--teacher-input-size", "2048"], "GiB per input batch"),
    ("cache-teacher", ["--topk", "0"], "--topk must be in [1, 100000]"),
    ("filter-labels", ["--temperature", "nan"], "--temperature must be a finite number"),
    ("filter-labels", ["--crop-pct", "0"], "--crop-pct must be in (0, 1]"),
    ("filter-labels", ["--max-drop-frac", "1.5"], "--max-drop-frac must be in [0, 1]"),
    ("filter-labels", ["--scorer-std", "inf,1,1"], "--scorer-std must be a finite number"),
    ("filter-labels", ["--scorer-outputs", "x"], "--scorer-outputs must be one of"),
    ("train-student", ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("train-student", ["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    ("train-student", ["--min-lr", "nan"], "--min-lr must be a finite number"),
    ("train-student", ["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
    ("train-student", ["--image-size", "99968"], "--image-size must be in [32, 2048]"),
    ("train-student", ["--epochs", "100000"], "--allow-long-run"),
    ("train-student", ["--alpha", "2"], "--alpha must be in [0, 1]"),
    ("train-student", ["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    ("adapt-teacher", ["--lr", "nan"], "--lr must be a finite number"),
    ("adapt-teacher", ["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number"),
    ("adapt-teacher", ["--image-size", "99968"], "--image-size must be in [8, 2048]"),
    ("adapt-teacher", ["--epochs", "100000"], "--allow-long-run"),
    ("adapt-teacher", ["--adapter-dropout", "1"], "--adapter-dropout must be in [0, 1)"),
]


@pytest.mark.parametrize("stage, flags, message", BAD, ids=[f"{s}{' '.join(f)}" for s, f, _ in BAD])
def test_bad_numbers_exit_2_before_anything_is_written(stage, flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    one_line_error(_cli(_stage(stage, out) + flags, capsys), message)
    assert not out.exists()


def test_budget_needs_allow_long_run_and_names_the_views(tmp_path, capsys):
    out = tmp_path / "out"
    line = one_line_error(_cli(_stage("train-student", out) + ["--epochs", "100000"], capsys))
    assert "over 1,438 samples is 143,800,000 views" in line, line     # the demo's training samples
    assert not out.exists()


def test_make_shards_refuses_a_bad_shard_size_first(tmp_path, capsys):
    one_line_error(_cli(["make-shards", tmp_path / "nowhere", tmp_path / "out", "--shard-size", "0", "--quiet"], capsys),
                   "--shard-size must be an integer in [1, 10000000]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage, flag, value, message", [
    ("cache-teacher", "--temperature", "nan", "--temperature must be a finite number, got nan"),
    ("train-student", "--lr", "inf", "--lr must be a finite number, got inf"),
])
def test_real_cli_refuses_non_finite_numbers(stage, flag, value, message, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "distill.cli", *map(str, _stage(stage, out)), flag, value],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    one_line_error(r, message)
    assert not out.exists()


PIPELINE = """
[data]
train = "{train}"
val = "{val}"
[policy]
size = 32
auto_augment = "{aa}"
[cache-teacher]
teacher = "{teacher}"
teacher-input-size = 32
out = "{out}/cache"
temperature = {temperature}
[train-student]
cache = "{out}/cache"
out = "{out}/run"
image-size = 32
lr = {lr}
"""


@pytest.mark.parametrize("temperature, lr, aa, message", [
    ("nan", "1e-3", "rand-m9-n2", "--temperature must be a finite number, got nan (in [cache-teacher] of"),
    ("1.0", "inf", "rand-m9-n2", "--lr must be a finite number, got inf (in [train-student] of"),
    ("1.0", "1e-3", "rand-m999-n999", "token 'm999' is out of range"),
])
def test_pipeline_toml_is_checked_whole_before_its_first_stage(temperature, lr, aa, message, tmp_path, capsys):
    """A bad number anywhere in the file (a later stage's too, the policy's) stops `distill run` before
    the first stage starts: nothing under the output directories."""
    p = tmp_path / "p.toml"
    out = tmp_path / "out"
    p.write_text(PIPELINE.format(train=TRAIN, val=VAL, teacher=DEMO_TEACHER, out=out, temperature=temperature,
                                 lr=lr, aa=aa))
    one_line_error(_cli(["run", p, "--quiet"], capsys), message)
    assert not out.exists()


def test_flags_with_a_pipeline_file_are_checked_alike(tmp_path, capsys):
    p = tmp_path / "p.toml"
    p.write_text(f'[data]\ntrain = "{TRAIN}"\n[cache-teacher]\nteacher = "{DEMO_TEACHER}"\ntemperature = inf\n')
    out = tmp_path / "out"
    one_line_error(_cli(["cache-teacher", "--config", p, "--out", out], capsys),
                   f"--temperature must be a finite number, got inf (in {p})")
    assert not out.exists()


# ----------------------------------------------------------------------------- teacher outputs

@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """TorchScript files of one Tiny teacher: plain logits, and wrapped (softmax, NaN, dict, str)."""
    d = tmp_path_factory.mktemp("teachers")
    tiny = build().eval()
    paths = {"logits": d / "logits.pt"}
    torch.jit.script(tiny).save(str(paths["logits"]))
    for name, cls in (("probs", Softmaxed), ("nan", NanOnImages), ("dict", DictOut), ("str", StrOut)):
        paths[name] = d / f"{name}.pt"
        torch.jit.script(cls(tiny).eval()).save(str(paths[name]))
    return paths


def test_softmax_teacher_is_refused_in_one_line(scripted, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["cache-teacher", "--shards", TRAIN, "--teacher", scripted["probs"], "--teacher-input-size", 32,
            "--out", out, "--quiet"]
    one_line_error(_cli(argv, capsys), "returns probabilities", "--teacher-outputs probs")
    assert not out.exists()
    argv = ["filter-labels", "--shards", TRAIN, "--scorer", scripted["probs"], "--scorer-input-size", 32,
            "--out", out, "--quiet"]
    one_line_error(_cli(argv, capsys), "returns probabilities", "--scorer-outputs probs")


def test_declared_outputs_must_match_what_the_teacher_returns():
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(teachers.UserError, match="--teacher-outputs probs: the rows .* are not probabilities"):
        teachers.Ensemble([teachers.TeacherSpec(str(DEMO_TEACHER))], outputs="probs")(x)


def test_probs_and_log_probs_teachers_give_their_logits_twins_distribution(scripted):
    """softmax(log p / T) is softmax(z / T): the same targets at any temperature, no second softmax."""
    x = torch.rand(6, 3, 32, 32)
    spec = lambda name: [teachers.TeacherSpec(str(scripted[name]))]      # noqa: E731
    for t in (1.0, 2.5):
        want = teachers.Ensemble(spec("logits"), temperature=t)(x)
        assert torch.allclose(teachers.Ensemble(spec("probs"), temperature=t, outputs="probs")(x), want, atol=1e-6)
        assert torch.allclose(teachers.Ensemble(spec("dict"), temperature=t)(x), want, atol=1e-6)


def test_dict_with_logits_works_and_other_outputs_are_refused_naming_the_type(scripted, tmp_path, capsys):
    x = torch.rand(3, 3, 32, 32)
    plain = teachers.Ensemble([teachers.TeacherSpec(str(scripted["logits"]))])(x)
    assert torch.equal(teachers.Ensemble([teachers.TeacherSpec(str(scripted["dict"]))])(x), plain)
    out = tmp_path / "out"
    argv = ["cache-teacher", "--shards", TRAIN, "--teacher", scripted["str"], "--teacher-input-size", 32,
            "--out", out, "--quiet"]
    one_line_error(_cli(argv, capsys), "returned a str", "a dict with a 'logits' tensor")
    assert not out.exists()


def _records(out):
    with CacheFile(out / "train-000000.arrow") as f:
        t = f.read(columns=["key", "epoch", "topk_idx", "topk_prob"])
    return t.column("topk_idx").to_pylist(), np.array(t.column("topk_prob").to_pylist(), np.float32)


@pytest.mark.usefixtures("ray_local")
def test_probs_teacher_is_cached_with_its_logits_twins_top_k(scripted, tmp_path):
    d = demo_head(tmp_path, 12)
    for name, outputs in (("logits", "logits"), ("probs", "probs")):
        res = cache_teacher(cache_config(d, tmp_path / name, teacher=(str(scripted[name]),), teacher_outputs=outputs,
                                         temperature=2.0, epochs=1), DEMO_POLICY)
        assert not res.failed, res.failed
    (idx_l, p_l), (idx_p, p_p) = _records(tmp_path / "logits"), _records(tmp_path / "probs")
    assert idx_l == idx_p
    assert np.allclose(p_l, p_p, rtol=2 ** -10, atol=1e-6)          # float16 rounding
    assert p_l[:, 0].mean() > 0.11                                   # not a softmax over probabilities (~uniform)
    run = (tmp_path / "probs" / "run.json").read_text()
    assert '"outputs": "probs"' in run and '"outputs"' not in (tmp_path / "logits" / "run.json").read_text()
    assert verify_cache(tmp_path / "probs", recompute=4, teacher=[str(scripted["probs"])]).ok


@pytest.mark.usefixtures("ray_local")
def test_nan_teacher_fails_its_shard_naming_keys_and_writes_no_record(scripted, tmp_path, capsys):
    d = demo_head(tmp_path, 8)
    keys = [s.key for s in iter_shard(d / "train-000000.tar") if isinstance(s, Sample)]
    out = tmp_path / "c"
    res = cache_teacher(cache_config(d, out, teacher=(str(scripted["nan"]),), epochs=1), DEMO_POLICY)
    assert len(res.failed) == 1 and "train-000000.tar" in res.failed[0], res.failed
    assert "NaN or infinity" in res.failed[0] and sorted(keys)[0] in res.failed[0], res.failed
    assert "retrying" not in capsys.readouterr().err                 # refused outputs are not retried
    assert not list(out.glob("*.arrow")) and not (out / MANIFEST_NAME).exists()


def _write_cache(d, probs: np.ndarray) -> None:
    """A one-shard cache written by the cache writer's encoder (files, manifest and checksums as real)."""
    n, e, k = probs.shape
    d.mkdir()
    t = encode_cache_shard([f"k{i}" for i in range(n)], np.arange(n) % 10, np.zeros((n, e), np.uint32),
                           np.tile(np.arange(k), (n, e, 1)), probs, probs[..., 0], num_classes=10, shard="s.tar")
    data = ipc_bytes(t)
    (d / "s.arrow").write_bytes(data)
    entry = {"name": "s.tar", "file": "s.arrow", "samples": n, "records": n * e, "file_bytes": len(data),
             "file_sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_json(d / MANIFEST_NAME, cache_manifest({"epochs": e, "topk": k, "num_classes": 10}, [entry]))


def test_verify_reports_non_finite_probabilities(tmp_path, capsys):
    probs = np.full((4, 2, 3), 0.25, np.float32)
    _write_cache(tmp_path / "good", probs)
    r = _cli(["verify", tmp_path / "good"], capsys)
    assert r.returncode == 0, r.stdout
    probs[2, 1, 0] = np.nan
    _write_cache(tmp_path / "bad", probs)
    r = _cli(["verify", tmp_path / "bad"], capsys)
    assert r.returncode == 1 and "1 record(s) hold NaN or infinite probabilities (samples k2)" in r.stdout, r.stdout


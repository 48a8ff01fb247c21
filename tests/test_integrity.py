"""Integrity end to end: every byte of a cache and of its shards is checked where it is reused or read.

Each test pins one way a cache could be trusted without proof: a rerun that re-signs a damaged file, an
edited manifest, a shard changed in place, an incomplete cache, damage that appears after the start
check, and random bit flips read through the reader training uses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from conftest import DEMO_POLICY, REPO, cache_config, demo_head, run_group, one_line_error
from distill.cache import cache_teacher, open_cache, verify_cache
from distill.files import FormatError
from distill.format import CACHE_DONE_DIR, MANIFEST_NAME, CacheFile

pytestmark = pytest.mark.usefixtures("ray_local")
SHARDS = ["train-000000.tar", "train-000001.tar"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """Two demo shards (their first 64 samples each) and a 2-epoch cache over them."""
    tmp = tmp_path_factory.mktemp("integrity")
    shards = demo_head(tmp, 64, SHARDS)
    cache_teacher(cache_config(shards, tmp / "cache", epochs=2), DEMO_POLICY)
    return tmp, shards


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip(path: Path, at: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1 << bit
    path.write_bytes(bytes(data))


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return run_group([sys.executable, "-m", "distill.cli", *map(str, args)],
                     env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=timeout)


def _train(shards, cache, out, *extra) -> subprocess.CompletedProcess:
    return _cli("train-student", "--shards", shards, "--cache", cache, "--out", out, "--model", "tinyvit-tiny",
                "--image-size", "32", "--batch-size", "32", "--epochs", "1", "--loader-workers", "1", "--quiet", *extra)


def _no_epoch(run: Path) -> bool:
    """No epoch of a train-student run finished (its metrics hold no row)."""
    m = run / "metrics.jsonl"
    return not m.exists() or not m.read_text().strip()


def _arrow_bytes(cache: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(cache.glob("*.arrow"))}


# ----------------------------------------------------------------------------- 1. reuse only what is proven

def test_a_rerun_redoes_a_damaged_file_instead_of_signing_it(built, tmp_path):
    tmp, shards = built
    cache = _copy(tmp / "cache", tmp_path / "cache")
    good = _arrow_bytes(cache)
    f = cache / "train-000001.arrow"
    _flip(f, len(f.read_bytes()) // 2)
    res = cache_teacher(cache_config(shards, cache, epochs=2), DEMO_POLICY)
    assert not res.failed and res.reused_shards == 1
    assert len(res.redone) == 1 and res.redone[0].startswith("train-000001.tar (its file's bytes differ"), res.redone
    assert "redone 1 shard(s)" in res.summary()
    assert _arrow_bytes(cache) == good                       # the shard was computed again: the original bytes
    assert verify_cache(cache).ok


def test_a_killed_run_reuses_a_file_only_with_its_completion_record(built, tmp_path):
    """A run that stopped before its manifest: finished files are proven by their completion records;
    a file whose record is missing, or whose bytes differ from it, is redone."""
    tmp, shards = built
    cache = _copy(tmp / "cache", tmp_path / "cache")
    good = _arrow_bytes(cache)
    m = json.loads((cache / MANIFEST_NAME).read_text())
    (cache / MANIFEST_NAME).unlink()                         # as if killed before the manifest was written
    done = cache / CACHE_DONE_DIR
    done.mkdir()
    e0, e1 = m["shards"]
    for e in (e0, e1):
        (done / f"{e['file']}.json").write_text(json.dumps({"file": e["file"], "file_bytes": e["file_bytes"],
                                                             "file_sha256": e["file_sha256"], "run_id": m["run_id"]}))
    _flip(cache / e1["file"], 200)
    res = cache_teacher(cache_config(shards, cache, epochs=2), DEMO_POLICY)
    assert res.reused_shards == 1 and [r.split(" ")[0] for r in res.redone] == ["train-000001.tar"]
    assert _arrow_bytes(cache) == good and not done.exists()     # the manifest now proves the files
    (cache / MANIFEST_NAME).unlink()
    res = cache_teacher(cache_config(shards, cache, epochs=2), DEMO_POLICY)   # no record at all: both redone
    assert res.reused_shards == 0 and all("no checksum was recorded" in r for r in res.redone)
    assert _arrow_bytes(cache) == good


# ----------------------------------------------------------------------------- 2. and 6. an edited manifest

def _edit(m: dict, what: str) -> None:
    e = m["shards"][0]
    if what == "samples":
        e["samples"], e["records"] = 10, 10 * m["epochs"]
        m["totals"]["samples"] -= e["samples"] - 10
    edits = {"epochs": lambda: m.update(epochs=1), "topk": lambda: m.update(topk=3),
             "records": lambda: e.update(records=e["records"] + 1),
             "totals": lambda: m["totals"].update(records=m["totals"]["records"] + 1),
             "no classes": lambda: m.pop("classes"), "no file_sha256": lambda: e.pop("file_sha256"),
             "no shards": lambda: m.pop("shards"), "samples abc": lambda: e.update(samples="abc"),
             "cache_seed": lambda: m.update(cache_seed=1), "class name": lambda: m["classes"].__setitem__(0, "x"),
             "shard list": lambda: m.update(shards=[e]), "not a dict": lambda: m.clear()}
    if what != "samples":
        edits[what]()


EDITS = ["samples", "epochs", "topk", "records", "totals", "no classes", "no file_sha256", "no shards",
         "samples abc", "cache_seed", "class name", "shard list"]


@pytest.mark.parametrize("what", EDITS)
def test_an_edited_manifest_is_refused_in_one_line(built, tmp_path, what):
    tmp, _ = built
    cache = _copy(tmp / "cache", tmp_path / "cache")
    m = json.loads((cache / MANIFEST_NAME).read_text())
    _edit(m, what)
    (cache / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(FormatError) as e:
        c = open_cache(cache)
        for name in c.shard_names:                           # what a reader does before it uses a file
            c.file(name)
    msg = str(e.value)
    assert "\n" not in msg and ("manifest.json" in msg or ".arrow" in msg), msg
    try:                                                     # verify: the same refusal, or problems named
        assert not verify_cache(cache).ok
    except FormatError:
        pass


def test_edited_counts_and_epochs_stop_train_student_and_verify_with_exit_2(built, tmp_path):
    tmp, shards = built
    for what in ("samples", "epochs"):
        cache = _copy(tmp / "cache", tmp_path / f"cache-{what}")
        m = json.loads((cache / MANIFEST_NAME).read_text())
        _edit(m, what)
        (cache / MANIFEST_NAME).write_text(json.dumps(m))
        one_line_error(_train(shards, cache, tmp_path / f"run-{what}"), str(cache))
        assert _no_epoch(tmp_path / f"run-{what}")
        one_line_error(_cli("verify", cache))


# ----------------------------------------------------------------------------- 3. and 4. shard bytes proven

def _member_offset(tar: Path, index: int) -> tuple[str, int, int]:
    """(name, data offset, size) of the index-th image member of a tar."""
    with tarfile.open(tar) as t:
        images = [m for m in t.getmembers() if not m.name.endswith(".cls")]
        m = images[index]
        return m.name, m.offset_data, m.size


def test_a_shard_changed_in_place_stops_train_student(built, tmp_path):
    """One bit inside one image of a shard whose folder has its index.json (whose sha256 still names the
    old bytes): train-student stops with exit 2 naming the sample, before its targets are used."""
    tmp, shards = built
    local = _copy(shards, tmp_path / "shards")
    name, at, size = _member_offset(local / "train-000001.tar", 10)
    _flip(local / "train-000001.tar", at + size // 2, 3)
    assert (local / "index.json").exists()
    run = tmp_path / "run"
    one_line_error(_train(local, tmp / "cache", run), f"sample {name.split('.')[0]!r} changed since the cache")
    assert _no_epoch(run)


def test_an_incomplete_cache_is_no_cache_for_any_reader(tmp_path):
    """A truncated tar in a folder without index.json: cache-teacher exits 1 and writes no manifest;
    train-student, verify and inspect name the shard and how to finish the cache."""
    shards = demo_head(tmp_path, 64, SHARDS)
    (shards / "index.json").unlink()
    t = shards / "train-000001.tar"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 3])
    cache = tmp_path / "cache"
    r = _cli("cache-teacher", "--shards", shards, "--teacher", REPO / "shards/demo/teacher.pt", "--out", cache,
             "--teacher-input-size", "32", "--epochs", "2", "--topk", "5", "--workers", "1", "--threads", "1", "--quiet")
    assert r.returncode == 1, r.stderr[-2000:]
    assert not (cache / MANIFEST_NAME).exists()
    for r in (_train(shards, cache, tmp_path / "run"), _cli("verify", cache)):
        one_line_error(r, "not a complete cache", "train-000001.tar", "rerun the cache-teacher command")
    r = _cli("inspect", cache)                               # inspect describes it, naming the same
    assert r.returncode == 0 and "incomplete cache" in r.stdout and "1 hit read errors (train-000001.tar)" in r.stdout
    assert _no_epoch(tmp_path / "run")


# ----------------------------------------------------------------------------- 5. damage after the start check

def _epoch1_only_flip(f: Path) -> int:
    """A byte offset where one flipped bit leaves epoch 0's batches readable and damages epoch 1's."""
    data = f.read_bytes()
    probe = f.with_suffix(".probe")
    for at in range(len(data) // 2, len(data), 37):
        probe.write_bytes(data[:at] + bytes([data[at] ^ 4]) + data[at + 1:])
        try:
            with CacheFile(probe) as cf:
                cf.read(epochs=[0])
        except FormatError:
            continue
        try:
            with CacheFile(probe) as cf:
                cf.read(epochs=[1])
        except FormatError:
            probe.unlink()
            return at
    raise AssertionError("no offset damages only epoch 1")


def test_damage_after_the_start_check_stops_the_epoch_that_reads_it(built, tmp_path):
    from distill.config import TrainConfig
    from distill.train.data import DistillDataset
    from distill.train.prepare import prepare_data
    tmp, shards = built
    cache = _copy(tmp / "cache", tmp_path / "cache")
    cfg = TrainConfig(shards=str(shards), cache=str(cache), out=str(tmp_path / "run"), model="tinyvit-tiny",
                      image_size=32, batch_size=32, epochs=2, quiet=True)
    data = prepare_data(cfg, None)                           # every file checked (size, sha256) here
    at = _epoch1_only_flip(cache / "train-000000.arrow")
    _flip(cache / "train-000000.arrow", at, 2)
    ds = DistillDataset(data.refs, spec=data.spec, image_size=32, batch_size=32, seed=0, shuffle_buffer=64,
                     cache=data.cache, num_classes=data.num_classes)
    ds.set_epoch(0)
    assert sum(len(b["key"]) for b in ds) > 0                # epoch 0 is intact
    ds.set_epoch(1)
    with pytest.raises(FormatError, match=r"train-000000.arrow is damaged \(record batch \d+ \(epoch 1\).*distill verify"):
        for _ in ds:
            pass


# ----------------------------------------------------------------------------- the fuzz

FUZZ = textwrap.dedent("""
    import json, shutil, sys
    import numpy as np
    from distill.files import FormatError
    from distill.format import CacheFile
    src, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def read(path):
        with CacheFile(path) as f:      # what training reads: every epoch's records, then keys and digests
            t = f.read()
            return t, f.keys(), f.digests()

    want = read(src)
    data = open(src, "rb").read()
    rng = np.random.default_rng(seed)
    out = {"flips": n, "detected": 0, "harmless": 0, "wrong": [], "other_errors": []}
    for i in range(n):
        at, bit = int(rng.integers(len(data))), int(rng.integers(8))
        path = src + ".flip"
        with open(path, "wb") as f:
            f.write(data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:])
        try:
            got = read(path)
        except FormatError:
            out["detected"] += 1
            continue
        except Exception as e:      # anything but the one-line refusal is a failure
            out["other_errors"].append(f"byte {at} bit {bit}: {type(e).__name__}: {e}"[:200])
            continue
        same = got[0].equals(want[0]) and got[1].equals(want[1]) and np.array_equal(got[2], want[2])
        out["harmless" if same else "wrong"] += 1 if same else [f"byte {at} bit {bit}"]
    print(json.dumps(out))
""")


def _fuzz(built, tmp_path, n: int, seed: int) -> dict:
    tmp, _ = built
    f = shutil.copy(tmp / "cache" / "train-000000.arrow", tmp_path / "f.arrow")
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ)
    r = run_group([sys.executable, str(script), str(f), str(n), str(seed)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                  timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])      # a crash (e.g. a segfault) fails here
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["wrong"] == [] and out["other_errors"] == [], out
    assert out["detected"] + out["harmless"] == n and out["detected"] > n // 2, out
    return out


def test_random_bit_flips_are_refused_or_harmless(built, tmp_path):
    _fuzz(built, tmp_path, 60, seed=0)


@pytest.mark.slow
def test_random_bit_flips_are_refused_or_harmless_many(built, tmp_path):
    _fuzz(built, tmp_path, 400, seed=1)


# ----------------------------------------------------------------------------- the filter's output

def test_an_edited_filter_output_is_refused(built, tmp_path):
    """--exclude reads a filter's scores only when their bytes and counts match its summary.json."""
    from conftest import DEMO_TEACHER
    from distill.config import FilterConfig
    from distill.filter import filter_labels
    from distill.format import FILTER_SCORES_NAME, FILTER_SUMMARY_NAME, read_excluded_keys
    _, shards = built
    out = tmp_path / "filter"
    filter_labels(FilterConfig(shards=str(shards), scorer=(str(DEMO_TEACHER),), out=str(out), scorer_input_size=32,
                               topk=5, quiet=True, workers=1, threads=1))
    summary = json.loads((out / FILTER_SUMMARY_NAME).read_text())
    assert len(read_excluded_keys(out)) == summary["dropped"]
    scores = out / FILTER_SCORES_NAME
    good = scores.read_bytes()
    _flip(scores, len(good) // 2)
    with pytest.raises(FormatError, match="scores.arrow is not the file its summary.json describes"):
        read_excluded_keys(out)
    scores.write_bytes(good)
    (out / FILTER_SUMMARY_NAME).write_text(json.dumps(dict(summary, dropped=summary["dropped"] + 1)))
    with pytest.raises(FormatError, match=r"scored samples, \d+ dropped; its summary.json says"):
        read_excluded_keys(out)


# ----------------------------------------------------------------------------- convert-cache

def test_convert_cache_converts_only_a_proven_old_cache(tmp_path):
    """OLD's files must match its manifest (sha256, then samples, epochs, K) before they are rewritten."""
    from distill.cache.convert import convert_cache
    old = _copy(REPO / "tests" / "data" / "v1-cache", tmp_path / "old")
    f = next(old.glob("*.arrow"))
    good = f.read_bytes()
    _flip(f, len(good) // 2)
    with pytest.raises(FormatError, match="checksum differs .*nothing converted"):
        convert_cache(old, tmp_path / "new1", quiet=True)
    assert not (tmp_path / "new1").exists()
    f.write_bytes(good)
    m = json.loads((old / MANIFEST_NAME).read_text())
    (old / MANIFEST_NAME).write_text(json.dumps(dict(m, epochs=m["epochs"] - 1)))
    with pytest.raises(FormatError, match=r"holds \(samples, epochs, topk\) = .*not converted"):
        convert_cache(old, tmp_path / "new2", quiet=True)
    assert not (tmp_path / "new2" / MANIFEST_NAME).exists()


def test_verify_recompute_refuses_a_teacher_with_other_weights(built, tmp_path):
    """--teacher names a trusted copy of the cache's teacher: one with other weights is refused."""
    import torch
    from distill.files import UserError
    tmp, _ = built
    other = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                                 torch.nn.Linear(3, 10)).eval())
    path = tmp_path / "other.pt"
    other.save(str(path))
    with pytest.raises(UserError, match="other weights than the run expects"):
        verify_cache(tmp / "cache", recompute=2, teacher=(str(path),))

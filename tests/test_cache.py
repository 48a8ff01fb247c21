"""cache-teacher end to end on the real demo shards and teacher, on a real (embedded) Ray."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import DEMO_POLICY, DEMO_TEACHER, REPO, cache_config, demo_head, demo_subset, image_bytes, write_tar
from distill.data import augment
from distill.cache import cache_teacher, verify_cache
from distill.hooks import KILL_ONCE_ENV as FAULT_ENV
from distill.format import ARROW_ENTRY_KEY, MANIFEST_NAME, CacheFile, ShardIndex
from distill.files import FormatError, UserError
from distill.cache.reader import dense_target, open_cache

pytestmark = pytest.mark.usefixtures("ray_local")
SHARDS = ["train-000000.tar", "train-000001.tar"]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("cache")
    shards = demo_subset(tmp, SHARDS)
    res = cache_teacher(cache_config(shards, tmp / "cache"), DEMO_POLICY)
    return shards, tmp / "cache", res


def _records(path) -> pa.Table:
    return open_cache(path).to_table()


def test_logical_view_matches_the_spec(demo_cache):
    shards, out, res = demo_cache
    c = open_cache(out)
    index = ShardIndex.read(shards)
    assert res.samples == index.num_samples == c.num_samples
    assert res.records == c.num_records == c.num_samples * 2 and not res.failed
    t = c.to_table()
    assert t.column_names == ["key", "shard", "epoch", "seed", "topk_idx", "topk_prob", "label", "label_prob"]
    assert t.schema.field("seed").type == pa.uint32()
    assert t.schema.field("topk_idx").type == pa.list_(pa.uint16(), 5)
    assert t.schema.field("topk_prob").type == pa.list_(pa.float16(), 5)
    rows = t.slice(0, 50).to_pylist()
    for r in rows:
        assert r["seed"] == augment.derive_seed(0, r["epoch"], r["key"])
        assert r["topk_prob"] == sorted(r["topk_prob"], reverse=True)
        if r["label"] in r["topk_idx"]:
            assert abs(r["label_prob"] - r["topk_prob"][r["topk_idx"].index(r["label"])]) < 1e-3
    # the demo teacher is good: most records put the given label first
    top1 = t.column("topk_idx").combine_chunks().values.to_numpy().reshape(-1, 5)[:, 0]
    assert (top1 == t.column("label").to_numpy()).mean() > 0.8
    # lazy subsets agree with the full view
    e1 = c.to_table(epochs=[1], shards=[SHARDS[1]], columns=["key", "topk_idx"])
    full = t.filter(pa.compute.and_(pa.compute.equal(t["epoch"], 1), pa.compute.equal(t["shard"], SHARDS[1])))
    assert e1.column("topk_idx").to_pylist() == full.column("topk_idx").to_pylist()
    assert res.bytes_per_record < 40


def test_record_soft_target_and_replay_match_the_teacher(demo_cache):
    import torch
    _, out, _ = demo_cache
    c = open_cache(out)
    key = c.to_table(epochs=[0], columns=["key"]).column("key")[7].as_py()
    rec = c.record(key, 1)
    dense = c.soft_target(key, 1)
    assert dense.shape == (10,) and abs(dense.sum() - 1) < 1e-3
    assert np.allclose(dense[rec["topk_idx"]], rec["topk_prob"], atol=1e-6)
    teacher = torch.jit.load(str(DEMO_TEACHER)).eval()
    with torch.inference_mode():
        p = torch.softmax(teacher(c.view_tensor(key, 1, "teacher")[None]), -1)[0]
    assert int(p.argmax()) == rec["topk_idx"][0]
    assert float((p[rec["topk_idx"]] - torch.tensor(rec["topk_prob"], dtype=torch.float32)).abs().max()) < 2e-3
    assert dense_target(np.array([1, 2]), np.array([0.5, 0.3]), 4, "renorm").tolist() == [0, 0.625, 0.375, 0]


def test_verify_passes_then_fails_on_a_tampered_file(demo_cache, tmp_path):
    _, out, _ = demo_cache
    ok = verify_cache(out, recompute=6, teacher=(str(DEMO_TEACHER),))
    assert ok.ok and ok.recomputed == 6 and ok.top1_agreement == 1.0 and ok.max_abs_diff < 2e-3
    bad = tmp_path / "tampered"
    shutil.copytree(out, bad)
    f = next(bad.glob("*.arrow"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    res = verify_cache(bad)
    assert not res.ok and "checksum" in res.problems[0]
    (next(bad.glob("*.arrow"))).unlink()
    assert "missing" in verify_cache(bad).problems[0]


def test_rerun_resumes_and_refuses_other_settings(demo_cache, tmp_path):
    shards, out, _ = demo_cache
    again = tmp_path / "again"
    shutil.copytree(out, again)
    before = _records(again)
    res = cache_teacher(cache_config(shards, again), DEMO_POLICY)
    assert res.reused_shards == 2 and _records(again).equals(before)
    with pytest.raises(UserError, match="topk"):
        cache_teacher(cache_config(shards, again, topk=3), DEMO_POLICY)
    with pytest.raises(UserError, match="policy"):
        cache_teacher(cache_config(shards, again), dict(DEMO_POLICY, hflip=0.5))
    res = cache_teacher(cache_config(shards, again, topk=3, overwrite=True), DEMO_POLICY)
    assert open_cache(again).topk == 3 and res.reused_shards == 0


def test_decode_threads_is_accepted_and_changes_no_record(tmp_path):
    """--decode-threads is kept for old command lines: views are rendered by the view loader (--view-workers)."""
    shards = demo_head(tmp_path, 96, SHARDS)
    res = cache_teacher(cache_config(shards, tmp_path / "threads", decode_threads=3), dict(DEMO_POLICY, mixup_alpha=0.8,
                                                                                             mix_block=16))
    cache_teacher(cache_config(shards, tmp_path / "one"), dict(DEMO_POLICY, mixup_alpha=0.8, mix_block=16))
    assert not res.failed and _records(tmp_path / "threads").equals(_records(tmp_path / "one"))


def test_worker_killed_mid_shard_is_retried(demo_cache, tmp_path, monkeypatch):
    shards, out, _ = demo_cache
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(FAULT_ENV, str(marker))
    res = cache_teacher(cache_config(shards, tmp_path / "retry"), DEMO_POLICY)
    assert marker.exists(), "the fault hook did not fire"
    assert not res.failed
    assert _records(tmp_path / "retry").equals(_records(out))


# slow: test_integrity's killed-run test covers the reuse proof faster; tools/faults.py kills at 5 points
@pytest.mark.slow
def test_killed_run_resumes_to_identical_records(demo_cache, tmp_path):
    """SIGKILL the whole CLI after its first shard file and its completion record land; rerun: that file
    is reused, and the records equal an uninterrupted run's."""
    shards, out, _ = demo_cache
    dst = tmp_path / "killed"
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\n" + "\n".join(f"{k} = {v!r}".replace("'", '"').replace("False", "false")
                                               for k, v in DEMO_POLICY.items()) + "\n")
    cmd = [sys.executable, "-m", "distill.cli", "cache-teacher", "--shards", str(shards), "--teacher", str(DEMO_TEACHER),
           "--out", str(dst), "--epochs", "2", "--topk", "5", "--teacher-input-size", "32", "--workers", "1",
           "--threads", "1", "--policy", str(policy), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    def proven():                  # a finished shard file with its completion record (written just after it)
        return [f for f in dst.glob("*.arrow") if (dst / ".distill.done" / f"{f.name}.json").is_file()]
    while time.time() < deadline and not proven() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (dst / MANIFEST_NAME).exists()
    done = list(dst.glob("*.arrow"))
    assert len(done) == 1, "expected the run to be killed between shards"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 shard(s) reused" in rerun.stdout
    assert _records(dst).equals(_records(out))


def _bad_shards(tmp: Path) -> Path:
    d = tmp / "bad"
    good = image_bytes("JPEG", (40, 40), seed=1)
    write_tar(d / "s-000000.tar", [
        ("ok0.jpg", good), ("ok0.cls", b"3"),
        ("corrupt.jpg", good[:60]), ("corrupt.cls", b"1"),      # truncated JPEG
        ("nolabel.jpg", good),                                  # no .cls
        ("outofrange.jpg", good), ("outofrange.cls", b"12"),    # 10 classes
        ("ok1.png", image_bytes("PNG", (30, 50), seed=2)), ("ok1.cls", b"4"),
    ])
    write_tar(d / "s-000001.tar", [("ok2.jpg", good), ("ok2.cls", b"5"), ("ok3.jpg", good), ("ok3.cls", b"6")])
    (d / "s-000001.tar").write_bytes((d / "s-000001.tar").read_bytes()[:2500])   # truncated tar
    return d


def test_bad_samples_are_skipped_and_recorded(tmp_path):
    d = _bad_shards(tmp_path)
    res = cache_teacher(cache_config(d, tmp_path / "c", epochs=1), DEMO_POLICY)
    assert res.failed and "truncated" in res.failed[0]          # the damaged tar is an error for the run
    # a shard whose read hit an error makes the directory no cache: no manifest, every reader refuses it
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()
    with pytest.raises(FormatError, match=r"not a complete cache .*hit read errors \(s-000001.tar\).*rerun"):
        open_cache(tmp_path / "c")
    with CacheFile(tmp_path / "c" / "s-000000.arrow") as f:     # the good shard's file records its skips
        entry = json.loads(f.schema.metadata[ARROW_ENTRY_KEY])
        keys = set(f.keys().to_pylist())
    skipped = {s["key"]: s["reason"] for s in entry["skipped"]}
    assert set(skipped) == {"corrupt", "nolabel", "outofrange"}
    assert "decode" in skipped["corrupt"] and "range" in skipped["outofrange"]
    assert {"ok0", "ok1"} == keys
    # a shard whose read hit an error is never kept: the rerun redoes it (and says so again), keeps the other
    again = cache_teacher(cache_config(d, tmp_path / "c", epochs=1), DEMO_POLICY)
    assert again.reused_shards == 1 and again.failed and "truncated" in again.failed[0]


def test_duplicate_keys_across_shards_fail_the_run(tmp_path):
    d = tmp_path / "dup"
    img = image_bytes("JPEG", (40, 40))
    write_tar(d / "a-000000.tar", [("k1.jpg", img), ("k1.cls", b"1")])
    write_tar(d / "a-000001.tar", [("k1.jpg", img), ("k1.cls", b"2")])
    res = cache_teacher(cache_config(d, tmp_path / "c", epochs=1), DEMO_POLICY)
    assert res.failed and "duplicate keys" in res.failed[-1] and "k1" in res.failed[-1]
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()


def test_teacher_width_mismatch_is_refused_before_work(tmp_path):
    d = demo_subset(tmp_path, ["train-000000.tar"])
    idx = ShardIndex.read(d)
    ShardIndex(classes=idx.classes[:7], shards=idx.shards).write(d)
    with pytest.raises(UserError, match="teacher outputs 10 classes but the shard index lists 7"):
        cache_teacher(cache_config(d, tmp_path / "c"), DEMO_POLICY)
    assert not list((tmp_path / "c").glob("*.arrow"))


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be in [1, 1000000], got 0"),
    (["--teacher", "nowhere.pt"], "teacher spec not found"),
    (["--shards", "no/such/dir"], "shards not found"),
    (["--topk", "ten"], "bad value for topk"),
])
def test_cli_user_errors_exit_2_with_one_line(flags, message, tmp_path):
    base = {"--shards": str(REPO / "shards/demo/train"), "--teacher": str(DEMO_TEACHER), "--out": str(tmp_path / "c"),
            "--teacher-input-size": "32"}
    for i in range(0, len(flags), 2):
        base[flags[i]] = flags[i + 1]
    argv = [x for kv in base.items() for x in kv]
    r = subprocess.run([sys.executable, "-m", "distill.cli", "cache-teacher", *argv, "--quiet"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr

"""Cache format 2 (issue "ImageNet-21K for real", item 2): reading one epoch reads only that epoch's
record batches (counted, and the bytes counted through a file that counts its reads); every encoding
trick (class dictionaries, delta-coded probability bits, the label probability XOR its top-K
probability) round-trips bit for bit, even on values that defeat them; a version-1 cache is refused
with one line naming ``distill convert-cache``, and the converted cache holds the same records and
trains."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import distill
from distill import format as F
from distill.cache.convert import _v1_arrays, convert_cache
from distill.files import CountingFile, FormatError, UserError

REPO = Path(__file__).resolve().parents[1]
V1 = REPO / "tests" / "data" / "v1-cache"
BIN = Path(sys.executable).parent


def _synthetic(n: int, e: int, k: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, c, size=(n, 3 * k))                 # each sample's plausible classes
    pick = np.argsort(rng.random((n, e, 3 * k)), -1)[..., :k]
    ids = np.take_along_axis(np.broadcast_to(pool[:, None], (n, e, 3 * k)), pick, -1)
    prob = np.sort(rng.dirichlet(np.full(k + 1, 0.5), (n, e))[..., :k], -1)[..., ::-1].astype(np.float16)
    labels = pool[:, 0]
    lp = np.where(ids[..., 1] == labels[:, None], prob[..., 1], rng.random((n, e)) / 100).astype(np.float16)
    seeds = rng.integers(0, 2 ** 32, (n, e), dtype=np.uint64).astype(np.uint32)
    return [f"s/k{i:05d}" for i in range(n)], labels, seeds, ids, prob, lp


def _write(path: Path, n=300, e=12, k=5, c=21841, chunk=128, **kw) -> tuple:
    rec = _synthetic(n, e, k, c)
    t = F.encode_cache_shard(*rec, num_classes=c, shard="s.tar", chunk=chunk, **kw)
    path.write_bytes(F.ipc_bytes(t))
    return rec


def test_reading_one_epoch_reads_only_its_batches_and_bytes(tmp_path):
    f = tmp_path / "s.arrow"
    keys, labels, seeds, ids, prob, lp = _write(f)          # 300 samples = 3 batches of 128 per epoch, 12 epochs
    size = f.stat().st_size
    raw = CountingFile(f)
    cf = F.CacheFile(f, source=pa.PythonFile(raw, mode="r"))
    opened = raw.bytes
    assert opened < size / 20                                # the footer, not the data
    t = cf.read(epochs=[7], columns=["seed", "topk_idx", "topk_prob"])
    # epoch 7's three batches, and epoch 0's three for the class dictionaries: nothing else
    assert cf.batches_read == 6
    assert raw.bytes - opened < size / 4, (raw.bytes - opened, size)
    assert (t.column("seed").to_numpy() == seeds[:, 7]).all()
    assert (t.column("topk_idx").combine_chunks().flatten().to_numpy().reshape(-1, 5) == ids[:, 7]).all()
    got = t.column("topk_prob").combine_chunks().flatten().to_numpy().reshape(-1, 5)
    assert (got.view(np.uint16) == prob[:, 7].view(np.uint16)).all()
    # a row range reads only the batch that holds it
    before = cf.batches_read
    one = cf.read(epochs=[3], columns=["seed"], rows=(130, 131))
    assert cf.batches_read - before == 1 and one.column("seed").to_pylist() == [int(seeds[130, 3])]
    # all epochs read everything: the per-epoch read is a small part of it
    whole = CountingFile(f)
    F.CacheFile(f, source=pa.PythonFile(whole, mode="r")).read()
    assert whole.bytes > 0.9 * size
    cf.close()


def test_train_stream_reads_one_cached_epoch(tmp_path, monkeypatch):
    """The trainer's read of a cached epoch asks only for that epoch's batches (plus the dictionaries')."""
    out = tmp_path / "c"
    convert_cache(V1, out, quiet=True)
    c = distill.open_cache(out)
    asked = []
    real = F.CacheFile.fetch
    monkeypatch.setattr(F.CacheFile, "fetch", lambda self, e, cols, a, b: asked.append(e) or real(self, e, cols, a, b))
    c.shard_table("train-000000.tar", epochs=[2], columns=["seed", "topk_idx", "topk_prob"])
    assert sorted(set(asked)) == [0, 2]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_encodings_are_lossless_on_values_that_defeat_them(dtype):
    """Unsorted probabilities (deltas wrap), label probabilities that differ from the top-K one although
    the label is in the top-K, zeros, NaN, negative zero, and one label in every rank."""
    rng = np.random.default_rng(1)
    n, e, k = 40, 6, 4
    ids = np.stack([[rng.permutation(9)[:k] for _ in range(e)] for _ in range(n)])
    prob = rng.random((n, e, k)).astype(dtype)                          # not sorted
    prob[0, 0] = [np.nan, -0.0, 0.0, np.inf]
    labels = rng.integers(0, 9, n)
    lp = rng.random((n, e)).astype(dtype)
    hit = ids == labels[:, None, None]
    lp[:20] = np.where(hit[:20].any(-1), (prob[:20] * hit[:20]).max(-1), lp[:20])   # equal when in top-K
    lp[5, 2] = 0.0
    seeds = rng.integers(0, 2 ** 32, (n, e), dtype=np.uint64).astype(np.uint32)
    t = F.encode_cache_shard([f"k{i}" for i in range(n)], labels, seeds, ids, prob, lp, num_classes=9,
                             prob_dtype=dtype, chunk=16, group=4)
    back = pa.ipc.open_file(pa.BufferReader(F.ipc_bytes(t))).read_all()
    L = F.decode_cache_shard(back)
    bits = np.dtype(f"u{np.dtype(dtype).itemsize}")
    got_p = L.column("topk_prob").combine_chunks().flatten().to_numpy().reshape(n, e, k)
    assert (got_p.view(bits) == prob.view(bits)).all()
    got_lp = L.column("label_prob").to_numpy().reshape(n, e).astype(dtype)
    assert (got_lp.view(bits) == lp.view(bits)).all()
    assert (L.column("topk_idx").combine_chunks().flatten().to_numpy().reshape(n, e, k) == ids).all()


def test_a_version_1_cache_is_refused_with_the_converter_named(tmp_path):
    with pytest.raises(FormatError, match="format version 1.*distill convert-cache"):
        distill.open_cache(V1)
    r = subprocess.run([str(BIN / "distill"), "train-student", "--cache", str(V1), "--shards",
                        str(REPO / "shards/demo/train/train-00000{0..1}.tar"), "--out", str(tmp_path / "run"),
                        "--model", "tinyvit-tiny", "--image-size", "32", "--epochs", "1", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and f"distill convert-cache {V1}" in lines[0], r.stderr


def test_convert_cache_keeps_every_record_and_the_result_trains(tmp_path):
    from conftest import DEMO_POLICY  # noqa: F401  (the policy the fixture was made with)
    out = tmp_path / "v2"
    r = subprocess.run([str(BIN / "distill"), "convert-cache", str(V1), str(out), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    c = distill.open_cache(out)
    assert c.manifest["version"] == F.CACHE_VERSION and json.loads((out / F.RUN_NAME).read_text())["version"] == 2
    old = json.loads((V1 / F.MANIFEST_NAME).read_text())
    for e in old["shards"]:
        md, a = _v1_arrays(F.read_ipc(V1 / e["file"]))
        n, E, K = a["ids"].shape
        t = c.shard_table(e["name"])
        assert t.column("key").to_pylist() == [k for k in a["keys"] for _ in range(E)]
        assert (t.column("seed").to_numpy().reshape(n, E) == a["seeds"]).all()
        assert (t.column("topk_idx").combine_chunks().flatten().to_numpy().reshape(n, E, K) == a["ids"]).all()
        p = t.column("topk_prob").combine_chunks().flatten().to_numpy().reshape(n, E, K)
        assert (p.view(np.uint16) == a["prob"].view(np.uint16)).all()
        assert (t.column("label_prob").to_numpy().reshape(n, E) == a["label_prob"].astype(np.float32)).all()
    # the converted files carry the new run id, so a cache-teacher resume with the same settings reuses them
    with pa.memory_map(str(out / old["shards"][0]["file"])) as src:
        assert pa.ipc.open_file(src).schema.metadata[F.ARROW_RUN_ID_KEY].decode() == c.manifest["run_id"]
    # refused: converting again, or into a non-empty directory that holds no conversion of OLD
    with pytest.raises(UserError, match="already"):
        convert_cache(out, tmp_path / "again")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        convert_cache(V1, tmp_path / "other")
    # it trains (one step): every check of train-student (files, fingerprints, shard set) passes
    shards = tmp_path / "train"
    shards.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        shutil.copy2(REPO / "shards/demo/train" / name, shards / name)
    from distill.config import TrainConfig
    from distill.train import train_student
    res = train_student(TrainConfig(shards=str(shards), cache=str(out), out=str(tmp_path / "run"), model="tinyvit-tiny",
                                    epochs=1, batch_size=32, image_size=32, quiet=True, device="cpu"), stop_after=1)
    assert res is not None


def test_a_transient_read_error_marks_the_shard_incomplete_and_a_rerun_redoes_it(tmp_path, monkeypatch, ray_local):
    """An I/O error mid-tar (injected once, in the Ray worker): the shard's file holds what was read and
    records the error, the run fails and writes no manifest; the rerun redoes that shard and only that one."""
    from conftest import DEMO_POLICY, cache_config, demo_head
    from distill.cache import cache_teacher
    from distill.hooks import READ_ONCE_ENV as READ_FAULT_ENV
    shards = demo_head(tmp_path, 64, ["train-000000.tar", "train-000001.tar"])
    out = tmp_path / "cache"
    monkeypatch.setenv(READ_FAULT_ENV, str(tmp_path / "read-fault"))
    first = cache_teacher(cache_config(shards, out, workers=1, retries=0), DEMO_POLICY)
    assert (tmp_path / "read-fault").exists()
    assert first.failed and any("read error" in f for f in first.failed), first.failed
    assert not (out / F.MANIFEST_NAME).exists()
    entries = []
    for f in sorted(out.glob("*.arrow")):
        with F.CacheFile(f) as cf:
            entries.append(json.loads(cf.schema.metadata[F.ARROW_ENTRY_KEY]))
    bad = [e for e in entries if e.get("errors")]
    assert len(entries) == 2 and len(bad) == 1 and bad[0]["errors"][0].startswith("read error")
    second = cache_teacher(cache_config(shards, out, workers=1, retries=0), DEMO_POLICY)   # marker exists: no fault
    assert not second.failed and second.reused_shards == 1
    m = json.loads((out / F.MANIFEST_NAME).read_text())
    assert all(e["complete"] for e in m["shards"]) and m["totals"]["incomplete_shards"] == 0
    clean = cache_teacher(cache_config(shards, tmp_path / "clean", workers=1), DEMO_POLICY)
    assert not clean.failed
    assert distill.open_cache(out).to_table().equals(distill.open_cache(tmp_path / "clean").to_table())


def test_the_trainer_matches_tar_samples_to_cache_rows_by_seed(tmp_path):
    """Without --exclude train-student reads no keys from the cache: a tar sample is a row when its key's
    seed is the row's. A tar that is not the one cached (another shard under this name) stops the
    stream with a line naming the shard; the right tar gives every row once; with --exclude (keys
    read) the excluded keys are left out."""
    from distill.train.data import ShardRef, DistillDataset
    out = tmp_path / "c"
    convert_cache(V1, out, quiet=True)
    c = distill.open_cache(out)
    n = c.manifest["shards"][0]["samples"]
    demo = REPO / "shards/demo/train"

    def stream(path, exclude=frozenset()):
        ds = DistillDataset([ShardRef(str(path), "train-000000.tar", n - len(exclude))], spec=c.view_spec, image_size=32,
                         batch_size=50, seed=0, shuffle_buffer=10, cache=c, num_classes=c.num_classes,
                         exclude=exclude, drop_last=False)
        ds.set_epoch(1)
        return [k for b in ds for k in b["key"]]

    with pytest.raises(UserError, match="train-000001.tar does not match the cache"):
        stream(demo / "train-000001.tar")
    keys = c.keys("train-000000.tar").to_pylist()
    assert sorted(stream(demo / "train-000000.tar")) == sorted(keys)
    drop = frozenset(keys[5:9])
    assert sorted(stream(demo / "train-000000.tar", drop)) == sorted(set(keys) - drop)

"""Object storage against a real S3 API (moto's server on 127.0.0.1, started by conftest): the storage
module, ``distill push`` and ``distill pull`` (whole, first epochs, some shards), damage in the bucket,
an interrupted pull and its rerun, and no credential in any file distill writes."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, S3_SECRET, cache_config, demo_head

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from distill import storage  # noqa: E402
from distill.files import FormatError, UserError  # noqa: E402

POLICY = {"size": 32, "scale": [0.35, 1.0], "hflip": 0.5, "re_prob": 0.0}


def _cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


@pytest.fixture(scope="module")
def cache4(tmp_path_factory, ray_local):
    """A real 4-epoch cache of two demo shards (240 samples each), written by cache-teacher."""
    from distill.cache import cache_teacher
    tmp = tmp_path_factory.mktemp("s3cache")
    shards = demo_head(tmp, 240, ["train-000000.tar", "train-000001.tar"])
    res = cache_teacher(cache_config(shards, tmp / "cache", epochs=4, topk=5), POLICY)
    assert not res.failed
    return shards, tmp / "cache"


def test_storage_reads_writes_ranges_and_exclusive_creates(bucket):
    url = f"{bucket}/a/b.bin"
    data = bytes(range(256)) * 40
    storage.write_bytes(url, data)
    assert storage.exists(url) and storage.size(url) == len(data)
    assert storage.read_bytes(url) == data and storage.read_bytes(url, 100, 164) == data[100:164]
    assert storage.listdir(f"{bucket}/a") == ["b.bin"]
    before = storage.STATS.snapshot()
    with storage.open_input(url, block=1000) as f:            # seek + read: one ranged GET per miss
        f.seek(5000)
        assert f.read(10) == data[5000:5010] and f.read(10) == data[5010:5020]
    assert storage.STATS.snapshot()["gets"] - before["gets"] == 1
    storage.write_bytes(f"{bucket}/lock", b"one", exclusive=True)
    with pytest.raises(FileExistsError):
        storage.write_bytes(f"{bucket}/lock", b"two", exclusive=True)
    assert storage.read_bytes(f"{bucket}/lock") == b"one"
    with pytest.raises(UserError, match="not found"):
        storage.read_bytes(f"{bucket}/nothing-here")
    with pytest.raises(UserError, match="read-only"):
        storage.write_bytes("https://example.invalid/x", b"")


def test_a_secret_in_an_error_is_redacted(bucket, monkeypatch):
    storage.set_options({"secret": "opt-secret-value-123"})
    try:
        assert storage.redact(f"failed with {S3_SECRET} and opt-secret-value-123") == "failed with *** and ***"
    finally:
        storage.set_options(None)
    with pytest.raises(UserError, match="not JSON"):
        storage.set_options("{nope")


def test_push_then_pull_whole_is_the_same_cache(cache4, bucket, tmp_path):
    from distill.cache.transfer import pull, push
    _, local = cache4
    url = f"{bucket}/cache"
    res = push(local, url, quiet=True)
    assert res.files == 2 and res.reused == 0
    again = push(local, url, quiet=True)                    # a rerun proves and skips
    assert again.reused == 2 and again.bytes_written == 0
    got = pull(url, tmp_path / "copy", quiet=True)
    src = json.loads((local / "manifest.json").read_text())
    for e in src["shards"]:
        assert (tmp_path / "copy" / e["file"]).read_bytes() == (local / e["file"]).read_bytes()
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text()) == src
    assert got.files == 2 and got.stats["gets"] >= 3


def test_pull_of_the_first_epochs_fetches_their_bytes_and_trains(cache4, bucket, tmp_path):
    import distill
    shards, local = cache4
    url = f"{bucket}/cache"
    r = _cli("push", local, url, "--quiet")
    assert r.returncode == 0, r.stderr
    from distill.cache.transfer import pull
    full = pull(url, tmp_path / "all", quiet=True).stats["bytes_in"]          # files and manifest
    res = pull(url, tmp_path / "two", epochs="0-1", quiet=True)
    assert res.epochs == 2 and res.stats["bytes_in"] <= 0.6 * full, (res.stats, full)
    whole, part = distill.open_cache(local), distill.open_cache(tmp_path / "two")
    assert part.epochs == 2 and part.num_records == whole.num_samples * 2
    for e in (0, 1):                                        # the same records, bit for bit
        a, b = whole.to_table(epochs=[e]), part.to_table(epochs=[e])
        for col in ("key", "seed", "topk_idx", "topk_prob", "label_prob"):
            assert a.column(col).to_pylist() == b.column(col).to_pylist(), (e, col)
    r = _cli("verify", tmp_path / "two")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _cli("train-student", "--shards", shards, "--cache", tmp_path / "two", "--out", tmp_path / "run",
             "--model", "tinyvit-tiny", "--image-size", 32, "--epochs", 3, "--batch-size", 16, "--loader-workers", 0,
             "--device", "cpu", "--threads", 1, "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("cache_epoch") for row in rows] == [0, 1, 0]          # wraps at the pulled 2 epochs
    for name in ("manifest.json", "run.json"):
        assert S3_SECRET not in (tmp_path / "two" / name).read_text()


def test_pull_of_some_shards_and_a_bad_range_are_refused_or_kept(cache4, bucket, tmp_path):
    from distill.cache.transfer import pull, push
    _, local = cache4
    url = f"{bucket}/c"
    push(local, url, quiet=True)
    res = pull(url, tmp_path / "one", shards="train-000001*", epochs="0-0", quiet=True)
    m = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert res.files == 1 and [s["name"] for s in m["shards"]] == ["train-000001.tar"] and m["epochs"] == 1
    for bad, why in (("1-2", "first epochs"), ("0-9", "epochs 0-3"), ("x", "range")):
        with pytest.raises(UserError, match=why):
            pull(url, tmp_path / "bad", epochs=bad, quiet=True)
    with pytest.raises(UserError, match="no shard"):
        pull(url, tmp_path / "bad", shards="nope*", quiet=True)
    with pytest.raises(UserError, match="not found.*complete cache"):
        pull(f"{bucket}/nothing", tmp_path / "bad", quiet=True)
    assert not (tmp_path / "bad").exists()


def test_a_flipped_byte_in_the_bucket_is_named_and_nothing_is_pulled(cache4, bucket, tmp_path):
    from distill.cache.transfer import push
    _, local = cache4
    url = f"{bucket}/c"
    push(local, url, quiet=True)
    entry = json.loads((local / "manifest.json").read_text())["shards"][1]
    key = f"{url}/{entry['file']}"
    data = bytearray(storage.read_bytes(key))
    data[len(data) // 3] ^= 0x20                            # inside epoch 0's record batches
    storage.write_bytes(key, bytes(data))
    for epochs in (None, "0-1"):
        args = ["pull", url, tmp_path / f"p{epochs}", "--quiet"] + (["--epochs", epochs] if epochs else [])
        r = _cli(*args)
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and entry["file"] in line and "damaged" in line, line
        assert not (tmp_path / f"p{epochs}" / "manifest.json").exists()


def test_an_interrupted_pull_reruns_to_the_same_cache(cache4, bucket, tmp_path):
    from distill.cache.transfer import DONE_DIR, pull, push
    _, local = cache4
    url = f"{bucket}/c"
    push(local, url, quiet=True)
    # SIGKILLed once its first file and that file's record are written
    r = _cli("pull", url, tmp_path / "p", "--epochs", "0-1", "--quiet",
             env={"DISTILL_FAULT_KILL_AT": "train-000000.arrow.json:1"})
    assert r.returncode == -9, r.stderr
    assert not (tmp_path / "p" / "manifest.json").exists()
    first = pull(url, tmp_path / "p", epochs="0-1", quiet=True)
    assert first.reused == 1 and (tmp_path / "p" / "manifest.json").exists()
    clean = pull(url, tmp_path / "q", epochs="0-1", quiet=True)
    assert clean.reused == 0
    for name in ["manifest.json"] + sorted(p.name for p in (tmp_path / "q").glob("*.arrow")):
        assert (tmp_path / "p" / name).read_bytes() == (tmp_path / "q" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "p" / DONE_DIR).iterdir()) == \
        sorted(p.name for p in (tmp_path / "q" / DONE_DIR).iterdir())
    rerun = pull(url, tmp_path / "q", epochs="0-1", quiet=True)       # a finished pull proves and keeps
    assert rerun.reused == 2 and rerun.bytes_written == 0
    with pytest.raises(UserError):                                     # another pull into it is refused
        pull(url, tmp_path / "q", epochs="0-0", quiet=True)


def test_open_cache_on_a_bucket_reads_one_epoch_by_its_byte_range(cache4, bucket):
    """A remote cache reads the records a local one does; one epoch costs its footer (once) and one span."""
    import distill
    from distill.cache.transfer import push
    _, local = cache4
    url = f"{bucket}/c"
    push(local, url, quiet=True)
    here, there = distill.open_cache(local), distill.open_cache(url)
    assert there.remote and there.num_records == here.num_records and there.shard_names == here.shard_names
    before = storage.STATS.snapshot()
    for e in (1, 3):
        for name in here.shard_names:
            a = here.shard_table(name, epochs=[e], columns=["seed", "topk_idx", "topk_prob"])
            b = there.shard_table(name, epochs=[e], columns=["seed", "topk_idx", "topk_prob"])
            assert a.equals(b), (name, e)
    spent = storage.STATS.snapshot()
    files = {e["name"]: e["file_bytes"] for e in here.manifest["shards"]}
    epoch_bytes = sum(files.values()) / here.epochs
    per_epoch = (spent["bytes_in"] - before["bytes_in"]) / 2
    assert per_epoch <= 1.5 * epoch_bytes, (per_epoch, epoch_bytes)
    assert [there.digests(n).tolist() for n in there.shard_names] == [here.digests(n).tolist() for n in here.shard_names]
    assert there.record(here.keys(here.shard_names[0])[5], 2) == here.record(here.keys(here.shard_names[0])[5], 2)


def _upload_dir(local: Path, url: str) -> None:
    for f in sorted(local.iterdir()):
        storage.write_bytes(f"{url}/{f.name}", f.read_bytes())


def test_train_student_from_a_bucket_reaches_the_local_weights(cache4, bucket, tmp_path):
    """s3:// shards and an s3:// cache: the same checks, the same batches, the same weights as local copies;
    a changed shard in the bucket is refused like a local one."""
    import torch
    shards, local = cache4
    _upload_dir(shards, f"{bucket}/train")
    r = _cli("push", local, f"{bucket}/cache", "--quiet")
    assert r.returncode == 0, r.stderr
    common = ["--model", "tinyvit-tiny", "--image-size", 32, "--epochs", 1, "--batch-size", 16, "--loader-workers", 1,
              "--device", "cpu", "--threads", 1, "--quiet"]
    for where, s, c in (("remote", f"{bucket}/train", f"{bucket}/cache"), ("local", shards, local)):
        r = _cli("train-student", "--shards", s, "--cache", c, "--out", tmp_path / where, *common)
        assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "remote" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "local" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in (tmp_path / "remote").rglob("*"):
        if f.is_file():
            assert S3_SECRET.encode() not in f.read_bytes(), f
    name = sorted(p.name for p in shards.glob("*.tar"))[0]
    data = bytearray((shards / name).read_bytes())
    data[len(data) // 2] ^= 0x01                             # same size, one image byte changed
    storage.write_bytes(f"{bucket}/train/{name}", bytes(data))
    r = _cli("train-student", "--shards", f"{bucket}/train", "--cache", f"{bucket}/cache", "--out", tmp_path / "x", *common)
    assert r.returncode == 2 and name in r.stderr, r.stderr


def test_cache_teacher_from_a_bucket_to_a_bucket_is_the_local_cache_and_survives_a_kill(cache4, bucket, tmp_path):
    """s3:// shards -> s3:// cache: the same files, byte for byte, as the local run of the same command; a
    SIGKILL mid-run leaves no manifest, and the rerun completes the identical cache; a second writer to the
    same --out is refused while the first holds it."""
    shards, local = cache4
    _upload_dir(shards, f"{bucket}/train")
    args = ["--teacher", str(REPO / "shards" / "demo" / "teacher.pt"), "--epochs", 4, "--topk", 5,
            "--teacher-input-size", 32, "--batch-size", 64, "--workers", 1, "--threads", 1, "--quiet",
            "--config", tmp_path / "p.toml"]
    (tmp_path / "p.toml").write_text("[policy]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in POLICY.items()))
    out = f"{bucket}/cache"
    # a second writer: a live run of this host holds the lock object (put if absent, on the real server)
    storage.write_bytes(f"{out}/.distill.lock", json.dumps({"what": "cache-teacher", "host": os.uname().nodename,
                                                            "pid": os.getpid(), "started": "now"}).encode())
    r = _cli("cache-teacher", "--shards", f"{bucket}/train", "--out", out, *args)
    assert r.returncode == 2 and f"pid {os.getpid()}" in r.stderr and "being written" in r.stderr, r.stderr
    storage.remove(f"{out}/.distill.lock")
    # SIGKILL once the second shard's object is uploaded, before its completion record
    r = _cli("cache-teacher", "--shards", f"{bucket}/train", "--out", out, *args,
             env={"DISTILL_FAULT_KILL_AT": "train-000001.arrow:1"})
    assert r.returncode == -9, r.stderr
    assert not storage.exists(f"{out}/manifest.json") and storage.exists(f"{out}/.distill.lock")
    assert storage.listdir(f"{out}/.distill.done") == ["train-000000.arrow.json"]
    r = _cli("cache-teacher", "--shards", f"{bucket}/train", "--out", out, *args)      # takes the dead run's lock
    assert r.returncode == 0, r.stderr
    m = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    want = json.loads((local / "manifest.json").read_text())
    for e, w in zip(m["shards"], want["shards"]):
        assert storage.read_bytes(f"{out}/{e['file']}") == (local / w["file"]).read_bytes(), e["file"]
    assert m["run_id"] == want["run_id"]
    assert not storage.exists(f"{out}/.distill.lock") and not storage.listdir(f"{out}/.distill.done")
    # every object under the prefix is one the manifest vouches for (or the manifest and run file)
    assert storage.listdir(out) == sorted([e["file"] for e in m["shards"]] + ["manifest.json", "run.json"])
    for name in storage.listdir(out):                       # no credential in anything the run wrote
        assert S3_SECRET.encode() not in storage.read_bytes(f"{out}/{name}"), name


def test_inspect_and_verify_take_a_bucket(cache4, bucket):
    from distill.cache.transfer import push
    shards, local = cache4
    push(local, f"{bucket}/c", quiet=True)
    _upload_dir(shards, f"{bucket}/train")
    r = _cli("inspect", f"{bucket}/c")
    assert r.returncode == 0 and "480 samples x 4 epochs" in r.stdout, r.stdout + r.stderr
    r = _cli("inspect", f"{bucket}/train")
    assert r.returncode == 0 and "train-000001.tar" in r.stdout, r.stdout + r.stderr
    r = _cli("verify", f"{bucket}/c")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _cli("inspect", f"{bucket}/nothing")
    assert r.returncode == 2 and "\n" not in r.stderr.strip(), r.stderr


def test_a_dataset_from_a_bucket_with_exclude_on_the_bucket_is_the_local_one(bucket, ray_local):
    """DistillDataset over s3:// shards, cache and --exclude (a filter-labels directory in the bucket):
    the same batches, keys and targets as over the local copies."""
    import distill
    import torch
    fixture = REPO / "tests" / "data" / "view-fixture"
    for sub in ("shards", "cache", "filter"):
        _upload_dir(fixture / sub, f"{bucket}/{sub}")
    kw = dict(image_size=32, batch_size=8, seed=3, rank=0, world=1, drop_last=False)
    here = distill.DistillDataset(str(fixture / "shards"), str(fixture / "cache"), exclude=str(fixture / "filter"), **kw)
    there = distill.DistillDataset(f"{bucket}/shards", f"{bucket}/cache", exclude=f"{bucket}/filter", **kw)
    for epoch in (0, 2):
        here.set_epoch(epoch)
        there.set_epoch(epoch)
        a, b = list(here), list(there)
        assert [x["key"] for x in a] == [x["key"] for x in b] and len(a) > 1
        for x, y in zip(a, b):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["topk_prob"], y["topk_prob"])
    from distill.format import read_excluded_keys
    dropped = read_excluded_keys(f"{bucket}/filter")
    assert dropped and dropped == read_excluded_keys(fixture / "filter")
    assert not dropped & {k for x in b for k in x["key"]}

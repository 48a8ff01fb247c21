"""The student loader that keeps a GPU busy, tested on the CPU: uint8 views finished on the training
device give the worker-finished views bit for bit; persistent workers follow set_epoch; the default
worker count; a run with device views equals one without."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distill.config import CacheConfig, TrainConfig
from distill.train import prepare_data, train_student
from distill.train.data import DistillDataset, DistillLoader, auto_workers, finish

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "shards" / "demo"
TEACHER = DEMO / "teacher.pt"
TRAIN1 = str(DEMO / "train" / "train-000001.tar")
POLICY = {"size": 32, "scale": [0.35, 1.0], "hflip": 0.5, "auto_augment": "rand-n1-m5-mstd0.5-inc1",
          "re_prob": 0.5, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 0.7, "mix_block": 16}

pytestmark = pytest.mark.skipif(not TEACHER.is_file(), reason="demo shards/teacher not generated")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, ray_local) -> Path:
    from distill.cache import cache_teacher   # test side only: the trainer never imports it
    out = tmp_path_factory.mktemp("loader") / "cache"
    res = cache_teacher(CacheConfig(shards=TRAIN1, teacher=(str(TEACHER),), out=str(out), epochs=2, topk=5,
                                    teacher_input_size=32, quiet=True, workers=1, threads=1), POLICY)
    assert not res.failed
    return out


def _cfg(cache_dir, out, **kw) -> TrainConfig:
    base = dict(shards=TRAIN1, cache=str(cache_dir), out=str(out), model="tinyvit-tiny", image_size=32, epochs=2,
                batch_size=32, lr=2e-3, warmup_epochs=0.5, quiet=True, recipe="none", loader_workers=0)
    base.update(kw)
    return TrainConfig(**base)


def _stream(data, **kw) -> DistillDataset:
    return DistillDataset(data.refs, spec=data.spec, image_size=32, batch_size=40, seed=0, shuffle_buffer=64,
                       cache=data.cache, num_classes=data.num_classes, drop_last=False, **kw)


def test_uint8_views_finished_on_the_device_equal_the_workers_views(cache_dir, tmp_path):
    data = prepare_data(_cfg(cache_dir, tmp_path / "r"), None)
    for epoch in (0, 1):
        a, b = _stream(data), _stream(data, finish="none")
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        mixed = erased = 0
        for x, y in zip(a, b, strict=True):
            assert y["image_u8"].dtype == torch.uint8 and y["image_u8"].shape == (len(y["key"]), 3, 32, 32)
            got = finish(y, torch.device("cpu"))["image"]
            assert torch.equal(got, x["image"])                  # bit for bit (max |delta| = 0 <= 1e-6)
            for k in ("topk_idx", "topk_prob", "label", "label2", "lam", "epoch"):
                assert torch.equal(x[k], y[k])
            assert x["key"] == y["key"]
            mixed += sum(plan is not None for plan in y["views"]["plans"])
            erased += sum(bool(p.get("erase")) for p in y["views"]["params"])
        assert mixed > 0 and erased > 0                          # both steps were exercised


def test_persistent_workers_follow_set_epoch(cache_dir, tmp_path):
    data = prepare_data(_cfg(cache_dir, tmp_path / "r"), None)
    ds = _stream(data, finish="none")
    dl = DistillLoader(ds, 1, persistent_workers=True)
    got = {}
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        got.setdefault(epoch, []).append([k for b in dl for k in b["key"]])
    ref = _stream(data)
    for epoch in (0, 1):
        ref.set_epoch(epoch)
        want = [k for b in ref for k in b["key"]]
        assert all(keys == want for keys in got[epoch])
    assert got[0][0] != got[1][0]


def test_auto_workers_is_the_core_share_less_one():
    cores = len(os.sched_getaffinity(0))
    assert auto_workers() == max(0, cores - 1)
    assert auto_workers(local_processes=cores) == 0


def test_device_views_run_equals_worker_views_run(cache_dir, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _two_runs(cache_dir, tmp_path)
    finally:
        torch.set_num_threads(before)


def _two_runs(cache_dir, tmp_path):
    a = train_student(_cfg(cache_dir, tmp_path / "a"))
    b = train_student(_cfg(cache_dir, tmp_path / "b", device_views=True, loader_workers=-1))
    rows = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    assert a.complete and b.complete
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg_b["loader-workers"] == auto_workers()                 # the resolved count, not -1
    if cfg_b["loader-workers"] <= 1:                                  # one worker splits the data as none does
        assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]
        sa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
        sb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

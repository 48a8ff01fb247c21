"""DDP: an even split of every epoch's samples over (rank, loader worker), views that do not depend on
the split, and errors that reach every rank.

Shards of 37, 5, 61 and 18 samples (121, odd) of tiny JPEGs; the 2-rank tests start two real gloo
processes (MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK, no torchrun: so that nothing but distill itself
stops the other rank).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, image_bytes, kill_group, nan_checkpoint
from distill.config import TrainConfig
from distill.data import augment, views
from distill.data.shards import Sample, iter_shard, write_shards
from distill.format import ShardIndex
from distill.train import prepare_data
from distill.train.data import DistillDataset, DistillLoader
from distill.train.order import epoch_segments

SIZES = (37, 5, 61, 18)
POLICY = {"size": 32, "scale": [0.35, 1.0], "hflip": 0.5, "auto_augment": None, "re_prob": 0.5,
          "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 0.8, "mix_block": 8}


def uneven_shards(root: Path, sizes=SIZES, classes: int = 4) -> Path:
    """Shards ``part{i}-000000.tar`` of these sizes in ``root/train``, one index.json for all."""
    out, names = root / "train", [f"c{c}" for c in range(classes)]
    out.mkdir(parents=True)
    entries, n = [], 0
    for i, size in enumerate(sizes):
        samples = [Sample(f"s{i}_{j:03d}", image_bytes("JPEG", (20, 16), seed=n + j), "jpg", (n + j) % classes)
                   for j in range(size)]
        n += size
        entry = write_shards(samples, root / f"part{i}", f"part{i}", size, names).shards[0]
        (root / f"part{i}" / entry.name).rename(out / entry.name)
        entries.append(entry)
    ShardIndex(classes=names, shards=entries).write(out)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return uneven_shards(tmp_path_factory.mktemp("ddp"))


def _data(shards: Path, out: Path):
    return prepare_data(TrainConfig(shards=str(shards), out=str(out), hard_labels=True, image_size=32), POLICY)


# ----------------------------------------------------------------------------- the split, in one process

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_is_even_and_reads_each_sample_once(world):
    counts, n = list(SIZES), sum(SIZES)
    for workers in (1, 2, 3):
        for batch, drop_last in ((1, True), (6, True), (8, True), (8, False)):
            for epoch in (0, 1):
                ranks = []
                for rank in range(world):
                    parts = [epoch_segments(counts, epoch, 0, rank, world, w, workers, batch, drop_last)
                             for w in range(workers)]
                    sizes = [sum(b - a for _, a, b in p) for p in parts]
                    assert all(s % batch == 0 for s in sizes) or not drop_last
                    ranks.append(([(i, j) for p in parts for i, a, b in p for j in range(a, b)], sizes))
                per_rank = {sum(s) for _, s in ranks}
                assert len(per_rank) == 1 and len({tuple(s) for _, s in ranks}) == 1   # same sizes, worker by worker
                read = [x for r, _ in ranks for x in r]
                assert len(read) == len(set(read))                                     # nobody reads a sample twice
                assert all(0 <= j < counts[i] for i, j in read)
                left = n - len(read)
                assert left <= world - 1 + (world * (batch - 1) if drop_last else 0)
                if drop_last:
                    assert per_rank == {n // world // batch * batch}
                else:
                    assert per_rank == {n // world}


def test_views_do_not_depend_on_the_split(shards, tmp_path):
    """Segments start and end inside mixing blocks: every (sample, epoch) view is still the one
    ``views.view_tensor`` makes in its whole block, bit for bit, whatever the rank, world or worker."""
    data = _data(shards, tmp_path / "r")
    assert data.samples == sum(SIZES) and [r.samples for r in data.refs] == list(SIZES)

    def views_of(world, workers, **kw):
        got = {}
        for rank in range(world):
            ds = DistillDataset(data.refs, spec=data.spec, image_size=32, batch_size=5, seed=0, num_classes=4,
                             rank=rank, world=world, drop_last=False, **kw)
            ds.set_epoch(1)
            for b in DistillLoader(ds, workers):
                for k, x, y, lam in zip(b["key"], b["image"], b["label2"], b["lam"]):
                    assert k not in got
                    got[k] = (x, int(y), float(lam))
        return got

    whole = views_of(1, 0, shuffle_buffer=1, open_shards=1)
    assert len(whole) == sum(SIZES)
    for world, workers in ((3, 0), (2, 2)):
        part = views_of(world, workers, shuffle_buffer=7)
        assert len(part) >= sum(SIZES) - (world - 1)
        assert all(torch.equal(part[k][0], whole[k][0]) and part[k][1:] == whole[k][1:] for k in part)
    mb, mixed = POLICY["mix_block"], 0
    for ref in data.refs:                      # the reference: view_tensor at each position of each whole block
        items = [s for s in iter_shard(ref.path)]
        for s0 in range(0, len(items), mb):
            block = items[s0:s0 + mb]
            seeds = [augment.derive_seed(0, 1, s.key) for s in block]
            srcs, keys = {s.key: augment.SourceImage(s.data) for s in block}, [s.key for s in block]
            for i, s in enumerate(block):
                v = views.view_tensor(data.spec, srcs, keys, seeds, i, 32, augment.IMAGENET_MEAN, augment.IMAGENET_STD)
                assert torch.equal(whole[s.key][0], v), s.key
            mixed += sum(p is not None for p in views.block_plan(data.spec, seeds))
    assert mixed > 40


# ----------------------------------------------------------------------------- 2 gloo ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(code: str, tmp_path: Path, env: dict | None = None, timeout: float = 120) -> tuple[list, float]:
    """Run ``code`` as rank 0 and rank 1 of a 2-process gloo job; [(returncode, stdout, stderr)], seconds.
    Each rank leads its own process group, killed whole at the end: a rank's loader workers cannot
    outlive it holding the output pipes (which would make reading them wait forever)."""
    script = tmp_path / "rank.py"
    script.write_text(code)
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
                OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                              start_new_session=True)
             for r in range(2)]
    out, late = [], None
    try:
        for p in procs:
            try:
                o, e = p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                late = f"rank {procs.index(p)} still running after {timeout:.0f} s"
                break
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            kill_group(p)
        if late:
            tails = [(p.communicate(timeout=10)[1] or "")[-2000:] for p in procs[len(out):]]
            pytest.fail(f"{late}; stderr tails: {tails}")
    return out, time.time() - t0


def test_two_ranks_same_steps_every_sample_once(shards, tmp_path):
    """Both ranks make the same steps with the real per-step agreement (loop._synced), 2 loader workers
    each; per epoch they read disjoint samples, all but at most W - 1 (batch 6: 60 = 10 x 6 per rank)
    or, batch 8, all but the floor's and each rank's last short batch."""
    code = f"""
import json, sys, torch
torch.set_num_threads(1)
from distill.config import TrainConfig
from distill.train import prepare_data
from distill.train.data import DistillDataset, DistillLoader
from distill.train.loop import _setup_dist, _synced
cfg = TrainConfig(shards={str(shards)!r}, out="-", hard_labels=True, image_size=32, device="cpu")
d = _setup_dist(cfg)
data = prepare_data(cfg, {POLICY!r}, world=d.world, rank=d.rank)
out = {{}}
for batch in (6, 8):
    ds = DistillDataset(data.refs, spec=data.spec, image_size=32, batch_size=batch, seed=0, shuffle_buffer=16,
                     num_classes=4, rank=d.rank, world=d.world)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        out[f"{{batch}}/{{epoch}}"] = [b["key"] for b in _synced(DistillLoader(ds, 2), d)]
print("KEYS", json.dumps(out), flush=True)
torch.distributed.destroy_process_group()   # else gloo's threads may abort the exit (pytorch#190489)
"""
    res, took = _two_ranks(code, tmp_path)
    assert all(rc == 0 for rc, _, _ in res), res[0][2][-3000:] + res[1][2][-3000:]
    got = [json.loads(next(x for x in o.splitlines() if x.startswith("KEYS "))[5:]) for _, o, _ in res]
    everything = {s.key for p in sorted(shards.glob("*.tar")) for s in iter_shard(p)}
    for run in ("6/0", "6/1", "8/0", "8/1"):
        a, b = got[0][run], got[1][run]
        batch = int(run[0])
        assert len(a) == len(b) == 121 // 2 // batch                 # same steps on both ranks
        assert all(len(x) == batch for x in a + b)
        keys = [k for x in a + b for k in x]
        assert len(keys) == len(set(keys)) and set(keys) <= everything
        assert len(everything) - len(keys) <= (1 if batch == 6 else 1 + 2 * (batch - 1))
    assert got[0]["6/0"] != got[0]["6/1"]                           # another order every epoch
    assert took < 90


TRAIN = """
import sys, torch
torch.set_num_threads(1)
from distill.cli import main
sys.exit(main(["train-student", "--shards", {shards!r}, "--out", {out!r}, "--hard-labels", "--model", "tinyvit-tiny",
               "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--loader-workers", "1", "--device", "cpu",
               "--threads", "1", "--quiet"]))
"""


def test_an_error_on_one_rank_ends_both_within_seconds(shards, tmp_path):
    """Rank 1's stream (in its loader worker) raises at its batch 2: rank 1 exits with its own one-line
    error, rank 0 with 'rank 1 failed: ...', both at once instead of at the gloo timeout."""
    res, took = _two_ranks(TRAIN.format(shards=str(shards), out=str(tmp_path / "run")), tmp_path,
                           env={"DISTILL_FAULT_TRAIN_RANK": "1"}, timeout=90)
    (rc0, _, err0), (rc1, _, err1) = res
    assert rc0 == rc1 == 2 and took < 60, (took, err0[-2000:], err1[-2000:])
    line0 = [x for x in err0.splitlines() if x.startswith("distill: error:")]
    line1 = [x for x in err1.splitlines() if x.startswith("distill: error:")]
    assert len(line0) == 1 and "rank 1 failed" in line0[0] and "injected fault" in line0[0], err0[-2000:]
    assert len(line1) == 1 and "injected fault" in line1[0] and "Traceback" not in err1, err1[-2000:]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_rank0_lock_failure_ends_every_rank(shards, tmp_path):
    """Another run holds RUN_DIR's lock: rank 0 cannot take it, and rank 1 does not wait for it."""
    from distill.files import DirLock
    with DirLock(tmp_path / "run", "train-student").acquire():
        res, took = _two_ranks(TRAIN.format(shards=str(shards), out=str(tmp_path / "run")), tmp_path, timeout=90)
    (rc0, _, err0), (rc1, _, err1) = res
    assert rc0 == rc1 == 2 and took < 60, (took, err0[-2000:], err1[-2000:])
    assert "in use" in err0 and "rank 0 failed" in err1 and "in use" in err1, (err0[-2000:], err1[-2000:])


def test_a_non_finite_loss_ends_every_rank(shards, tmp_path):
    """From an --init checkpoint holding NaN the first loss is not finite: both ranks stop there, each
    with one line naming the epoch and step (its own, or 'rank R failed: ...'), and no checkpoint is written."""
    from distill.models import create_model
    init = nan_checkpoint(create_model("tinyvit-tiny", 10, img_size=32), tmp_path / "nan.pth")
    code = TRAIN.format(shards=str(shards), out=str(tmp_path / "run")).replace(
        '"--quiet"]', f'"--quiet", "--init", {str(init)!r}]')
    res, took = _two_ranks(code, tmp_path, timeout=90)
    for rc, _, err in res:
        lines = [x for x in err.splitlines() if x.startswith("distill: error:")]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err[-2000:])
        assert "not finite) at epoch 1, step " in lines[0] and "--lr" in lines[0], lines[0]
    assert took < 60 and not (tmp_path / "run" / "last.pt").exists()


# ----------------------------------------------------------------------------- the schedule ends where it says

SCHEDULE = dict(hard_labels=True, model="tinyvit-tiny", image_size=32, epochs=2, lr=1e-3, min_lr=1e-5,
                warmup_epochs=0.5, device="cpu", quiet=True, threads=1)
# (batch size, loader workers, accumulation steps): full batches split unevenly over workers, a rank with
# less than a batch (then one short batch per worker: 60 samples a rank, batch 64), and optimiser steps of
# 3 batches (15 batches an epoch on one rank: 5 steps; 7 on each of two ranks: steps of 3, 3 and 1)
SCHEDULE_CASES = [(8, 0, 1), (8, 1, 1), (8, 2, 1), (8, 3, 1), (64, 3, 1), (8, 2, 3)]


def _schedule_ok(summary: dict, world: int, batch: int, workers: int, accum: int = 1) -> None:
    sch = summary["schedule"]
    per_rank = sum(SIZES) // world
    batches = per_rank // batch if per_rank >= batch else min(max(1, workers), per_rank)
    per_epoch = -(-batches // accum)
    assert sch["steps"] == sch["steps_planned"] == 2 * per_epoch == 2 * sch["steps_per_epoch"], (world, batch, workers, sch)
    assert sch["last_lr"] == pytest.approx(sch["min_lr"], rel=1e-9, abs=1e-12), (world, batch, workers, sch)
    assert sch["global_batch"] == batch * world * accum, sch


def test_schedule_steps_and_last_lr_one_rank(shards, tmp_path):
    """For 0-3 loader workers the steps taken are the steps planned and the last step's lr is min lr."""
    from distill.train import train_student
    for batch, workers, accum in SCHEDULE_CASES:
        out = tmp_path / f"b{batch}w{workers}a{accum}"
        train_student(TrainConfig(shards=str(shards), out=str(out), batch_size=batch, loader_workers=workers,
                                  accumulation_steps=accum, **SCHEDULE), POLICY)
        _schedule_ok(json.loads((out / "summary.json").read_text()), 1, batch, workers, accum)


def test_schedule_steps_and_last_lr_two_ranks(shards, tmp_path):
    """The same on 2 gloo ranks (one process pair runs every case); only rank 0 prints."""
    code = f"""
import json, torch
torch.set_num_threads(1)
import torch.distributed as dist
dist.init_process_group("gloo")
from distill.config import TrainConfig
from distill.train import train_student
for batch, workers, accum in {SCHEDULE_CASES!r}:
    out = {str(tmp_path)!r} + f"/b{{batch}}w{{workers}}a{{accum}}"
    res = train_student(TrainConfig(shards={str(shards)!r}, out=out, batch_size=batch, loader_workers=workers,
                                    accumulation_steps=accum, **{SCHEDULE!r}), {POLICY!r})
from distill.cli import main     # in the same process group (a re-init on the same port may race)
main(["train-student", "--shards", {str(shards)!r}, "--out", {str(tmp_path / "cli")!r}, "--hard-labels",
      "--model", "tinyvit-tiny", "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--loader-workers", "1",
      "--device", "cpu", "--threads", "1", "--warmup-epochs", "0.5", "--lr", "1e-3"])
dist.destroy_process_group()
"""
    res, took = _two_ranks(code, tmp_path, timeout=300)
    assert all(rc == 0 for rc, _, _ in res), res[0][2][-3000:] + res[1][2][-3000:]
    for batch, workers, accum in SCHEDULE_CASES:
        _schedule_ok(json.loads((tmp_path / f"b{batch}w{workers}a{accum}" / "summary.json").read_text()),
                     2, batch, workers, accum)
    # one voice: the CLI run (progress, epoch lines, summary) speaks on rank 0 only
    (_, out0, err0), (_, out1, err1) = res
    assert "train-student: " in out0 and "val: " not in out0 and "epoch 1/2" in err0, (out0, err0[-2000:])
    assert out1 == "" and "distill:" not in err1 and "epoch 1/2" not in err1, (out1, err1[-2000:])


def test_resume_refuses_another_split_unless_allowed(shards, tmp_path):
    from distill.files import UserError
    from distill.train import train_student
    from distill.train.checkpoint import check_resume
    base = dict(shards=str(shards), out=str(tmp_path / "run"), batch_size=8, **SCHEDULE)
    train_student(TrainConfig(loader_workers=1, **base), POLICY, stop_after=1)
    with pytest.raises(UserError, match=r"1 process\(es\) x 1 loader worker\(s\), now 1 process\(es\) x 2 .*--allow-resplit"):
        train_student(TrainConfig(loader_workers=2, resume=True, **base), POLICY)
    res = train_student(TrainConfig(loader_workers=2, resume=True, allow_resplit=True, **base), POLICY)
    summ = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert res.complete and any("--allow-resplit" in n and "recomputed" in n for n in summ["notes"])
    _schedule_ok(summ, 1, 8, 2)
    ckpt = {"config": {"loader-workers": 0}, "data": {"world": 1}, "epoch": 1}     # another world size
    with pytest.raises(UserError, match="--allow-resplit"):
        check_resume(ckpt, {"loader-workers": 0}, {"world": 2}, Path("last.pt"))
    assert "with 2 process(es) x 1 loader worker(s) instead of 1" in check_resume(ckpt, {"loader-workers": 0}, {"world": 2}, Path("last.pt"), True)


# ----------------------------------------------------------------------------- honest validation

def test_validation_reports_images_scored_and_skipped(shards, tmp_path):
    """A val shard with a corrupt image and an out-of-range label: both are counted as skipped, with
    their keys and reasons, in summary.json, metrics.jsonl and the printed summary."""
    from conftest import write_tar
    from distill.train import train_student
    good = [image_bytes("JPEG", (20, 16), seed=500 + i) for i in range(4)]
    corrupt = good[1][: len(good[1]) // 3]                               # a JPEG cut short
    val = write_tar(tmp_path / "val" / "val-000000.tar", [
        ("v0.jpg", good[0]), ("v0.cls", b"1"), ("v1.jpg", corrupt), ("v1.cls", b"2"),
        ("v2.jpg", good[2]), ("v2.cls", b"99"), ("v3.jpg", good[3]), ("v3.cls", b"0")])
    res = train_student(TrainConfig(shards=str(shards), val_shards=str(val), out=str(tmp_path / "run"), batch_size=8,
                                    **dict(SCHEDULE, epochs=1)), POLICY)
    summ = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summ["val"]["scored"] == 2 and summ["val"]["skipped"] == 2, summ["val"]
    why = {e["key"]: e["reason"] for e in summ["val"]["skipped_examples"]}
    assert set(why) == {"val-000000.tar/v1", "val-000000.tar/v2"} and "out of range" in why["val-000000.tar/v2"]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (row["val_images"], row["val_skipped"]) == (2, 2)
    assert "val: 2 images scored, 2 skipped (first: val-000000.tar/v1: " in res.summary()

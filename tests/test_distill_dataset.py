"""The public data path (``distill.DistillDataset``, ``DistillLoader``, ``finish``, ``dense_targets``,
``SoftTargetLoss``): its views are the teacher's, and an epoch stopped after any batch resumes with
exactly the samples not yet given, also with another number of loader workers or ranks."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import distill
from conftest import DEMO_TEACHER, REPO, cache_config, demo_head, run_group
from distill.files import UserError

POLICY = {"size": 32, "scale": [0.35, 1.0], "hflip": 0.5, "auto_augment": "rand-n1-m5-mstd0.5-inc1",
          "re_prob": 0.5, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 0.7, "mix_block": 8}
SHARDS = ("train-000000.tar", "train-000001.tar", "train-000002.tar")
PER_SHARD = 30
BATCH = 7

pytestmark = pytest.mark.skipif(not DEMO_TEACHER.is_file(), reason="demo shards/teacher not generated")


@pytest.fixture(scope="module")
def made(tmp_path_factory, ray_local):
    """3 shards of 30 demo samples and a 2-epoch cache of them with Mixup/CutMix and random erasing."""
    from distill.cache import cache_teacher
    tmp = tmp_path_factory.mktemp("dataset")
    shards = demo_head(tmp, PER_SHARD, list(SHARDS))
    res = cache_teacher(cache_config(shards, tmp / "cache"), POLICY)
    assert not res.failed
    return shards, tmp / "cache"


def _ds(made, **kw) -> distill.DistillDataset:
    shards, cache = made
    kw.setdefault("image_size", 32)
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("shuffle_buffer", 10)
    return distill.DistillDataset(shards, cache, **kw)


def _u8(img) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


# ----------------------------------------------------------------------------- one view path

def test_dataset_views_are_the_replayed_and_the_teachers_views(made):
    """For every (key, epoch) of two epochs: ``image_u8`` is ``replay(view="student")``; ``finish`` of it
    is the ``finish="cpu"`` image bit for bit (train-student's device path and its CPU path); that is the
    reader's ``view_tensor`` and what cache-teacher's worker fed the teacher (same size and
    normalisation); the top-K are the cache's record of that epoch."""
    from test_notebook import _producer_views
    c = distill.open_cache(made[1])
    t = c.teacher
    fed = {}
    for shard in c.shard_names:
        fed.update(_producer_views(c, shard=shard))
    norm = dict(mean=tuple(t["mean"]), std=tuple(t["std"]))
    cpu, u8 = _ds(made, **norm), _ds(made, finish="none", **norm)
    seen, mixed = set(), 0
    for epoch in (0, 1):
        cpu.set_epoch(epoch)
        u8.set_epoch(epoch)
        for a, b in zip(distill.DistillLoader(cpu, num_workers=2), distill.DistillLoader(u8, num_workers=2), strict=True):
            assert a["key"] == b["key"] and "image" not in b and "image_u8" not in a
            done = distill.finish(b)
            assert torch.equal(done["image"], a["image"])
            assert torch.equal(a["epoch"], torch.full((len(a["key"]),), epoch))
            for i, key in enumerate(a["key"]):
                assert torch.equal(b["image_u8"][i], _u8(c.replay(key, epoch, view="student"))), (key, epoch)
                assert torch.equal(a["image"][i], c.view_tensor(key, epoch, "student", **norm)), (key, epoch)
                assert torch.equal(a["image"][i], fed[key, epoch]), (key, epoch)
                rec = c.record(key, epoch)
                assert a["topk_idx"][i].tolist() == rec["topk_idx"] and a["label"][i] == rec["label"]
                assert np.array_equal(a["topk_prob"][i].numpy(), np.asarray(rec["topk_prob"], np.float32))
                seen.add((key, epoch))
            mixed += int((a["lam"] < 1).sum())
    assert len(seen) == 2 * (PER_SHARD * 3 // BATCH) * BATCH and mixed > 0


def test_dense_targets_and_the_loss_are_train_students(made):
    """``dense_targets`` fills the rest of the mass uniformly (train-student's default) and
    ``SoftTargetLoss`` at the cache's temperature is soft cross-entropy against it."""
    ds = _ds(made)
    b = next(iter(distill.DistillLoader(ds)))
    dense = distill.dense_targets(b, ds.num_classes)
    assert dense.shape == (BATCH, ds.num_classes) and torch.allclose(dense.sum(1), torch.ones(BATCH), atol=1e-5)
    assert torch.equal(dense.gather(1, b["topk_idx"]), b["topk_prob"])
    logits = torch.randn(BATCH, ds.num_classes)
    loss = distill.SoftTargetLoss(ds.num_classes, temperature=ds.temperature)(logits, b)
    want = -(dense * torch.log_softmax(logits, 1)).sum(1).mean()
    assert ds.temperature == 1.0 and torch.allclose(loss, want, atol=1e-6)


def test_bad_arguments_are_one_line_errors(made, tmp_path):
    shards, cache = made
    with pytest.raises(UserError, match="finish must be"):
        distill.DistillDataset(shards, cache, image_size=32, batch_size=4, finish="gpu")
    with pytest.raises(UserError, match="different shard set"):
        distill.DistillDataset(shards / SHARDS[0], cache, image_size=32, batch_size=4)
    loader = distill.DistillLoader(_ds(made))
    with pytest.raises(UserError, match="not a DistillLoader state"):
        loader.load_state_dict({"epoch": 0})


def test_without_a_cache_batches_carry_hard_labels(made):
    ds = distill.DistillDataset(made[0], image_size=32, batch_size=BATCH, policy=POLICY)
    ds.set_epoch(3)
    batches = list(distill.DistillLoader(ds))
    assert len(batches) == PER_SHARD * 3 // BATCH
    b = batches[0]
    assert b["topk_idx"].shape == (BATCH, 0) and b["image"].shape == (BATCH, 3, 32, 32)
    assert torch.equal(b["epoch"], torch.full((BATCH,), 3))


# ----------------------------------------------------------------------------- resume anywhere

def _views(made, epoch: int) -> dict:
    """{key: uint8 view} of an uninterrupted epoch (one rank, no drop at the end)."""
    ds = _ds(made, finish="none", drop_last=False)
    ds.set_epoch(epoch)
    return {k: b["image_u8"][i] for b in distill.DistillLoader(ds) for i, k in enumerate(b["key"])}


def _ranks(made, world: int, workers: int, epoch: int, state=None, stop: int | None = None):
    """Each rank's batches (key lists) of ``epoch`` (ranks in lockstep, as DDP steps them), stopped after
    ``stop`` batches per rank; returns (batches per rank, uint8 views by key, rank 0's state)."""
    loaders = []
    for r in range(world):
        ds = _ds(made, finish="none", rank=r, world=world)
        ds.set_epoch(epoch)
        dl = distill.DistillLoader(ds, num_workers=workers)
        if state is not None:
            dl.load_state_dict(json.loads(json.dumps(state)))     # it travels as JSON
        loaders.append(dl)
    its = [iter(dl) for dl in loaders]
    got, views = [[] for _ in range(world)], {}
    while stop is None or len(got[0]) < stop:
        step = [next(it, None) for it in its]
        if all(b is None for b in step):
            break
        assert all(b is not None for b in step), "ranks made different numbers of batches"
        for r, b in enumerate(step):
            got[r].append(b["key"])
            views.update({k: b["image_u8"][i] for i, k in enumerate(b["key"])})
    state = loaders[0].state_dict()
    for it in its:
        del it
    return got, views, state


def _check_rest(made, first: tuple, then: tuple, stop: int, epoch: int = 1) -> None:
    """Stopped after ``stop`` batches with (world, workers) ``first``, resumed with ``then``: every
    sample of the uninterrupted epoch once, with its view; the same split gives the same batches."""
    whole, _, _ = _ranks(made, *first, epoch)
    want = sorted(k for rank in whole for b in rank for k in b)
    head, views, state = _ranks(made, *first, epoch, stop=stop)
    assert json.loads(json.dumps(state)) == state and len(json.dumps(state)) < 400
    tail, more, _ = _ranks(made, *then, epoch, state=state)
    views.update(more)
    keys = sorted(k for part in (head, tail) for rank in part for b in rank for k in b)
    assert keys == want, (first, then, stop)
    ref = _views(made, epoch)
    assert all(torch.equal(views[k], ref[k]) for k in keys)
    if first == then:
        assert [h + t for h, t in zip(head, tail)] == whole


@pytest.mark.parametrize("first, then, stops", [
    ((1, 1), (1, 1), (0, 1, 5, 12)),          # same split: the uninterrupted batches
    ((2, 2), (2, 2), (1, 3)),                 # 6 batches per rank, 3 per worker: at the worker boundary
    ((1, 2), (1, 1), (1, 5, 6)),              # 12 batches, 6 per worker: inside, at the boundary
    ((2, 1), (1, 2), (2, 3, 6)),              # 2 ranks -> 1 (block of 8, batch 7: stops inside blocks)
    ((1, 1), (2, 1), (4, 11)),                # 1 rank -> 2
])
def test_resume_from_any_batch_with_any_split(made, first, then, stops):
    for stop in stops:
        _check_rest(made, first, then, stop)


def test_resume_twice_in_one_epoch(made):
    """Stopped, resumed elsewhere (2 ranks -> 1 rank of 2 workers), stopped again, resumed on 2 ranks:
    still every sample once."""
    whole, _, _ = _ranks(made, 2, 1, 0)
    want = sorted(k for rank in whole for b in rank for k in b)
    a, _, s1 = _ranks(made, 2, 1, 0, stop=2)
    b, _, s2 = _ranks(made, 1, 2, 0, state=s1, stop=3)
    c, _, s3 = _ranks(made, 2, 2, 0, state=s2)
    assert len(s2["levels"]) == 2 and len(s3["levels"]) == 3
    keys = sorted(k for part in (a, b, c) for rank in part for x in rank for k in x)
    assert keys == want


def test_resume_point_of_another_epoch_is_ignored_and_seed_checked(made):
    _, _, state = _ranks(made, 1, 1, 0, stop=2)
    ds = _ds(made)
    dl = distill.DistillLoader(ds)
    dl.load_state_dict(state)
    ds.set_epoch(1)                    # the point is of epoch 0: epoch 1 is whole
    assert sum(len(b["key"]) for b in dl) == PER_SHARD * 3 // BATCH * BATCH
    other = distill.DistillLoader(_ds(made, seed=5))
    other.load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        next(iter(other))


def test_resume_point_of_other_data_is_refused(made):
    """A resume point names the epoch's sample count: loaded into a dataset with another (here one key
    excluded) it is refused in one line, not resumed into the wrong samples."""
    _, _, state = _ranks(made, 1, 1, 0, stop=2)
    key = distill.open_cache(made[1]).keys()[0]
    dl = distill.DistillLoader(_ds(made, exclude=[key]))
    dl.load_state_dict(state)
    with pytest.raises(UserError, match="not the same data"):
        next(iter(dl))


DDP = """
import json, sys, torch
torch.set_num_threads(1)
import distill
from distill.train.loop import _setup_dist
from distill.config import TrainConfig
d = _setup_dist(TrainConfig(shards="-", out="-", hard_labels=True, device="cpu"))
shards, cache, stop, state = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ds = distill.DistillDataset(shards, cache, image_size=32, batch_size={batch}, shuffle_buffer=10)  # rank, world: DDP's
ds.set_epoch(1)
dl = distill.DistillLoader(ds, num_workers=1)
if state != "-":
    dl.load_state_dict(json.load(open(state)))
keys = []
for b in dl:
    keys.append(b["key"])
    if len(keys) == stop:
        break
print("OUT", json.dumps({{"rank": ds.rank, "world": ds.world, "keys": keys, "state": dl.state_dict()}}), flush=True)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def test_resume_across_gloo_world_sizes(made, tmp_path):
    """Two real gloo ranks stop after 2 batches, one process resumes the epoch from rank 0's state; and
    one process stops after 5, two gloo ranks resume: each time the epoch's samples, each once."""
    from test_ddp import _two_ranks
    import subprocess
    shards, cache = map(str, made)
    code = DDP.format(batch=BATCH)
    script = tmp_path / "ddp.py"
    script.write_text(code)

    def one(stop: int, state: str) -> dict:
        from conftest import REPO
        import os
        r = subprocess.run([sys.executable, str(script), shards, cache, str(stop), state], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(next(x for x in r.stdout.splitlines() if x.startswith("OUT "))[4:])

    def two(stop: int, state: str) -> list[dict]:
        res, _ = _two_ranks(f"import sys; sys.argv = ['x', {shards!r}, {cache!r}, '{stop}', {state!r}]\n" + code,
                            tmp_path, timeout=120)
        assert all(rc == 0 for rc, _, _ in res), res[0][2][-3000:] + res[1][2][-3000:]
        return [json.loads(next(x for x in o.splitlines() if x.startswith("OUT "))[4:]) for _, o, _ in res]

    whole2 = {k for o in two(0, "-") for b in o["keys"] for k in b}
    whole1 = {k for b in one(0, "-")["keys"] for k in b}
    head = two(2, "-")
    assert [o["rank"] for o in head] == [0, 1] and all(o["world"] == 2 for o in head)
    (tmp_path / "s2.json").write_text(json.dumps(head[0]["state"]))
    tail = one(0, str(tmp_path / "s2.json"))
    keys = [k for o in head for b in o["keys"] for k in b] + [k for b in tail["keys"] for k in b]
    assert len(keys) == len(set(keys)) and set(keys) == whole2
    head = one(5, "-")
    (tmp_path / "s1.json").write_text(json.dumps(head["state"]))
    tail = two(0, str(tmp_path / "s1.json"))
    assert len(tail[0]["keys"]) == len(tail[1]["keys"])
    keys = [k for b in head["keys"] for k in b] + [k for o in tail for b in o["keys"] for k in b]
    assert len(keys) == len(set(keys)) and set(keys) == whole1


def test_own_loop_example_trains_and_resumes(made, tmp_path):
    """examples/own_loop.py (the README's "Your own training loop"): stopped after 3 steps, run again, it
    goes on from its checkpoint and makes the two epochs' steps in all, no more."""
    import os
    shards, cache = made
    argv = [sys.executable, str(REPO / "examples" / "own_loop.py"), "--shards", str(shards), "--cache", str(cache),
            "--out", str(tmp_path / "ck.pt"), "--batch-size", "8"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = run_group(argv + ["--stop-after", "3"], env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 1 and "stopped after step 3" in r.stderr, r.stderr[-2000:]
    r = run_group(argv, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    per_epoch = PER_SHARD * 3 // 8
    assert "resumed at epoch 1, step 3" in r.stdout and f"done: {2 * per_epoch} steps" in r.stdout, r.stdout

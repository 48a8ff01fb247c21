"""How mixed are training batches (the ImageNet-21K goals, BENCHMARKS.md section 9): classes per batch ÷ a perfectly shuffled batch >= 0.9
and same-class Mixup/CutMix pairs ÷ chance <= 2, measured on the real ``DistillDataset``.

One synthetic dataset: 200 classes x 8 tiny JPEGs (16 x 16) in a class-ordered folder tree, written
by ``make_shards`` into 16 shards of 100 samples, shuffled (the default) and class-ordered
(``shuffle=False``). Hard-label stream, Mixup/CutMix on every pair, batch 64, 2 real loader workers.
make-shards' own reproducibility and shuffling are tested in test_shards.py. The measured ratios are
printed (``pytest -s tests/test_mixing.py``).
"""
from __future__ import annotations

import sys

import pytest

from conftest import REPO, image_bytes
from distill.config import TrainConfig
from distill.data.shards import make_shards
from distill.train import prepare_data
from distill.train.data import OPEN_SHARDS, DistillDataset, DistillLoader

sys.path.insert(0, str(REPO / "tools"))
from batch_mix import classes_per_batch_ratio, expected_distinct_classes, same_class_pair_ratio  # noqa: E402

CLASSES, PER_CLASS, BATCH = 200, 8, 64
POLICY = {"size": 16, "scale": [0.35, 1.0], "hflip": 0.5, "auto_augment": None, "re_prob": 0.0,
          "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 1.0, "mix_block": 16}
COUNTS = [PER_CLASS] * CLASSES


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixing")
    for c in range(CLASSES):
        d = root / "src" / f"c{c:03d}"
        d.mkdir(parents=True)
        for i in range(PER_CLASS):
            (d / f"c{c:03d}_{i}.jpg").write_bytes(image_bytes("JPEG", (16, 16), seed=c * PER_CLASS + i))
    make_shards(root / "src", root / "shuffled", shard_size=100)
    make_shards(root / "src", root / "ordered", shard_size=100, shuffle=False)
    return root


def _epochs(root, name: str, epochs=(0,), *, buffer: int = 256, open_shards: int = OPEN_SHARDS, workers: int = 2):
    """Every batch of these epochs (2 loader workers) of the hard-label stream over ``root/name``."""
    cfg = TrainConfig(shards=str(root / name), out=str(root / "run"), hard_labels=True, image_size=32)
    data = prepare_data(cfg, POLICY)
    assert data.samples == CLASSES * PER_CLASS
    ds = DistillDataset(data.refs, spec=data.spec, image_size=16, batch_size=BATCH, seed=0, shuffle_buffer=buffer,
                     num_classes=CLASSES, open_shards=open_shards)
    out = []
    for e in epochs:
        ds.set_epoch(e)
        out += list(DistillLoader(ds, workers))
    return out


def _ratios(batches) -> tuple[float, float]:
    labels = [b["label"].tolist() for b in batches]
    pairs = [(a, b) for x in batches for a, b, lam in zip(x["label"].tolist(), x["label2"].tolist(), x["lam"].tolist())
             if lam < 1]
    return classes_per_batch_ratio(labels, COUNTS), same_class_pair_ratio(pairs, COUNTS)


def test_expected_distinct_classes_is_exact():
    from math import comb
    counts = [1, 2, 3, 5, 8]
    for b in (1, 4, 10, 19):
        exact = sum(1 - comb(19 - n, b) / comb(19, b) for n in counts)
        assert abs(expected_distinct_classes(counts, b) - exact) < 1e-9
    assert abs(expected_distinct_classes([8] * 200, 1600) - 200) < 1e-9
    assert classes_per_batch_ratio([[0, 0], [1, 2]], [2, 1, 1]) == pytest.approx(3 / (2 * expected_distinct_classes([2, 1, 1], 2)))
    assert same_class_pair_ratio([(0, 0), (0, 1)], [2, 2]) == pytest.approx(0.5 / (4 / 12))


def test_shuffled_shards_give_mixed_batches_and_pairs(shard_dirs):
    batches = _epochs(shard_dirs, "shuffled", epochs=(0, 1, 2, 3))
    assert len(batches) == 4 * (CLASSES * PER_CLASS // BATCH)
    per_batch, same_pair = _ratios(batches)
    mixed = sum(int((b["lam"] < 1).sum()) for b in batches)
    assert mixed > 0.8 * len(batches) * BATCH
    print(f"[mixing] shuffled shards: classes per batch / shuffled = {per_batch:.3f}, "
          f"same-class mix pairs / chance = {same_pair:.2f} ({mixed} mixed samples)")
    assert per_batch >= 0.9
    assert same_pair <= 2.0


def test_interleaving_helps_class_ordered_shards(shard_dirs):
    """Class-ordered shards (12-13 classes each, a class = 8 consecutive rows): a worker's batches draw
    on all its open shards (a small buffer, so that the buffer alone does not mix them), which gives
    more classes per batch than one shard at a time. The gain is small here because a class is
    shorter than a mixing block (16 rows); and mix pairs stay inside a shard's blocks, so they are
    mostly same-class whatever the loader does: the goals need make-shards' shuffle."""
    from distill.data.shards import iter_shard, resolve_shards
    shard_of = {s.key: p.name for p in resolve_shards(str(shard_dirs / "ordered"))[0] for s in iter_shard(p)}
    got = {}
    for k in (1, OPEN_SHARDS):
        batches = _epochs(shard_dirs, "ordered", buffer=16, open_shards=k)
        shards = sum(len({shard_of[key] for key in b["key"]}) for b in batches) / len(batches)
        got[k] = (shards,) + _ratios(batches)
    print("[mixing] class-ordered shards, buffer 16: " + "; ".join(
        f"{k} open: {v[0]:.1f} shards per batch, classes per batch / shuffled {v[1]:.3f}" for k, v in got.items())
        + f"; same-class mix pairs / chance {got[1][2]:.0f}")
    assert got[1][0] < 2.5 and got[OPEN_SHARDS][0] >= OPEN_SHARDS - 0.5
    assert got[OPEN_SHARDS][1] > got[1][1]
    assert got[1][2] > 10

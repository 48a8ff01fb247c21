"""distill.losses: dense targets from top-K, hard targets, losses, accuracy counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.train.losses import SoftTargetLoss, sparse_to_dense, hard_targets, soft_cross_entropy, topk_correct
from distill.cache.reader import dense_target


def _sparse(b=4, c=10, k=3, seed=0, mass=0.9):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b)])
    p = torch.rand(b, k, generator=g) + 0.1
    p = (p / p.sum(1, keepdim=True) * mass).sort(1, descending=True).values
    return idx, p


def test_uniform_fill_spreads_the_rest_evenly():
    idx, p = _sparse(mass=0.9)
    t = sparse_to_dense(idx, p, 10, "uniform")
    assert t.shape == (4, 10) and t.dtype == torch.float32
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert torch.equal(t.gather(1, idx), p)
    mask = torch.ones_like(t, dtype=torch.bool).scatter_(1, idx, False)
    assert torch.allclose(t[mask], torch.full((4 * 7,), 0.1 / 7))


def test_renorm_fill_rescales_topk():
    idx, p = _sparse(mass=0.5)
    t = sparse_to_dense(idx, p, 10, "renorm")
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert torch.allclose(t.gather(1, idx), p / 0.5)
    assert int((t > 0).sum()) == 4 * 3


@pytest.mark.parametrize("fill", ["uniform", "renorm"])
def test_dense_targets_match_the_reader(fill):
    idx, p = _sparse(b=5, c=12, k=4, seed=3, mass=0.8)
    t = sparse_to_dense(idx, p.half().float(), 12, fill)
    for i in range(5):
        ref = dense_target(idx[i].numpy(), p[i].half().numpy(), 12, fill)
        np.testing.assert_allclose(t[i].numpy(), ref, atol=1e-7)


def test_full_k_and_overfull_mass():
    idx = torch.arange(5).repeat(2, 1)
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1, 0.1]])   # fp16 rounding can exceed 1
    t = sparse_to_dense(idx, p, 5)
    assert torch.equal(t, p)
    t = sparse_to_dense(idx[:, :3], p[:, :3] * 1.2, 5)
    assert float(t.min()) >= 0.0


def test_hard_targets_smoothing_and_mixing():
    y, y2, lam = torch.tensor([1, 2]), torch.tensor([3, 2]), torch.tensor([0.75, 0.5])
    t = hard_targets(y, 4, smoothing=0.0)
    assert torch.equal(t, F.one_hot(y, 4).float())
    t = hard_targets(y, 4, y2, lam, smoothing=0.2)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert torch.allclose(t[0], torch.tensor([0.05, 0.65, 0.05, 0.25]))
    assert torch.allclose(t[1], torch.tensor([0.05, 0.05, 0.85, 0.05]))


def test_soft_cross_entropy_equals_torch_with_smoothing():
    logits = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 6])
    ours = soft_cross_entropy(logits, hard_targets(y, 7, smoothing=0.1))
    assert torch.allclose(ours, F.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6)
    assert soft_cross_entropy(logits.bfloat16(), hard_targets(y, 7)).dtype == torch.float32


def test_distill_loss_mixes_soft_and_hard():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)
    idx, p = _sparse()
    y = idx[:, 0]
    batch = {"topk_idx": idx, "topk_prob": p, "label": y, "label2": y, "lam": torch.ones(4)}
    soft, _ = SoftTargetLoss(10, alpha=0.0).parts(logits, batch)
    hard, parts_h = SoftTargetLoss(10, hard_only=True, smoothing=0.1).parts(logits, batch)
    both, parts = SoftTargetLoss(10, alpha=0.25, smoothing=0.1).parts(logits, batch)
    assert set(parts) == {"soft", "hard"} and set(parts_h) == {"hard"}
    assert torch.allclose(both, 0.75 * soft + 0.25 * hard)
    assert torch.allclose(soft, soft_cross_entropy(logits, sparse_to_dense(idx, p, 10)))
    both.backward()
    assert logits.grad is not None
    with pytest.raises(ValueError):
        SoftTargetLoss(10, fill="nope")


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.1, 0.2, 0.7]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), (1, 2, 5)) == [1, 2, 3]

"""Students beyond TinyViT, as the trainer and the notebook see them: the registry listing (params,
GFLOPs, latency), the two-head loss of distillation-head students, class relations."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.models import MODELS, PAPERS, create_model, list_models
from distill.models.catalog import count_gflops, describe_models, format_table, latency_ms
from distill.train.losses import SoftTargetLoss, sparse_to_dense
from distill.train.relations import ClassStats, agreement, correlation, relation_classes


# --- the listing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, published", [("tinyvit-5m", 1.3), ("tinyvit-21m", 4.3)])
def test_gflops_match_published_multiply_accumulates(name, published):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
    assert count_gflops(model) == pytest.approx(published, rel=0.05)


def test_every_model_has_a_paper_and_lists_once():
    assert set(PAPERS) == set(MODELS)
    rows = describe_models(["tinyvit-tiny", "tinyvit-5m"])
    assert [r["name"] for r in rows] == ["tinyvit-tiny", "tinyvit-5m"]
    assert rows[1]["params"] == 5_392_764 and rows[1]["family"] == "tinyvit"
    table = format_table(rows).splitlines()
    assert table[0].split()[:3] == ["model", "params", "GFLOPs"] and "5.39M" in table[2]


def test_latency_is_a_positive_median():
    ms = latency_ms(create_model("tinyvit-tiny", num_classes=10), img_size=32, repeats=3, warmup=1)
    assert 0 < ms < 10_000


def test_cli_models_json_and_unknown_name(capsys):
    from distill.cli import main
    assert main(["models", "tinyvit-tiny", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["name"] == "tinyvit-tiny" and row["params"] > 0 and row["gflops"] > 0
    assert main(["models", "tinyvit-7m"]) == 2
    assert "unknown model 'tinyvit-7m'" in capsys.readouterr().err


def test_notebook_student_models_table():
    import distill
    t = distill.student_models(names=["tinyvit-tiny"])
    assert t.column_names[:4] == ["name", "family", "params", "gflops"] and t.num_rows == 1


# --- two heads: labels for one, the cache for the other --------------------------------------------

def _batch(b=6, c=10, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b)])
    prob = torch.softmax(torch.randn(b, k, generator=g), 1) * 0.9
    label = torch.randint(0, c, (b,), generator=g)
    return {"topk_idx": idx, "topk_prob": prob, "label": label}


@pytest.mark.parametrize("target", ["soft", "hard"])
def test_two_head_loss_sends_labels_and_teacher_to_their_heads(target):
    b, c = 6, 10
    batch = _batch(b, c)
    crit = SoftTargetLoss(c, smoothing=0.0, dist_target=target).parts
    cls = torch.randn(b, c, requires_grad=True)
    dist = torch.randn(b, c, requires_grad=True)
    loss, parts = crit((cls, dist), batch)
    want_hard = torch.nn.functional.cross_entropy(cls, batch["label"])
    if target == "soft":
        want_dist = -(sparse_to_dense(batch["topk_idx"], batch["topk_prob"], c) * torch.log_softmax(dist, 1)).sum(1).mean()
    else:
        top1 = batch["topk_idx"][torch.arange(b), batch["topk_prob"].argmax(1)]
        want_dist = torch.nn.functional.cross_entropy(dist, top1)
    assert parts["hard"] == pytest.approx(float(want_hard), rel=1e-5)
    assert parts["dist"] == pytest.approx(float(want_dist), rel=1e-5)
    assert float(loss) == pytest.approx(0.5 * float(want_hard + want_dist), rel=1e-5)
    loss.backward()
    # the class head's gradient does not depend on the teacher, the distillation head's not on the labels
    g_cls, g_dist = cls.grad.clone(), dist.grad.clone()
    other = dict(batch, topk_idx=batch["topk_idx"].roll(1, 1), topk_prob=batch["topk_prob"].flip(1))
    cls.grad = dist.grad = None
    crit((cls, dist), dict(other, label=batch["label"]))[0].backward()
    assert torch.equal(cls.grad, g_cls) and not torch.equal(dist.grad, g_dist)


def test_one_head_logits_ignore_dist_target():
    batch, c = _batch(), 10
    logits = torch.randn(6, c)
    two, one = SoftTargetLoss(c, dist_target="hard"), SoftTargetLoss(c)
    assert torch.equal(two(logits, batch), one(logits, batch))
    with pytest.raises(ValueError, match="dist_target"):
        SoftTargetLoss(c, dist_target="logits")


# --- class relations -------------------------------------------------------------------------------

def test_correlation_from_running_sums_equals_numpy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 7, generator=g) * 2
    stats = ClassStats(np.arange(7))
    for part in logits.split(33):
        stats.add(part)
    got = correlation(**stats.arrays())
    want = np.corrcoef(torch.softmax(logits, 1).double().numpy().T)
    np.testing.assert_allclose(got, want, atol=1e-10)
    assert agreement(got, got) == pytest.approx(1.0)
    shuffled = np.corrcoef(torch.softmax(torch.randn(200, 7, generator=g), 1).double().numpy().T)
    assert agreement(got, shuffled) < 0.9


def test_relation_classes_cap_and_constant_class():
    assert list(relation_classes(5)) == [0, 1, 2, 3, 4]
    ids = relation_classes(21_841)
    assert len(ids) == 1000 and ids[0] == 0 and ids[-1] == 21_840 and np.all(np.diff(ids) > 0)
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.9, 0.1, 0.0]])
    stats = ClassStats(np.arange(3))
    stats.add_probs(probs)
    corr = correlation(**stats.arrays())
    assert corr[0, 1] == pytest.approx(-1.0) and corr[2, 2] == 0.0       # class 2 never varies
    with pytest.raises(ValueError, match="at least 2"):
        correlation(np.zeros(3), np.zeros((3, 3)), 1)

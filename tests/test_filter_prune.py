"""filter-labels pruning rules (noise-rate, by-class, both-prune): the sparse confident joint against a
dense reference written here, the pruning against cleanlab's on the same dense input (when installed),
top-K truncation, the CLI/README names, and the stage end to end on the demo shards."""
from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest

from conftest import DEMO_DIR, DEMO_TEACHER, REPO
from distill.config import FilterConfig
from distill.filter import filter_labels
from distill.filter import rules
from distill.format import read_excluded_keys

sys.path.insert(0, str(REPO / "tools"))
from flip_labels import flip_labels  # noqa: E402

PRUNE = {"noise-rate": "prune_by_noise_rate", "by-class": "prune_by_class", "both-prune": "both"}


def _noisy(n=2400, c=12, seed=0, flip=0.2):
    """Dense probabilities that favour the true class, 20% of labels moved to a neighbour class."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), true] += rng.uniform(0.5, 4, n)
    logits[np.arange(n), (true + 1) % c] += rng.uniform(0, 1.5, n)       # neighbours look alike
    p = np.exp(logits)
    p = (p / p.sum(1, keepdims=True)).astype(np.float32)
    label = np.where(rng.random(n) < flip, (true + rng.integers(1, 3, n)) % c, true)
    return label, true, p


def _chunks(label, p, k, size=500):
    order = np.argsort(-p, 1, kind="stable")[:, :k]

    def chunks():
        for s in range(0, len(label), size):
            idx = order[s:s + size]
            yield {"label": label[s:s + size], "label_prob": p[s:s + size][np.arange(len(idx)), label[s:s + size]],
                   "topk_idx": idx, "topk_prob": np.take_along_axis(p[s:s + size], idx, 1)}
    return chunks


def _dense_joint(label, p):
    """Reference: cleanlab's compute_confident_joint(calibrate=False) written densely, from its definition."""
    c = p.shape[1]
    thr = np.array([p[label == k, k].mean() if (label == k).any() else 2.0 for k in range(c)])
    conf = p >= np.maximum(thr, 2e-6) - 1e-6
    n_conf = conf.sum(1)
    guess = np.where(n_conf > 1, p.argmax(1), conf.argmax(1))
    cj = np.zeros((c, c), np.int64)
    np.add.at(cj, (label[n_conf > 0], guess[n_conf > 0]), 1)
    np.fill_diagonal(cj, np.maximum(cj.diagonal(), 1))
    return cj


def _sparse_joint(label, p, k):
    c = p.shape[1]
    counter = rules.JointCounter(c, rules.class_thresholds(_chunks(label, p, k)(), c))
    for ch in _chunks(label, p, k)():
        counter.add(ch)
    return counter.joint()


def test_sparse_confident_joint_equals_dense_reference():
    label, _, p = _noisy()
    joint = _sparse_joint(label, p, p.shape[1])
    dense = _dense_joint(label, p)
    assert np.array_equal(joint.to_dense(), dense)
    assert (dense - np.diag(dense.diagonal())).sum() > 100          # the test data has off-diagonal mass
    assert len(joint.rows) == np.count_nonzero(dense - np.diag(dense.diagonal()))   # zeros are not stored
    # calibration: rows sum to the given-label counts, total to N, integers
    cal = rules.calibrate(joint, np.bincount(label, minlength=p.shape[1])).to_dense()
    assert np.array_equal(cal.sum(1), np.bincount(label, minlength=p.shape[1]))
    ref = (dense.T / dense.sum(1) * np.bincount(label, minlength=p.shape[1])).T
    assert np.abs(cal - ref).max() < 1.0


def test_topk_joint_is_exact_when_outside_classes_cannot_be_confident():
    label, _, p = _noisy(c=20)
    thr = rules.class_thresholds(_chunks(label, p, 20)(), 20)
    exact = _sparse_joint(label, p, 20).to_dense()
    for k in (10, 5, 3):
        bound = np.concatenate([rules.outside_bound(ch["topk_prob"]) for ch in _chunks(label, p, k)()])
        safe = bound < np.nanmin(thr) - 1e-6
        truncated = _sparse_joint(label, p, k).to_dense()
        if safe.all():
            assert np.array_equal(truncated, exact)
        # never more confident pairs than the dense joint: outside classes only ever lose confidence
        assert truncated.sum() <= exact.sum() + p.shape[1]


def test_skewed_flips_show_in_the_largest_noise_pairs():
    rng = np.random.default_rng(3)
    c, n = 6, 3000
    true = rng.integers(0, c, n)
    label = true.copy()
    move = (true == 2) & (rng.random(n) < 0.4)              # 40% of class 2 labelled 4
    label[move] = 4
    logits = rng.normal(0, 0.5, (n, c))
    logits[np.arange(n), true] += 4
    p = np.exp(logits)
    p = (p / p.sum(1, keepdims=True)).astype(np.float32)
    dec = rules.decide(_chunks(label, p, 3), c, rules.Rule.parse("noise-rate", 3))
    (given, likely, count), *_ = dec.joint.largest(3)
    # confident learning undercounts here (half of class 2 sits below its mean-probability threshold)
    assert (given, likely) == (4, 2) and 0.6 * move.sum() < count <= move.sum() * 1.1
    flagged = ~dec.keep
    assert flagged[move].mean() > 0.6 and flagged[~move].mean() < 0.02
    assert abs(int(flagged[move].sum()) - count) <= 3       # the pair's estimate is what is removed


@pytest.mark.parametrize("rule", list(PRUNE))
def test_pruning_matches_cleanlab_on_dense_input(rule):
    cleanlab_filter = pytest.importorskip("cleanlab.filter")
    from cleanlab.count import compute_confident_joint
    label, _, p = _noisy()
    c = p.shape[1]
    dec = rules.decide(_chunks(label, p, c), c, rules.Rule.parse(rule, c), others_kept=c)
    ours, theirs = dec.joint.to_dense(), compute_confident_joint(label, p)
    assert np.array_equal(ours.sum(1), theirs.sum(1))
    # equal but for rounding ties (equal residuals within a row), which cleanlab breaks by float noise
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).sum() <= 4
    with warnings.catch_warnings():    # the pruning itself, from the same joint: exactly cleanlab's
        warnings.simplefilter("ignore")
        ref = cleanlab_filter.find_label_issues(label, p, filter_by=PRUNE[rule], n_jobs=1, confident_joint=ours)
        prune_ref = cleanlab_filter._keep_at_least_n_per_class(ours.T, 1).T
    assert np.array_equal(rules.prune_counts(dec.joint).to_dense(), prune_ref)
    assert ref.sum() > 200
    assert np.array_equal(~dec.keep, ref), ((~dec.keep) != ref).sum()
    assert set(np.unique(dec.code[~dec.keep])) == {rules.PRUNE_KINDS[rule]}


def test_pruning_with_few_others_stays_close_to_all_others():
    label, true, p = _noisy(n=4000, c=30, seed=1)
    c = p.shape[1]
    full = ~rules.decide(_chunks(label, p, c), c, rules.Rule("noise-rate"), others_kept=c).keep
    for k in (10, 5):
        few = ~rules.decide(_chunks(label, p, k), c, rules.Rule("noise-rate")).keep
        assert (few != full).mean() < 0.01, (k, (few != full).mean())
    assert (full & (label != true)).sum() / full.sum() > 2 * (label != true).mean()   # well above chance


def test_rule_names_parse_and_appear_in_help_and_readme():
    for name in rules.PRUNE_KINDS:
        assert rules.Rule.parse(name, 10) == rules.Rule(name) and rules.Rule(name).prunes
    with pytest.raises(ValueError, match="noise-rate"):
        rules.Rule.parse("prune", 10)
    from distill.cli import build_parser
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "filter-labels" in a.choices)
    text = sub.choices["filter-labels"].format_help()
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### `distill filter-labels`"):]
    section = section[:section.index("\n### ", 5)]
    for name in ("topk:N", "confident", "noise-rate", "by-class", "both-prune"):
        assert name in " ".join(text.split()), name
        assert name in section, name


@pytest.fixture(scope="module")
def flipped(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("flip")
    truth = flip_labels(str(DEMO_DIR / "train"), str(tmp / "train"), frac=0.2, seed=1)
    return tmp, truth


def _cfg(shards, out, **kw):
    return FilterConfig(shards=str(shards), scorer=(str(DEMO_TEACHER),), out=str(out), scorer_input_size=32,
                        topk=5, quiet=True, workers=1, threads=1, **kw)


def test_stage_prunes_flipped_demo_labels(flipped):
    tmp, truth = flipped
    flips = set(truth["flipped"])
    got = {}
    for rule in ("noise-rate", "by-class"):       # the second run reuses the scoring cache
        res = filter_labels(_cfg(tmp / "train", tmp / "filter", rule=rule))
        flagged = read_excluded_keys(tmp / "filter")
        got[rule] = flagged
        precision, recall = len(flagged & flips) / len(flagged), len(flagged & flips) / len(flips)
        assert precision >= 0.85 and recall >= 0.8, (rule, precision, recall)
        assert res.rule == rule and res.dropped == len(flagged)
        summary = json.loads((tmp / "filter" / "summary.json").read_text())
        assert summary["rule"] == rule
        pairs = summary["noise_pairs"]
        assert pairs and pairs[0]["count"] >= pairs[-1]["count"] > 0
        assert pairs[0]["given_name"] == summary["classes"][pairs[0]["given"]]
        report = (tmp / "filter" / "report.md").read_text()
        assert f"Rule `{rule}`" in report and "Estimated label errors" in report
        assert f"| {pairs[0]['given']} {pairs[0]['given_name']} | {pairs[0]['true']} {pairs[0]['true_name']} |" in report
        assert (tmp / "filter" / "suspicious.png").exists()
    assert got["noise-rate"] != got["by-class"]

"""filter-labels: the rules (pure numpy) and the stage on the demo data with injected label noise."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import DEMO_DIR, DEMO_POLICY, DEMO_TEACHER, REPO, cache_config
from distill.filter import rules as filtering
from distill.cache import cache_teacher
from distill.config import FilterConfig
from distill.filter import filter_labels
from distill.format import FILTER_SCORES_NAME, ShardIndex, read_excluded_keys, read_ipc
from distill.files import UserError
from distill.cache.reader import open_cache

sys.path.insert(0, str(REPO / "tools"))
from flip_labels import flip_labels  # noqa: E402


# ----------------------------------------------------------------------------- rules

def _chunk(label, label_prob, idx, prob):
    return {"label": np.array(label), "label_prob": np.array(label_prob, np.float32),
            "topk_idx": np.array(idx), "topk_prob": np.array(prob, np.float32)}


def test_topk_rule_rank_and_margin():
    c = _chunk([0, 1, 2], [0.7, 0.2, 0.01], [[0, 1], [0, 1], [0, 1]], [[0.7, 0.2], [0.7, 0.2], [0.6, 0.3]])
    assert filtering.flag_chunk(filtering.Rule("topk", 1), c, np.zeros(3)).tolist() == [0, filtering.TOPK, filtering.TOPK]
    assert filtering.flag_chunk(filtering.Rule("topk", 2), c, np.zeros(3)).tolist() == [0, 0, filtering.TOPK]
    assert filtering.label_rank(c["label"], c["topk_idx"]).tolist() == [1, 2, 3]
    assert np.allclose(filtering.margin(c["label"], c["label_prob"], c["topk_idx"], c["topk_prob"]), [0.5, -0.5, -0.59])


def test_confident_rule_uses_per_class_mean_thresholds():
    # class 0: label_probs 0.9, 0.5 -> t0 = 0.7; class 1: 0.8, 0.2 -> t1 = 0.5
    c = _chunk([0, 0, 1, 1], [0.9, 0.5, 0.8, 0.2],
               [[0, 1], [1, 0], [1, 0], [0, 1]], [[0.9, 0.1], [0.45, 0.5], [0.8, 0.2], [0.75, 0.2]])
    thr = filtering.class_thresholds([c], 2)
    assert np.allclose(thr, [0.7, 0.5])
    code = filtering.flag_chunk(filtering.Rule("confident"), c, thr)
    # sample 1: 0.5 < t0 but class 1 has 0.45 < t1 -> kept; sample 3: 0.2 < t1 and class 0 has 0.75 >= t0 -> flagged
    assert code.tolist() == [0, 0, 0, filtering.CONFIDENT]
    both = filtering.flag_chunk(filtering.Rule("both", 1), c, thr)
    assert both.tolist() == [0, 0, 0, filtering.BOTH]


def test_guards_keep_the_least_suspicious():
    label = np.array([0, 0, 0, 0, 1])
    lp = np.array([0.1, 0.3, 0.2, 0.9, 0.1], np.float32)
    code = np.array([1, 1, 1, 0, 1], np.uint8)
    out = filtering.apply_guards(label, lp, code, 2, max_drop_frac=0.5, min_per_class=1)
    assert out.tolist() == [1, filtering.GUARD, 1, 0, filtering.GUARD]   # class 0 may drop 2 of 4; class 1 keeps 1


def test_rule_parsing():
    assert filtering.Rule.parse("topk:3", 10) == filtering.Rule("topk", 3)
    for bad in ("topk:x", "topk:11", "majority"):
        with pytest.raises(ValueError):
            filtering.Rule.parse(bad, 10)


# ----------------------------------------------------------------------------- the stage

def _cfg(shards, out, **kw):
    base = dict(shards=str(shards), scorer=(str(DEMO_TEACHER),), out=str(out), scorer_input_size=32, topk=5,
                quiet=True, workers=1, threads=1)
    base.update(kw)
    return FilterConfig(**base)


@pytest.fixture(scope="module")
def flipped(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("flip")
    truth = flip_labels(str(DEMO_DIR / "train"), str(tmp / "train"), frac=0.2, seed=0)
    res = filter_labels(_cfg(tmp / "train", tmp / "filter", write_shards=str(tmp / "clean")))
    return tmp, truth, res


def test_finds_flipped_labels(flipped):
    tmp, truth, res = flipped
    flagged = read_excluded_keys(tmp / "filter")
    flips = set(truth["flipped"])
    precision = len(flagged & flips) / len(flagged)
    recall = len(flagged & flips) / len(flips)
    assert precision >= 0.90 and recall >= 0.85, (precision, recall)
    assert res.dropped == len(flagged)
    scores = read_ipc(tmp / "filter" / FILTER_SCORES_NAME)
    assert scores.num_rows == truth["samples"]
    for col in ("key", "label", "label_prob", "label_rank", "topk_idx", "topk_prob", "margin", "keep", "reason"):
        assert col in scores.column_names
    summary = json.loads((tmp / "filter" / "summary.json").read_text())
    assert summary["dropped"] == len(flagged) and len(summary["per_class"]) == 10
    assert (tmp / "filter" / "report.md").exists() and (tmp / "filter" / "suspicious.png").exists()


def test_write_shards_drops_exactly_the_flagged(flipped):
    tmp, truth, res = flipped
    idx = ShardIndex.read(tmp / "clean")
    assert idx.num_samples == truth["samples"] - res.dropped
    assert idx.classes == ShardIndex.read(tmp / "train").classes


def test_exclude_removes_exactly_the_flagged_keys_from_the_cache(flipped):
    tmp, truth, res = flipped
    cache = cache_teacher(cache_config(tmp / "train", tmp / "cache", epochs=1, exclude=str(tmp / "filter")), DEMO_POLICY)
    keys = set(open_cache(tmp / "cache").to_table(columns=["key"]).column("key").to_pylist())
    flagged = read_excluded_keys(tmp / "filter")
    assert keys.isdisjoint(flagged)
    assert len(keys) + len(flagged) == truth["samples"] and cache.excluded == len(flagged)


def test_clean_data_drops_under_3_percent(tmp_path, ray_local):
    res = filter_labels(_cfg(DEMO_DIR / "train", tmp_path / "f"))
    assert res.dropped / res.samples < 0.03


def test_scorer_width_mismatch_refused(tmp_path, ray_local):
    from conftest import demo_subset
    d = demo_subset(tmp_path, ["train-000000.tar"])
    idx = ShardIndex.read(d)
    ShardIndex(classes=idx.classes + ["extra"], shards=idx.shards).write(d)
    with pytest.raises(UserError, match="outputs 10 classes"):
        filter_labels(_cfg(d, tmp_path / "f"))

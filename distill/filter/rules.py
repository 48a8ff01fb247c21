"""Label-noise rules from top-K predictions: pure numpy, streaming, O(N) scalars.

A chunk is a dict of arrays for n samples: ``label`` (n,), ``label_prob`` (n,), ``topk_idx`` (n, K),
``topk_prob`` (n, K). ``decide`` makes two streaming passes over the chunks (per-class thresholds,
then flags) and keeps only label, label_prob and a reason code per sample, so 14 million samples
decide in well under 2 GB (tools/bench_filter.py).

Rules:
* ``topk:N`` — flag when the given label is not among the scorer's N most probable classes.
* ``confident`` — confident learning on top-K data: threshold t_c = mean label_prob of the samples
  labelled c; flag when label_prob < t_label and some other class j in the top-K has prob >= t_j.
* ``both`` — flag when both rules flag.
Guards: per class, at most ``max_drop_frac`` of its samples are dropped and at least
``min_per_class`` are kept; the least suspicious flagged samples (highest label_prob) are kept first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

KEEP, TOPK, CONFIDENT, BOTH, GUARD = 0, 1, 2, 3, 4
REASONS = {KEEP: "", TOPK: "label outside the scorer's top-{n}", CONFIDENT: "confident learning: another class is confident",
           BOTH: "outside top-{n} and another class is confident", GUARD: "flagged, kept by the per-class guard"}


@dataclass(frozen=True)
class Rule:
    kind: str            # topk | confident | both
    n: int = 0

    @classmethod
    def parse(cls, text: str, k: int) -> "Rule":
        text = text.strip()
        if text in ("confident",):
            return cls("confident")
        kind, _, num = text.partition(":")
        if kind in ("topk", "both"):
            try:
                n = int(num) if num else 5
            except ValueError:
                raise ValueError(f"bad rule {text!r}: N in topk:N must be an integer") from None
            if not 1 <= n <= k:
                raise ValueError(f"rule {text!r}: N must be between 1 and --topk ({k})")
            return cls(kind, n)
        raise ValueError(f"unknown rule {text!r} (topk:N, confident, both or both:N)")

    def reason(self, code: int) -> str:
        return REASONS[code].format(n=self.n)


@dataclass
class Decision:
    rule: Rule
    label: np.ndarray         # (N,) int32
    label_prob: np.ndarray    # (N,) float32
    code: np.ndarray          # (N,) uint8 reason code (KEEP/GUARD keep the sample)
    thresholds: np.ndarray    # (C,) float32, NaN for classes with no samples

    @property
    def keep(self) -> np.ndarray:
        return (self.code == KEEP) | (self.code == GUARD)


def label_rank(label: np.ndarray, topk_idx: np.ndarray) -> np.ndarray:
    """1-based rank of the label in the top-K list; K+1 when it is not there."""
    k = topk_idx.shape[1]
    hit = topk_idx == label[:, None]
    return np.where(hit.any(1), hit.argmax(1) + 1, k + 1).astype(np.int32)


def margin(label: np.ndarray, label_prob: np.ndarray, topk_idx: np.ndarray, topk_prob: np.ndarray) -> np.ndarray:
    """label_prob minus the largest probability of another class (negative: another class wins)."""
    other = np.where(topk_idx == label[:, None], -np.inf, topk_prob).max(1)
    return (label_prob - other).astype(np.float32)


def class_thresholds(chunks: Iterable[dict], num_classes: int) -> np.ndarray:
    total = np.zeros(num_classes, np.float64)
    count = np.zeros(num_classes, np.int64)
    for c in chunks:
        lab = c["label"].astype(np.int64)
        total += np.bincount(lab, weights=c["label_prob"].astype(np.float64), minlength=num_classes)
        count += np.bincount(lab, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def flag_chunk(rule: Rule, chunk: dict, thresholds: np.ndarray) -> np.ndarray:
    label, lp = chunk["label"].astype(np.int64), chunk["label_prob"]
    idx, prob = chunk["topk_idx"].astype(np.int64), chunk["topk_prob"].astype(np.float32)
    code = np.zeros(len(label), np.uint8)
    topk_flag = conf_flag = None
    if rule.kind in ("topk", "both"):
        topk_flag = ~(idx[:, :rule.n] == label[:, None]).any(1)
    if rule.kind in ("confident", "both"):
        thr = np.nan_to_num(thresholds, nan=np.inf)
        other_confident = ((prob >= thr[idx]) & (idx != label[:, None])).any(1)
        conf_flag = (lp < thr[label]) & other_confident
    if rule.kind == "topk":
        code[topk_flag] = TOPK
    elif rule.kind == "confident":
        code[conf_flag] = CONFIDENT
    else:
        code[topk_flag & conf_flag] = BOTH
    return code


def apply_guards(label: np.ndarray, label_prob: np.ndarray, code: np.ndarray, num_classes: int,
                 max_drop_frac: float, min_per_class: int) -> np.ndarray:
    """Turn the least suspicious flags of over-dropped classes into GUARD (kept). Returns new codes."""
    code = code.copy()
    flagged = np.flatnonzero((code != KEEP) & (code != GUARD))
    if not len(flagged):
        return code
    n_c = np.bincount(label, minlength=num_classes)
    f_c = np.bincount(label[flagged], minlength=num_classes)
    allowed = np.minimum(np.floor(max_drop_frac * n_c).astype(np.int64), np.maximum(n_c - min_per_class, 0))
    excess = np.maximum(f_c - allowed, 0)
    if not excess.any():
        return code
    lab = label[flagged]
    order = np.lexsort((-label_prob[flagged], lab))          # by class, most probable label first
    sorted_lab = lab[order]
    starts = np.searchsorted(sorted_lab, np.arange(num_classes))
    rank = np.arange(len(order)) - starts[sorted_lab]
    code[flagged[order[rank < excess[sorted_lab]]]] = GUARD
    return code


def decide(chunks: Callable[[], Iterable[dict]], num_classes: int, rule: Rule, max_drop_frac: float = 1.0,
           min_per_class: int = 0) -> Decision:
    """Two streaming passes over ``chunks()`` (a callable returning a fresh iterator each time)."""
    thresholds = class_thresholds(chunks(), num_classes)
    labels, probs, codes = [], [], []
    for c in chunks():
        labels.append(c["label"].astype(np.int32))
        probs.append(c["label_prob"].astype(np.float32))
        codes.append(flag_chunk(rule, c, thresholds))
    label = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    label_prob = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    code = np.concatenate(codes) if codes else np.zeros(0, np.uint8)
    code = apply_guards(label, label_prob, code, num_classes, max_drop_frac, min_per_class)
    return Decision(rule, label, label_prob, code, thresholds)

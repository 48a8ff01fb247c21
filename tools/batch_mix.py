"""How well a loader mixes its batches: distinct classes per batch and same-class Mixup/CutMix partners,
each against what perfectly shuffled data would give (tests/test_mixing.py and tools/bench_scale.py)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def expected_distinct_classes(class_counts: Sequence[int], batch_size: int) -> float:
    """Expected distinct classes in a batch of ``batch_size`` samples drawn without replacement from a
    dataset with ``class_counts[c]`` samples of class c: sum over c of 1 - C(N - n_c, B) / C(N, B)."""
    n = np.asarray([c for c in class_counts if c > 0], dtype=np.float64)
    total, b = float(n.sum()), int(batch_size)
    if not 0 < b <= total:
        raise ValueError(f"batch size {b} for {total:.0f} samples")
    values, mult = np.unique(n, return_counts=True)
    i = np.arange(b, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_absent = np.log(np.clip(total - values[:, None] - i[None, :], 0, None)).sum(1) - np.log(total - i).sum()
    return float((mult * -np.expm1(log_absent)).sum())


def classes_per_batch_ratio(labels_per_batch: Iterable[Sequence[int]], class_counts: Sequence[int]) -> float:
    """Distinct classes per batch ÷ those of perfectly shuffled batches of the same sizes (summed over
    batches; 1.0 is perfect). ``labels_per_batch``: each batch's labels; ``class_counts``: the samples of
    each class in the epoch's data (index = label)."""
    got = want = 0.0
    expect: dict[int, float] = {}
    for labels in labels_per_batch:
        labels = [int(x) for x in labels]
        if not labels:
            continue
        b = len(labels)
        if b not in expect:
            expect[b] = expected_distinct_classes(class_counts, b)
        got += len(set(labels))
        want += expect[b]
    return got / want if want else math.nan


def same_class_pair_ratio(pairs_labels: Iterable[tuple[int, int]], class_counts: Sequence[int]) -> float:
    """Share of mix pairs (label of the sample, label of its partner) whose two labels are the same,
    ÷ the chance of that for two different samples drawn at random: sum_c n_c (n_c - 1) / (N (N - 1))."""
    n = np.asarray(class_counts, dtype=np.float64)
    total = n.sum()
    chance = float((n * (n - 1)).sum() / (total * (total - 1)))
    pairs = [(int(a), int(b)) for a, b in pairs_labels]
    if not pairs or chance == 0:
        return math.nan
    return sum(a == b for a, b in pairs) / len(pairs) / chance

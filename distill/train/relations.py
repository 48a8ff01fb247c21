"""Class relations a student learned: the Pearson correlation between classes' predictions.

TinyViT (Wu et al., ECCV 2022, §3.3 and Fig. 4) shows that a distilled student inherits its teacher's
class-relation prior: over a set of images, the predicted probability of class i and of class j rise
and fall together for related classes. With P the (N, C) softmax predictions,

    corr[i, j] = Pearson(P[:, i], P[:, j])

and the agreement of two predictors is the Pearson correlation of their matrices' off-diagonal
entries (1: the same relations; 0: unrelated). Everything needed is in running sums — ``sum_p`` (C)
and ``sum_pp`` (C, C) of outer products, and ``n`` — so validation accumulates them in one pass,
ranks add them, and nothing of size N × C is kept. With more than ``RELATION_CLASSES`` classes
(ImageNet-21K's 21,841 would need a 3.8 GB matrix) an evenly spaced, fixed subset of class ids is used.

    stats = ClassStats(relation_classes(num_classes), device)
    stats.add(logits)                  # per validation batch
    corr = correlation(**stats.arrays())
"""
from __future__ import annotations

import numpy as np
import torch

RELATION_CLASSES = 1000


def relation_classes(num_classes: int, limit: int = RELATION_CLASSES) -> np.ndarray:
    """The class ids whose relations are tracked: all of them, or ``limit`` evenly spaced ones."""
    if num_classes <= limit:
        return np.arange(num_classes, dtype=np.int64)
    return np.unique(np.linspace(0, num_classes - 1, limit).round().astype(np.int64))


class ClassStats:
    """Running sums of softmax predictions over the tracked classes (float64, on ``device``)."""

    def __init__(self, class_ids: np.ndarray, device: torch.device | str = "cpu"):
        self.class_ids = np.asarray(class_ids, dtype=np.int64)
        self._ids = torch.as_tensor(self.class_ids, device=device)
        c = len(self.class_ids)
        self.sum_p = torch.zeros(c, dtype=torch.float64, device=device)
        self.sum_pp = torch.zeros(c, c, dtype=torch.float64, device=device)
        self.n = 0

    def add_probs(self, probs: torch.Tensor) -> None:
        """(B, C) probabilities over every class."""
        p = probs.double()[:, self._ids]
        self.sum_p += p.sum(0)
        self.sum_pp += p.T @ p
        self.n += p.shape[0]

    def add(self, logits: torch.Tensor) -> None:
        self.add_probs(torch.softmax(logits.float(), dim=1))

    def arrays(self) -> dict:
        return {"class_ids": self.class_ids, "sum_p": self.sum_p.cpu().numpy(),
                "sum_pp": self.sum_pp.cpu().numpy(), "n": np.int64(self.n)}


def correlation(sum_p: np.ndarray, sum_pp: np.ndarray, n: int, **_) -> np.ndarray:
    """(C, C) Pearson correlations from the running sums; a class whose prediction never varies gets 0."""
    n = float(n)
    if n < 2:
        raise ValueError(f"class correlations need at least 2 predictions, got {int(n)}")
    mean = np.asarray(sum_p, dtype=np.float64) / n
    cov = np.asarray(sum_pp, dtype=np.float64) / n - np.outer(mean, mean)
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    ok = sd > 1e-12
    out = np.zeros_like(cov)
    out[np.ix_(ok, ok)] = cov[np.ix_(ok, ok)] / np.outer(sd[ok], sd[ok])
    return np.clip(out, -1.0, 1.0)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation between the off-diagonal entries of two (C, C) correlation matrices."""
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"need two square matrices of one shape, got {a.shape} and {b.shape}")
    off = ~np.eye(a.shape[0], dtype=bool)
    x, y = a[off], b[off]
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])

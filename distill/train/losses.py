"""Targets and losses of student training: pure torch maths, no files, no teacher.

Sparse soft targets travel from the loader as ``(idx [B, K] int64, prob [B, K] float32)`` (the
cached top-K of the teacher on exactly the view the student sees, mixing included) and become dense
on the training device here:

* ``uniform`` (TinyViT's rule): the top-K probabilities at their ids, the remaining mass
  ``1 - sum(prob)`` spread evenly over the other ``C - K`` classes;
* ``renorm``: the top-K probabilities rescaled to sum to 1, zero elsewhere.

With a cache made at temperature ``T`` (it stores softmax(z_t / T)) the soft term is standard KD:
``T² · CE(p_t, softmax(z_s / T))``, the student's logits taken at the same temperature and the loss
scaled by T² so that its gradients keep their size (Hinton et al.); T = 1 is TinyViT's plain soft CE.

Hard labels (the baseline, and the ``alpha`` part of a distillation loss) are one-hot targets with
label smoothing, mixed like the images: ``lam * onehot(label) + (1 - lam) * onehot(partner label)``.

    crit = DistillLoss(num_classes=1000, alpha=0.0, fill="uniform")
    loss, parts = crit(logits, batch)   # parts: {"soft": ..., "hard": ...} detached floats
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FILLS = ("uniform", "renorm")


def dense_targets(idx: torch.Tensor, prob: torch.Tensor, num_classes: int, fill: str = "uniform") -> torch.Tensor:
    """(B, K) ids + probabilities -> (B, C) float32 distributions, built where the inputs live."""
    prob = prob.float()
    if fill == "renorm":
        out = torch.zeros(prob.shape[0], num_classes, dtype=torch.float32, device=prob.device)
        return out.scatter_(1, idx, prob / prob.sum(1, keepdim=True).clamp_min(1e-12))
    if fill != "uniform":
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    rest = num_classes - idx.shape[1]
    if rest > 0:
        base = (1.0 - prob.sum(1, keepdim=True)).clamp_min(0.0) / rest
        out = base.expand(-1, num_classes).contiguous()
    else:
        out = torch.zeros(prob.shape[0], num_classes, dtype=torch.float32, device=prob.device)
    return out.scatter_(1, idx, prob)


def hard_targets(label: torch.Tensor, num_classes: int, label2: torch.Tensor | None = None,
                 lam: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """Smoothed one-hot targets, mixed ``lam * t(label) + (1 - lam) * t(label2)`` when given (timm's mixup_target)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    t = torch.full((label.shape[0], num_classes), off, dtype=torch.float32, device=label.device)
    t.scatter_(1, label[:, None], on)
    if label2 is None or lam is None:
        return t
    t2 = torch.full_like(t, off).scatter_(1, label2[:, None], on)
    lam = lam.float()[:, None]
    return t.mul_(lam).add_(t2 * (1.0 - lam))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over the batch of sum_c -target_c * log_softmax(logits)_c, computed in float32
    (torch's fused cross-entropy with probability targets)."""
    return F.cross_entropy(logits.float(), target)


@dataclass
class DistillLoss:
    """``(1 - alpha) * soft CE(cached targets) + alpha * CE(smoothed, mixed hard labels)``.

    ``hard_only=True`` (a --hard-labels run) uses the hard term alone. ``temperature``: the cache's T; the
    soft term is ``T² · CE(target, softmax(logits / T))`` (the hard term is always at T = 1). ``batch`` holds ``idx``,
    ``prob`` (soft part), ``label``, ``label2``, ``lam`` (hard part), all on the logits' device.
    """
    num_classes: int
    alpha: float = 0.0
    fill: str = "uniform"
    smoothing: float = 0.1
    hard_only: bool = False
    temperature: float = 1.0

    def __post_init__(self):
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def __call__(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        parts: dict[str, torch.Tensor] = {}
        w_hard = 1.0 if self.hard_only else self.alpha
        total = None
        if w_hard < 1.0:
            t, target = self.temperature, dense_targets(batch["idx"], batch["prob"], self.num_classes, self.fill)
            soft = soft_cross_entropy(logits, target) if t == 1.0 else t * t * soft_cross_entropy(logits.float() / t, target)
            parts["soft"] = soft
            total = (1.0 - w_hard) * soft
        if w_hard > 0.0:
            t = hard_targets(batch["label"], self.num_classes, batch.get("label2"), batch.get("lam"), self.smoothing)
            hard = soft_cross_entropy(logits, t)
            parts["hard"] = hard
            total = hard * w_hard if total is None else total + w_hard * hard
        return total, {k: v.detach() for k, v in parts.items()}


DIST_TARGETS = ("soft", "hard")


@dataclass
class TwoHeadLoss:
    """Students with a distillation head (EfficientFormer, DeiT): their forward in distilled training
    returns ``(cls_logits, dist_logits)``. The classification head learns from the hard labels (smoothed,
    mixed like the images: ``labels``), the distillation head from the cached teacher targets: ``soft``
    (the dense top-K, T² · CE at the cache's temperature) or ``hard`` (CE with the teacher's top-1 on the
    view, DeiT's hard distillation); the loss is their mean, as DeiT's. Inference averages the two heads
    (the model does that in eval mode). A plain tensor of logits falls back to ``plain`` (a one-head model).
    """
    plain: DistillLoss
    dist_target: str = "soft"

    def __post_init__(self):
        if self.dist_target not in DIST_TARGETS:
            raise ValueError(f"dist_target must be one of {DIST_TARGETS}, got {self.dist_target!r}")

    def __call__(self, logits, batch: dict) -> tuple[torch.Tensor, dict]:
        if not isinstance(logits, tuple):
            return self.plain(logits, batch)
        cls_logits, dist_logits = logits
        p = self.plain
        hard = soft_cross_entropy(cls_logits, hard_targets(batch["label"], p.num_classes, batch.get("label2"),
                                                           batch.get("lam"), p.smoothing))
        if self.dist_target == "hard":
            top1 = batch["idx"].gather(1, batch["prob"].argmax(1, keepdim=True))[:, 0]
            dist = F.cross_entropy(dist_logits.float(), top1)
        else:
            dist, _ = dataclasses.replace(p, alpha=0.0, hard_only=False)(dist_logits, batch)
        return 0.5 * (hard + dist), {"hard": hard.detach(), "dist": dist.detach()}


def topk_correct(logits: torch.Tensor, label: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the k highest logits, for each k (k capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == label[:, None]
    return [int(hit[:, :min(k, kmax)].any(1).sum()) for k in ks]

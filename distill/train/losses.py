"""Targets and losses of student training: pure torch maths, no files, no teacher.

Sparse soft targets travel from the loader as ``topk_idx`` (B, K) int64 and ``topk_prob`` (B, K) float32 (the
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

    crit = SoftTargetLoss(num_classes=1000, alpha=0.0, fill="uniform", temperature=ds.temperature)
    loss = crit(logits, batch)                 # or crit.parts(logits, batch): (loss, {"soft": ..., "hard": ...})
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FILLS = ("uniform", "renorm")


def sparse_to_dense(idx: torch.Tensor, prob: torch.Tensor, num_classes: int, fill: str = "uniform") -> torch.Tensor:
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


def dense_targets(batch: dict, num_classes: int, fill: str = "uniform") -> torch.Tensor:
    """A ``DistillDataset`` batch's teacher targets as (B, C) float32 distributions, where its
    ``topk_idx``/``topk_prob`` live: the top-K probabilities at their ids, the rest of the mass by
    ``fill`` (``uniform``, TinyViT's rule and train-student's default, or ``renorm``)."""
    return sparse_to_dense(batch["topk_idx"], batch["topk_prob"], num_classes, fill)


DIST_TARGETS = ("soft", "hard")


class SoftTargetLoss(torch.nn.Module):
    """The loss of ``train-student``: ``(1 - alpha) * soft CE(teacher targets) + alpha * CE(smoothed,
    mixed hard labels)``, from a ``DistillDataset`` batch. ``loss(logits, batch)`` -> scalar tensor;
    ``loss.parts(logits, batch)`` -> (loss, {part: detached value}).

    * ``temperature``: the cache's T (``ds.temperature``); the soft term is ``T² · CE(target,
      softmax(logits / T))`` (the hard term is always at T = 1). ``fill``: how the top-K become a
      distribution (``dense_targets``).
    * ``hard_only=True`` (a hard-label run) uses the hard term alone.
    * A student with a distillation head (its forward in training returns ``(cls_logits, dist_logits)``,
      as EfficientFormer and DeiT): the classification head learns from the hard labels, the
      distillation head from the teacher: ``dist_target="soft"`` (the dense top-K, T² · CE) or
      ``"hard"`` (CE with the teacher's top-1 on the view, DeiT's hard distillation); the loss is their mean.
    """

    def __init__(self, num_classes: int, alpha: float = 0.0, fill: str = "uniform", smoothing: float = 0.1,
                 temperature: float = 1.0, hard_only: bool = False, dist_target: str = "soft"):
        super().__init__()
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if dist_target not in DIST_TARGETS:
            raise ValueError(f"dist_target must be one of {DIST_TARGETS}, got {dist_target!r}")
        self.num_classes, self.alpha, self.fill = int(num_classes), float(alpha), fill
        self.smoothing = 0.1 if smoothing is None else float(smoothing)
        self.temperature, self.hard_only, self.dist_target = float(temperature), bool(hard_only), dist_target

    def forward(self, logits, batch: dict) -> torch.Tensor:
        return self.parts(logits, batch)[0]

    def parts(self, logits, batch: dict) -> tuple[torch.Tensor, dict]:
        if isinstance(logits, tuple):
            return self._two_heads(*logits, batch)
        return self._one_head(logits, batch, 1.0 if self.hard_only else self.alpha)

    def _hard(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        t = hard_targets(batch["label"], self.num_classes, batch.get("label2"), batch.get("lam"), self.smoothing)
        return soft_cross_entropy(logits, t)

    def _one_head(self, logits: torch.Tensor, batch: dict, w_hard: float) -> tuple[torch.Tensor, dict]:
        parts: dict[str, torch.Tensor] = {}
        total = None
        if w_hard < 1.0:
            t, target = self.temperature, dense_targets(batch, self.num_classes, self.fill)
            soft = soft_cross_entropy(logits, target) if t == 1.0 else t * t * soft_cross_entropy(logits.float() / t, target)
            parts["soft"] = soft
            total = (1.0 - w_hard) * soft
        if w_hard > 0.0:
            hard = self._hard(logits, batch)
            parts["hard"] = hard
            total = hard * w_hard if total is None else total + w_hard * hard
        return total, {k: v.detach() for k, v in parts.items()}

    def _two_heads(self, cls_logits: torch.Tensor, dist_logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        hard = self._hard(cls_logits, batch)
        if self.dist_target == "hard":
            top1 = batch["topk_idx"].gather(1, batch["topk_prob"].argmax(1, keepdim=True))[:, 0]
            dist = F.cross_entropy(dist_logits.float(), top1)
        else:
            dist, _ = self._one_head(dist_logits, batch, 0.0)
        return 0.5 * (hard + dist), {"hard": hard.detach(), "dist": dist.detach()}


def topk_correct(logits: torch.Tensor, label: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the k highest logits, for each k (k capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == label[:, None]
    return [int(hit[:, :min(k, kmax)].any(1).sum()) for k in ks]

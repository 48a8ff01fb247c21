"""Student models: an explicit registry, optimizer parameter groups, and timm-format initialisation.

    model = create_model("tinyvit-5m", num_classes=100)
    report = load_init(model, "tiny_vit_5m_224.pth")   # a timm-format checkpoint
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.05), lr=1e-3)

Importing this package builds nothing and touches no file.
"""
from __future__ import annotations

import argparse
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.models import dat, efficientformer, tinyvit, vit
from distill.models.tinyvit import TinyVit

__all__ = [
    "MODELS", "PAPERS", "InitReport", "TinyVit", "create_model", "list_models", "load_init", "param_groups",
    "read_state_dict", "resize_attention_biases",
]

# name -> builder(num_classes, img_size=224, drop_path_rate=None)
MODELS: dict[str, Callable[..., nn.Module]] = {
    **tinyvit.BUILDERS, **efficientformer.BUILDERS, **vit.BUILDERS, **dat.BUILDERS}
PAPERS: dict[str, str] = {**tinyvit.PAPERS, **efficientformer.PAPERS, **vit.PAPERS, **dat.PAPERS}

# Classifier parameters: dropped from a checkpoint whose class count differs from the model's
# (a model lists its own in ``head_keys``; TinyViT's are these).
HEAD_KEYS = ("head.fc.weight", "head.fc.bias")
NO_DECAY_NAMES = ("attention_biases",)
# Buffers a model derives from its sizes (index tables, masks): a checkpoint's copy is not needed.
DERIVED_BUFFERS = ("attention_bias_idxs",)


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, num_classes: int, img_size: int = 224,
                 drop_path_rate: float | None = None) -> nn.Module:
    """Build a registered student. ``drop_path_rate=None`` keeps the model's own default."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return MODELS[name](num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path_rate)


def param_groups(model: nn.Module, weight_decay: float, layer_lr_decay: float = 1.0, no_decay=()) -> list[dict]:
    """AdamW groups: decay for weights; none for norms, biases and attention-bias tables; with
    ``layer_lr_decay`` < 1 one group per (decay, lr factor), the factor in the group's ``lr_scale``
    (the trainer multiplies the scheduled lr by it, as TinyViT's ``LRSchedulerWrapper``).

    A parameter goes to the no-decay group when it is 1-D (norm weights, biases), its name contains
    ``attention_biases`` or one of the model's ``no_weight_decay_keywords()``, or it is one of the model's
    ``no_weight_decay()`` names (timm's conventions: ViT's ``pos_embed`` and ``cls_token``, DAT's bias
    tables), or in ``no_decay``. Frozen parameters are left out; empty groups are dropped.
    """
    exact = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    words = NO_DECAY_NAMES + tuple(model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords")
                                   else ())
    scales: dict[str, float] = {}
    if layer_lr_decay != 1.0:
        if not hasattr(model, "layer_lr_scales"):
            raise ValueError(f"{type(model).__name__} has no layer-wise lr decay (layer_lr_scales)")
        scales = model.layer_lr_scales(layer_lr_decay)
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim <= 1 or name in exact or name in no_decay or any(s in name for s in words) else weight_decay
        scale = scales.get(name, 1.0)
        g = groups.setdefault((wd == 0.0, -scale), {"params": [], "weight_decay": wd, "lr_scale": scale})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


@dataclass
class InitReport:
    """What ``load_init`` did besides copying tensors one to one."""

    loaded: int = 0
    dropped_head: list[str] = field(default_factory=list)      # classifier keys left at fresh init
    resized: list[str] = field(default_factory=list)           # attention-bias tables / pos_embed interpolated
    ignored: list[str] = field(default_factory=list)           # derived buffers in the file, not needed

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        if self.dropped_head:
            parts.append(f"dropped head ({', '.join(self.dropped_head)})")
        if self.resized:
            parts.append(f"resized {len(self.resized)} position tables ({', '.join(self.resized[:3])}"
                         f"{', ...' if len(self.resized) > 3 else ''})")
        return "; ".join(parts)


def load_init(model: nn.Module, path: str | os.PathLike) -> InitReport:
    """Initialise ``model`` from a timm-format checkpoint (``.pth``/``.bin``, or ``.safetensors``).

    The file holds a state dict, or a dict with it under ``'model'`` or ``'state_dict'``. A leading
    ``module.`` (DDP) is stripped. The classifier (``head.fc``) is dropped when its class count differs;
    attention-bias tables are resized by bicubic interpolation over the offset grid when window sizes
    differ. Any other missing, unexpected or mis-shaped tensor raises ValueError.
    """
    state = read_state_dict(path)
    if hasattr(model, "adapt_state_dict"):           # e.g. DAT: bias tables saved at another image size
        state = model.adapt_state_dict(state)
    target = model.state_dict()
    head_keys = tuple(getattr(model, "head_keys", HEAD_KEYS))
    derived = DERIVED_BUFFERS + tuple(getattr(model, "derived_buffer_names", ()))
    report = InitReport()
    out: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []

    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in derived:
            report.ignored.append(key)
            continue
        if key not in target:
            (report.dropped_head if key in head_keys else unexpected).append(key)
            continue
        want = target[key].shape
        if value.shape == want:
            out[key] = value
        elif key in head_keys:
            report.dropped_head.append(key)
        elif key.endswith("attention_biases") and value.ndim == 2 and value.shape[0] == want[0]:
            out[key] = resize_attention_biases(value, want[1])
            report.resized.append(key)
        elif key == "pos_embed" and value.ndim == 3 and hasattr(model, "grid_size"):      # ViT at another size
            prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
            out[key] = vit.resample_pos_embed(value, model.grid_size, prefix)
            report.resized.append(key)
        else:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want)}")

    # A file without a classifier (saved headless) is fine: the model keeps its fresh one.
    report.dropped_head += [k for k in head_keys if k in target and k not in state]
    missing = [k for k in target if k not in out and k not in report.dropped_head
               and not k.endswith("num_batches_tracked") and k.rsplit(".", 1)[-1] not in derived]
    if unexpected or missing or mismatched:
        lines = [f"checkpoint {os.fspath(path)} does not fit {type(model).__name__}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"  {label}: {shown}")
        raise ValueError("\n".join(lines))

    full = dict(target)
    full.update(out)
    model.load_state_dict(full, strict=True)
    report.loaded = len(out)
    return report


def resize_attention_biases(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """(heads, w*w) -> (heads, new_w*new_w): bicubic over the w x w offset grid (as timm's filter does)."""
    heads, old_len = table.shape
    old_w, new_w = round(old_len ** 0.5), round(new_len ** 0.5)
    if old_w * old_w != old_len or new_w * new_w != new_len:
        raise ValueError(f"attention-bias tables must cover square windows, got {old_len} -> {new_len} offsets")
    grid = table.float().reshape(1, heads, old_w, old_w)
    grid = F.interpolate(grid, size=(new_w, new_w), mode="bicubic", align_corners=False, antialias=True)
    return grid.reshape(heads, new_len).to(table.dtype)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file: ``.safetensors``, or a torch file read with ``weights_only``
    (tensors only: no pickle runs code), holding the state dict itself or a dict with it under
    ``'model'``, ``'state_dict'`` or ``'module'`` (timm's, Lightning's and DDP wrappers' layouts); a
    leading ``module.`` on every key (a DDP-saved model) is stripped. Every failure is one ValueError
    naming the file. The one reader of weights files (``--init``, ``--base-checkpoint``,
    ``--teacher-checkpoint``); run checkpoints are ``train.checkpoint``'s."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ValueError(f"{name} not found")
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file  # optional dependency, only for this format

            state: Any = load_file(name)
        else:
            # timm's training checkpoints also carry an argparse.Namespace
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as e:        # not a torch file, truncated, a pickle of objects weights_only refuses
        text = str(e).strip()
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in text:
            raise ValueError(f"{name}: holds objects other than tensors; save its state dict alone and load "
                             f"that ({text[text.index('Unsupported global'):].splitlines()[0]})") from None
        raise ValueError(f"{name}: not a checkpoint torch.load reads with weights_only "
                         f"({type(e).__name__}{': ' + text.splitlines()[0] if text else ''})") from None
    if isinstance(state, Mapping):
        for key in ("model", "state_dict", "module"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{name}: not a state dict (nor a dict with one under 'model' or 'state_dict')")
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)

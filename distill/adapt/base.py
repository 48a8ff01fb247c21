"""The base model of ``adapt-teacher``: a distill ViT preset or ``module:callable``, its timm-format
checkpoint, and a fresh head for the shards' classes.

Presets are distill's ViT family (``distill.models.vit``, timm's parameter names) plus CLIP-style image
towers laid out as timm's ``vit_*_clip_224`` (``norm_pre``, no patch-embedding bias; standard GELU, as
the LAION/DataComp weights; OpenAI's QuickGELU towers are not reproduced exactly).
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.nn as nn

from ..files import UserError, sha256_file
from ..models import load_init, vit
from .methods import check_vit_like, replace_head

CLIP_CONFIGS: dict[str, dict] = {
    # vit_base_patch16_clip_224
    "vit-b16-clip": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True),
    # vit_large_patch14_clip_224
    "vit-l14-clip": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, pre_norm=True),
}
PRESETS = tuple(sorted(set(vit.CONFIGS) | set(CLIP_CONFIGS)))


def build_base(spec: str, checkpoint: str | None, num_classes: int, image_size: int,
               vit_like: bool = False) -> tuple[nn.Module, dict, list[str]]:
    """(model with a fresh ``num_classes`` head, base identity, notes). Random weights are drawn
    from a private RNG seeded with 0 (the caller's RNG untouched). ``vit_like``: refuse a base that
    is not (before anything else is said about it)."""
    notes: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec in PRESETS:
            model = _preset(spec, num_classes, image_size)
        elif ":" in spec and os.path.sep not in spec.split(":")[0]:
            from ..teachers import TeacherSpec, load_module
            model = load_module(TeacherSpec(spec)).train()
        else:
            raise UserError(f"--base {spec!r}: not a ViT preset ({', '.join(PRESETS)}) nor module.path:callable")
        if vit_like:
            check_vit_like(model, f"--base {spec}")
        replace_head(model, num_classes, f"--base {spec}")
        if not hasattr(model, "head_keys"):          # a timm-style module: its classifier is head.weight/bias
            model.head_keys = ("head.weight", "head.bias")
        if checkpoint:
            notes.append(f"--base-checkpoint {checkpoint}: {_load(model, checkpoint)}")
            replace_head(model, num_classes, f"--base {spec}")     # a fresh head even when the classes count matches
        else:
            notes.append(f"--base {spec} without --base-checkpoint: starting from random weights")
    _check_size(model, spec, image_size)
    ident = {"spec": spec, "params": sum(p.numel() for p in model.parameters() if not _is_head(model, p))}
    if checkpoint:
        ident.update(checkpoint=checkpoint, checkpoint_sha256=sha256_file(checkpoint))
    ident["weights_sha256"] = _backbone_digest(model)
    return model, ident, notes


def _preset(name: str, num_classes: int, image_size: int) -> nn.Module:
    cfg = dict(CLIP_CONFIGS.get(name) or vit.CONFIGS[name], drop_path_rate=0.0)
    try:
        return vit.VisionTransformer(num_classes=num_classes, img_size=image_size, **cfg)
    except ValueError as e:
        raise UserError(f"--base {name} at --image-size {image_size}: {e}") from None


def _load(model: nn.Module, path: str) -> str:
    """load_init (timm names; head dropped when its classes differ; pos_embed resampled); one line on failure."""
    if not os.path.isfile(path):
        raise UserError(f"--base-checkpoint {path} not found")
    try:
        return load_init(model, path).summary()
    except (ValueError, RuntimeError, OSError) as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise UserError(f"--base-checkpoint: {'; '.join(lines)[:600]}") from None


def _check_size(model: nn.Module, spec: str, image_size: int) -> None:
    built = getattr(model, "img_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(built, (tuple, list)):
        built = built[0]
    if built and int(built) != image_size:
        raise UserError(f"--base {spec} was built for {built} px but --image-size is {image_size}: "
                        f"pass --image-size {built} (or build the base at that size)")


def _is_head(model: nn.Module, p: torch.Tensor) -> bool:
    return any(p is q for q in model.head.parameters())


def _backbone_digest(model: nn.Module) -> str:
    """sha256 of the base's state dict without the (fresh) head: the base's identity."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("head."):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()

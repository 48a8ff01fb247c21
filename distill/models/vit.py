"""Vision Transformer students in plain torch: ViT/DeiT, the "Three things" variants, a ViT-22B block.

Papers: Dosovitskiy et al. 2021 (ViT); Touvron et al. 2021 (DeiT); Touvron et al. 2022, "Three things
everyone should know about Vision Transformers" (parallel blocks, hMLP stem); Dehghani et al. 2023,
"Scaling Vision Transformers to 22 Billion Parameters" (parallel attention + MLP from one norm).

Parameter names follow timm's ``vision_transformer.py`` (timm 1.0.31), so a timm-format state dict
loads strictly. Layout, top to bottom:

* ``patch_embed.proj``: a ``patch x patch`` stride-``patch`` Conv2d (``stem="patch"``), or the hMLP stem
  (``stem="hmlp"``, below).
* ``cls_token`` (1, 1, D) when ``class_token``; ``pos_embed`` (1, grid**2 [+ 1], D), learned. The
  grid is ``img_size // patch`` and fixed at construction: a model built for 224 px with patch 16
  has a 14x14 grid, for 32 px a 2x2 grid. The input must have the size the model was built for
  (``ValueError`` otherwise); ``resample_pos_embed`` adapts a checkpoint's ``pos_embed`` to another
  grid (bicubic, prefix tokens kept). With ``no_embed_class`` the embedding covers only the patches
  and the class token is concatenated after adding it (timm's DeiT-III / big_vision layout).
* ``norm_pre`` (only with ``pre_norm``), ``blocks.N``, ``norm`` (or ``fc_norm`` after average pooling,
  as timm), ``head`` (Linear; ``head_keys``).

Block types (``block=``) and where each block's attention and MLP *input* linears are (the places to
freeze / fine-tune or to put an adapter in front of):

* ``"sequential"`` (timm ``Block``): ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``. Keys
  ``blocks.N.norm1``, ``attn.qkv``, ``attn.q_norm``/``attn.k_norm`` (with ``qk_norm``), ``attn.proj``,
  ``norm2``, ``mlp.fc1``, ``mlp.fc2``, layer scale ``ls1.gamma``/``ls2.gamma`` (with ``init_values``).
  Attention input: ``blocks[i].attn.qkv``; MLP input: ``blocks[i].mlp.fc1`` (both ``nn.Linear``).
* ``"parallel"`` (timm ``ParallelThingsBlock``, "Three things" §3): ``num_parallel`` attention
  branches summed, then ``num_parallel`` MLP branches summed; each branch has its own pre-norm, layer
  scale and drop path. Keys ``blocks.N.attns.j.{norm,attn.qkv,attn.proj,ls.gamma}`` and
  ``blocks.N.ffns.j.{norm,mlp.fc1,mlp.fc2,ls.gamma}``. Inputs: ``blocks[i].attns[j].attn.qkv`` and
  ``blocks[i].ffns[j].mlp.fc1``.
* ``"parallel-scaling"`` (timm ``ParallelScalingBlock``, ViT-22B): one norm ``in_norm``, one fused
  Linear ``in_proj`` whose output is split (``in_split``) into the MLP hidden units and q, k, v; an
  optional per-head ``q_norm``/``k_norm``; ``attn_out_proj`` + ``mlp_out_proj`` summed; one layer scale
  ``ls.gamma``. Attention and MLP input are the same Linear, ``blocks[i].in_proj``: output rows
  ``[:hidden]`` are the MLP's fc1, rows ``[hidden:]`` q, k, v. When ``in_proj`` has no bias but the MLP
  has one, the fc1 bias is the separate parameter ``blocks.N.mlp_bias`` (as timm).

Biases: ``bias=False`` removes every bias from the blocks' linears (qkv, proj, fc1, fc2, in_proj,
``mlp_bias``, out projections) and from all norms (LayerNorm(bias=False)); ``qkv_bias`` / ``proj_bias``
override it for the qkv (or ``in_proj``) and the other linears separately. The patch embedding keeps its
bias unless ``pre_norm`` (as timm). ``vit-b16-22b`` is timm's ``vit_base_patch16_xp_224`` exactly:
parallel-scaling, qk-norm, RMSNorm everywhere (weights only, eps 1e-6), ``pre_norm``, ``no_embed_class``,
no bias in ``in_proj`` or the patch embedding, *but* biases in ``mlp_bias``, ``attn_out_proj`` and
``mlp_out_proj`` (timm's ``proj_bias`` stays True there); no layer scale.

hMLP stem ("Three things" §4; timm 1.0.31 has none, so names follow the paper's code, DeiT's
``models_v2.hMLP_stem``): ``patch_embed.proj`` is a Sequential of Conv2d(3, D/4, 4, stride 4) [0],
norm [1], GELU [2], Conv2d(D/4, D/4, 2, stride 2) [3], norm [4], GELU [5], Conv2d(D/4, D, 2, stride 2)
[6], norm [7] -- the last conv is followed by a norm but no GELU. Every conv is non-overlapping, so a
16x16 patch maps to its token alone and masking patches stays valid. The norm is BatchNorm2d, as in the
paper's code: it gives the paper's numbers, loads its checkpoints, and folds into the convs at
inference. BatchNorm mixes across the batch (per-channel statistics over all samples and positions in
train mode) but never routes one patch's content into another token; in eval mode patches are fully
independent. The hMLP stem's effective patch is 16, so ``img_size`` must be a multiple of 16.

Small inputs: any ``img_size`` that is a positive multiple of the patch (16; 8 for ``vit-mini``) works;
the token grid, and so ``pos_embed``, shrink with it (32 px, patch 16: 4 tokens + class token).

Training-mode behaviour: drop path per residual branch (linear in depth, as timm), hMLP BatchNorm
updates running statistics. ``no_weight_decay()`` names ``pos_embed`` and ``cls_token`` (3-D tensors that
timm exempts from weight decay).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.models.layers import builders, drop_path_layer

BLOCK_TYPES = ("sequential", "parallel", "parallel-scaling")
STEMS = ("patch", "hmlp")
NORMS = ("layernorm", "rmsnorm")
POOLS = ("token", "avg")
HMLP_PATCH = 16


def _make_norm(kind: str, dim: int, bias: bool) -> nn.Module:
    """timm's defaults: eps 1e-6. RMSNorm has a weight only."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, eps=1e-6, bias=bias)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT); key ``gamma``."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _layer_scale(dim: int, init_values: float | None) -> nn.Module:
    return LayerScale(dim, init_values) if init_values else nn.Identity()


# --- stems ----------------------------------------------------------------------------------------

class _Stem(nn.Module):
    """Maps (B, C, img_size, img_size) to (B, grid*grid, D) through ``self.proj`` (stride = patch)."""

    proj: nn.Module

    def __init__(self, img_size: int, patch_size: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)


class PatchEmbed(_Stem):
    """One non-overlapping ``patch x patch`` conv (timm's ``PatchEmbed``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__(img_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)


class HMlpStem(_Stem):
    """hMLP stem: 4x4/4 conv, BN, GELU, 2x2/2 conv, BN, GELU, 2x2/2 conv, BN (patch 16)."""

    def __init__(self, img_size: int, in_chans: int, embed_dim: int):
        super().__init__(img_size, HMLP_PATCH)
        mid = embed_dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, mid, 4, 4), nn.BatchNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, mid, 2, 2), nn.BatchNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, embed_dim, 2, 2), nn.BatchNorm2d(embed_dim),
        )


def _check_input(x: torch.Tensor, img_size: int) -> None:
    if tuple(x.shape[-2:]) != (img_size, img_size):
        raise ValueError(f"input is {x.shape[-2]}x{x.shape[-1]} px but the model was built for "
                         f"{img_size}x{img_size}; build it with that img_size or resample pos_embed")


# --- attention and MLP ----------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention; ``qk_norm`` normalises queries and keys per head."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool, qk_norm: bool,
                 norm: str, norm_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = _make_norm(norm, self.head_dim, norm_bias) if qk_norm else nn.Identity()
        self.k_norm = _make_norm(norm, self.head_dim, norm_bias) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


# --- blocks ---------------------------------------------------------------------------------------

class Block(nn.Module):
    """Standard pre-norm block (timm ``Block``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_bias: bool,
                 qk_norm: bool, norm: str, norm_bias: bool, init_values: float | None, drop_path: float,
                 drop: float = 0.0, num_parallel: int = 1):
        super().__init__()
        self.norm1 = _make_norm(norm, dim, norm_bias)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm, norm, norm_bias)
        self.ls1 = _layer_scale(dim, init_values)
        self.drop_path1 = drop_path_layer(drop_path)
        self.norm2 = _make_norm(norm, dim, norm_bias)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_bias, drop)
        self.ls2 = _layer_scale(dim, init_values)
        self.drop_path2 = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ParallelThingsBlock(nn.Module):
    """``num_parallel`` attention branches side by side, then ``num_parallel`` MLP branches (timm's
    ``ParallelThingsBlock``). 18x2 has the width of 36 sequential blocks at half the depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_bias: bool,
                 qk_norm: bool, norm: str, norm_bias: bool, init_values: float | None, drop_path: float,
                 drop: float = 0.0, num_parallel: int = 2):
        super().__init__()
        self.num_parallel = num_parallel
        self.attns = nn.ModuleList()
        self.ffns = nn.ModuleList()
        for _ in range(num_parallel):
            self.attns.append(nn.Sequential(OrderedDict([
                ("norm", _make_norm(norm, dim, norm_bias)),
                ("attn", Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm, norm, norm_bias)),
                ("ls", _layer_scale(dim, init_values)),
                ("drop_path", drop_path_layer(drop_path)),
            ])))
            self.ffns.append(nn.Sequential(OrderedDict([
                ("norm", _make_norm(norm, dim, norm_bias)),
                ("mlp", Mlp(dim, int(dim * mlp_ratio), proj_bias, drop)),
                ("ls", _layer_scale(dim, init_values)),
                ("drop_path", drop_path_layer(drop_path)),
            ])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + sum(branch(x) for branch in self.attns)
        return x + sum(branch(x) for branch in self.ffns)

    def extra_repr(self) -> str:
        return f"num_parallel={self.num_parallel}"


class ParallelScalingBlock(nn.Module):
    """ViT-22B block: attention and MLP in parallel from one norm and one fused input projection
    (timm's ``ParallelScalingBlock`` with separate output projections)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_bias: bool,
                 qk_norm: bool, norm: str, norm_bias: bool, init_values: float | None, drop_path: float,
                 drop: float = 0.0, num_parallel: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        hidden = int(dim * mlp_ratio)
        self.in_norm = _make_norm(norm, dim, norm_bias)
        self.in_proj = nn.Linear(dim, hidden + 3 * dim, bias=qkv_bias)
        self.in_split = [hidden, dim, dim, dim]
        if proj_bias and not qkv_bias:
            # The MLP's fc1 bias, kept apart because in_proj has none (as timm).
            self.mlp_bias = nn.Parameter(torch.zeros(hidden))
        else:
            self.register_parameter("mlp_bias", None)
        self.q_norm = _make_norm(norm, self.head_dim, norm_bias) if qk_norm else nn.Identity()
        self.k_norm = _make_norm(norm, self.head_dim, norm_bias) if qk_norm else nn.Identity()
        self.mlp_act = nn.GELU()
        self.mlp_drop = nn.Dropout(drop)
        self.attn_out_proj = nn.Linear(dim, dim, bias=proj_bias)
        self.mlp_out_proj = nn.Linear(hidden, dim, bias=proj_bias)
        self.ls = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        x_mlp, q, k, v = self.in_proj(self.in_norm(x)).split(self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        q = self.q_norm(q.view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        x_attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return x + self.drop_path(self.ls(y))


BLOCKS: dict[str, type[nn.Module]] = {
    "sequential": Block, "parallel": ParallelThingsBlock, "parallel-scaling": ParallelScalingBlock,
}


# --- position embeddings --------------------------------------------------------------------------

def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int | tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a (1, prefix + h*w, D) position embedding to ``new_grid`` (an int for a square grid).

    The old grid must be square. Prefix (class) tokens are kept as they are; the grid part is resized
    bicubically with antialiasing (as timm's ``resample_abs_pos_embed``). The same size is returned as is.
    """
    gh, gw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"pos_embed has {grid.shape[1]} grid tokens after {num_prefix_tokens} prefix "
                         f"token(s), not a square grid")
    if (old, old) == (gh, gw):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# --- the model ------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """ViT classifier. ``forward_features`` returns the normalised tokens (B, prefix + grid**2, D)."""

    head_keys: tuple[str, ...] = ("head.weight", "head.bias")

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        block: str = "sequential",
        num_parallel: int = 2,
        qk_norm: bool = False,
        bias: bool = True,
        qkv_bias: bool | None = None,
        proj_bias: bool | None = None,
        norm: str = "layernorm",
        init_values: float | None = None,
        class_token: bool = True,
        global_pool: str = "token",
        no_embed_class: bool = False,
        pre_norm: bool = False,
        stem: str = "patch",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        for what, value, valid in (("block", block, BLOCK_TYPES), ("stem", stem, STEMS),
                                   ("norm", norm, NORMS), ("global_pool", global_pool, POOLS)):
            if value not in valid:
                raise ValueError(f"{what} must be one of {', '.join(valid)}; got {value!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg'")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if stem == "hmlp":
            patch_size = HMLP_PATCH
            if embed_dim % 4:
                raise ValueError(f"the hMLP stem needs embed_dim divisible by 4, got {embed_dim}")
        if img_size <= 0 or img_size % patch_size:
            what = "the hMLP stem's patch" if stem == "hmlp" else "the patch size"
            raise ValueError(f"img_size must be a positive multiple of {patch_size} ({what}), got {img_size}")
        qkv_bias = bias if qkv_bias is None else qkv_bias
        proj_bias = bias if proj_bias is None else proj_bias

        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_size = patch_size
        self.block_type = block
        self.global_pool = global_pool
        self.no_embed_class = no_embed_class
        self.num_prefix_tokens = 1 if class_token else 0
        self.num_features = self.embed_dim = embed_dim

        if stem == "hmlp":
            self.patch_embed: _Stem = HMlpStem(img_size, in_chans, embed_dim)
        else:
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm)
        self.grid_size = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.norm_pre = _make_norm(norm, embed_dim, bias) if pre_norm else nn.Identity()

        # Stochastic depth grows linearly over the blocks (plain floats: works on the meta device).
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        block_cls = BLOCKS[block]
        self.blocks = nn.Sequential(*[
            block_cls(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, qk_norm, norm, bias,
                      init_values, dpr[i], num_parallel=num_parallel)
            for i in range(depth)
        ])
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else _make_norm(norm, embed_dim, bias)
        self.fc_norm = _make_norm(norm, embed_dim, bias) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = _make_fc(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's default ('') init: trunc-normal(0.02) linears and pos_embed, near-zero class token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters timm exempts from weight decay besides 1-D ones."""
        return {"pos_embed", "cls_token"}

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear with a fresh one (``num_classes <= 0``: no classifier)."""
        self.num_classes = num_classes
        ref = self.pos_embed
        self.head = _make_fc(self.embed_dim, num_classes).to(device=ref.device, dtype=ref.dtype)

    def layer_lr_scales(self, decay: float) -> dict[str, float]:
        """Parameter name -> lr factor of layer-wise decay, as TinyViT's: block i of D gets
        ``decay ** (D - 1 - i)``; the patch embedding, class token, position embedding and ``norm_pre``
        the first block's; the final norm and the head 1."""
        depth = len(self.blocks)
        scales: dict[str, float] = {}
        for name, _ in self.named_parameters():
            if name.startswith("blocks."):
                i = int(name.split(".")[1])
            elif name.startswith(("patch_embed.", "norm_pre.")) or name in ("cls_token", "pos_embed"):
                i = 0
            else:
                i = depth - 1
            scales[name] = decay ** (depth - 1 - i)
        return scales

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return x + self.pos_embed
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.no_embed_class:
            return torch.cat([cls, x + self.pos_embed], dim=1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _make_fc(dim: int, num_classes: int) -> nn.Module:
    if num_classes <= 0:
        return nn.Identity()
    fc = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(fc.weight, std=0.02)
    nn.init.zeros_(fc.bias)
    return fc


# Architecture of each registered student. timm names in comments. Drop path: DeiT's 0.1 (none for the
# tiny test model).
CONFIGS: dict[str, dict] = {
    "vit-mini": dict(patch_size=8, embed_dim=64, depth=2, num_heads=2, drop_path_rate=0.0),
    # vit_tiny_patch16_224 (DeiT-Ti)
    "vit-ti16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1),
    # vit_small_patch16_224 (DeiT-S)
    "vit-s16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
    # vit_base_patch16_224
    "vit-b16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1),
    # vit_small_patch16_18x2_224
    "vit-s16-18x2": dict(patch_size=16, embed_dim=384, depth=18, num_heads=6, block="parallel",
                         num_parallel=2, init_values=1e-5, drop_path_rate=0.1),
    # vit-s16 with the hMLP stem (not in timm)
    "vit-s16-hmlp": dict(stem="hmlp", embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
    # vit_base_patch16_xp_224
    "vit-b16-22b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, block="parallel-scaling",
                        qk_norm=True, qkv_bias=False, norm="rmsnorm", pre_norm=True, no_embed_class=True,
                        drop_path_rate=0.1),
}

PAPERS: dict[str, str] = {
    "vit-mini": "ViT (Dosovitskiy et al., ICLR 2021)",
    "vit-ti16": "DeiT (Touvron et al., ICML 2021)",
    "vit-s16": "DeiT (Touvron et al., ICML 2021)",
    "vit-b16": "ViT (Dosovitskiy et al., ICLR 2021)",
    "vit-s16-18x2": "Three things everyone should know about ViTs (Touvron et al., ECCV 2022)",
    "vit-s16-hmlp": "Three things everyone should know about ViTs (Touvron et al., ECCV 2022)",
    "vit-b16-22b": "ViT-22B (Dehghani et al., ICML 2023)",
}


BUILDERS = builders(CONFIGS, VisionTransformer)

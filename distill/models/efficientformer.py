"""EfficientFormer students in plain torch.

Paper: Li et al. 2022, "EfficientFormer: Vision Transformers at MobileNet Speed" (NeurIPS 2022).

The module tree and parameter names follow timm's ``efficientformer`` (``efficientformer_l1`` and
friends, timm 1.0.31) so a timm-format state dict loads with strict keys. Layout, top to bottom:

* ``stem``: two stride-2 3x3 conv-BN-ReLU (``conv1/norm1``, ``conv2/norm2``; stride 4 in all).
* ``stages.0..3``: ``downsample`` (stride-2 3x3 conv + BN; not in stage 0), then Meta4D blocks: a
  pooling token mixer (``avgpool3x3(x) - x``) and a 1x1-conv MLP with BN, each residual scaled by a
  per-channel layer scale (``ls1.gamma``, ``ls2.gamma``). NCHW.
* The last ``num_vit`` blocks of the last stage are Meta3D: ``Flat`` (NCHW -> tokens, no parameters,
  but it takes an index in ``blocks``, as in timm) then pre-norm attention with a learned bias per
  head and per token offset, and a Linear MLP, with layer scales. Tokens (B, N, C).
* ``norm`` (LayerNorm over tokens), global average over tokens, then two classifiers: ``head`` and
  ``head_dist`` (the distillation head).

Distillation heads (as timm): with ``distilled_training`` set (``set_distilled_training()``) and the
model in train mode, ``forward`` returns ``(cls_logits, dist_logits)``; otherwise (eval, or plain
training) it returns their mean ``(cls_logits + dist_logits) / 2``.

Image sizes: ``img_size`` must be a positive multiple of 32. timm fixes the attention resolution at
7 (224 px); here the 3D blocks are built for the final map of ``img_size // 32`` (7 at 224, 2 at 64,
1 at 32), so the bias table ``attention_biases`` is (heads, r*r) and the index buffer
``attention_bias_idxs`` (r*r, r*r) with r = img_size // 32: both change shape with img_size. The
table is indexed by offset ``|dy| * r + |dx|`` (the TinyViT layout), so a 224-px table can be resized
to another r over its r x r offset grid. The model then takes inputs whose final map is r x r
(``img_size`` square inputs); others raise ValueError. ``attention_bias_idxs`` is a saved buffer as
in timm (so keys match timm's exactly), but it is derived: loading always keeps the model's own.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.models.layers import builders, drop_path_layer


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (``gamma``); channels last, or NCHW with ``channels_first``."""

    def __init__(self, dim: int, init_value: float, channels_first: bool = False):
        super().__init__()
        self.channels_first = channels_first
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.gamma.view(1, -1, 1, 1) if self.channels_first else self.gamma)


class Stem(nn.Sequential):
    """Two stride-2 3x3 conv-BN-ReLU (stride 4)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, 3, 2, 1)
        self.norm1 = nn.BatchNorm2d(out_chs // 2)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs // 2, out_chs, 3, 2, 1)
        self.norm2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()


class Downsample(nn.Module):
    """Stride-2 3x3 conv (with bias) then BN, to the next stage's width."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Flat(nn.Module):
    """(B, C, H, W) -> (B, H*W, C) tokens in row-major order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Pooling(nn.Module):
    """PoolFormer's token mixer: 3x3 average (padding not counted) minus the input."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class ConvMlp(nn.Module):
    """1x1 conv, BN, GELU, 1x1 conv, BN (timm's ``ConvMlpWithNorm``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.norm1(self.fc1(x))))
        return self.drop(self.norm2(self.fc2(x)))


class Mlp(nn.Module):
    """Linear, GELU, Linear on tokens (timm's ``Mlp``: keys ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def bias_table_index(resolution: int) -> torch.Tensor:
    """(N, N) index into a ``resolution x resolution`` offset table, N = resolution ** 2: token (i, j)
    attending to token (k, l) reads offset ``|i - k| * resolution + |j - l|`` (timm's order)."""
    coords = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).abs()
    return offsets[0] * resolution + offsets[1]


class Attention(nn.Module):
    """Multi-head self-attention over all r x r tokens with a learned bias per (head, token offset).

    Queries and keys have ``key_dim`` channels per head, values ``attn_ratio * key_dim``; qkv is one
    Linear whose output is laid out per head as [q, k, v] (timm's layout)."""

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4.0,
                 resolution: int = 7):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.resolution = resolution
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(num_heads * self.val_dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        # Saved, as in timm, so state-dict keys match; derived from the resolution, never read from a file.
        self.register_buffer("attention_bias_idxs", bias_table_index(resolution))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The index is derived from the resolution: use our own, also when the file has none or one for
        # another resolution (built afresh, so that ``load_state_dict(assign=True)`` on a meta model works).
        state_dict[prefix + "attention_bias_idxs"] = bias_table_index(self.resolution)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        r = self.resolution
        if n != r * r:
            raise ValueError(f"EfficientFormer attention biases cover a {r}x{r} final feature map "
                             f"(img_size {32 * r}); got {n} tokens: feed inputs of the model's img_size")
        qkv = self.qkv(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}"


class Meta3D(nn.Module):
    """Pre-norm attention and MLP on tokens, each with layer scale (timm's ``MetaBlock1d``)."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float, drop_path: float, layer_scale_init: float,
                 resolution: int, key_dim: int, num_heads: int, attn_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = Attention(dim, key_dim, num_heads, attn_ratio, resolution)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.drop_path1 = drop_path_layer(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale(dim, layer_scale_init)
        self.drop_path2 = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class Meta4D(nn.Module):
    """Pooling mixer and conv MLP on NCHW maps, each with layer scale (timm's ``MetaBlock2d``)."""

    def __init__(self, dim: int, pool_size: int, mlp_ratio: float, drop: float, drop_path: float,
                 layer_scale_init: float):
        super().__init__()
        self.token_mixer = Pooling(pool_size)
        self.ls1 = LayerScale(dim, layer_scale_init, channels_first=True)
        self.drop_path1 = drop_path_layer(drop_path)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale(dim, layer_scale_init, channels_first=True)
        self.drop_path2 = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))


class EfficientFormerStage(nn.Module):
    """Optional downsample, then ``depth`` blocks: Meta4D, and for the last ``num_vit`` of them
    ``Flat`` followed by Meta3D. ``blocks`` indices count ``Flat`` as timm does."""

    def __init__(self, dim: int, dim_out: int, depth: int, downsample: bool, num_vit: int,
                 drop_path: Sequence[float], *, pool_size: int, mlp_ratio: float, drop: float,
                 layer_scale_init: float, resolution: int, key_dim: int, num_heads: int, attn_ratio: float):
        super().__init__()
        self.downsample = Downsample(dim, dim_out) if downsample else nn.Identity()
        if not downsample and dim != dim_out:
            raise ValueError(f"a stage without downsample keeps its width, got {dim} -> {dim_out}")
        num_vit = min(num_vit, depth)
        blocks: list[nn.Module] = []
        for i in range(depth):
            if i == depth - num_vit:
                blocks.append(Flat())
            if i >= depth - num_vit:
                blocks.append(Meta3D(dim_out, mlp_ratio, drop, drop_path[i], layer_scale_init,
                                     resolution, key_dim, num_heads, attn_ratio))
            else:
                blocks.append(Meta4D(dim_out, pool_size, mlp_ratio, drop, drop_path[i], layer_scale_init))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def _make_fc(dim: int, num_classes: int) -> nn.Module:
    if num_classes <= 0:
        return nn.Identity()
    fc = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(fc.weight, std=0.02)
    nn.init.zeros_(fc.bias)
    return fc


class EfficientFormer(nn.Module):
    """EfficientFormer classifier with a classification and a distillation head.

    ``forward_features`` returns normed tokens (B, N, C) of the last stage (as timm), N = (img_size/32)^2
    when ``num_vit`` > 0.
    """

    head_keys = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int = 224,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (48, 96, 224, 448),
        depths: Sequence[int] = (3, 2, 6, 4),
        num_vit: int = 1,
        mlp_ratio: float = 4.0,
        pool_size: int = 3,
        layer_scale_init: float = 1e-5,
        key_dim: int = 32,
        num_heads: int = 8,
        attn_ratio: float = 4.0,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % 32:
            raise ValueError(f"img_size must be a positive multiple of 32 (e.g. 32, 64, 224), got {img_size!r}")
        if len(embed_dims) != len(depths):
            raise ValueError("embed_dims and depths must have the same length")
        self.num_classes = num_classes
        self.img_size = img_size
        self.embed_dims = tuple(embed_dims)
        self.num_features = embed_dims[-1]
        self.distilled_training = False   # set_distilled_training(): train with (cls, dist) outputs

        self.stem = Stem(in_chans, embed_dims[0])
        # Stochastic depth grows linearly over all blocks (plain floats: works on the meta device).
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        last = len(depths) - 1
        stages = []
        prev = embed_dims[0]
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            start = sum(depths[:i])
            stages.append(EfficientFormerStage(
                prev, dim, depth, downsample=i > 0, num_vit=num_vit if i == last else 0,
                drop_path=dpr[start:start + depth], pool_size=pool_size, mlp_ratio=mlp_ratio, drop=proj_drop_rate,
                layer_scale_init=layer_scale_init, resolution=img_size // 32, key_dim=key_dim,
                num_heads=num_heads, attn_ratio=attn_ratio,
            ))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = _make_fc(self.num_features, num_classes)
        self.head_dist = _make_fc(self.num_features, num_classes)
        self.apply(_init_linear)

    def set_distilled_training(self, enable: bool = True) -> None:
        """In train mode, return (cls_logits, dist_logits) instead of their mean."""
        self.distilled_training = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace both heads with fresh ones (``num_classes <= 0``: no classifier)."""
        self.num_classes = num_classes
        ref = self.norm.weight
        self.head = _make_fc(self.num_features, num_classes).to(device=ref.device, dtype=ref.dtype)
        self.head_dist = _make_fc(self.num_features, num_classes).to(device=ref.device, dtype=ref.dtype)

    def layer_lr_scales(self, decay: float) -> dict[str, float]:
        """Parameter name -> lr factor of layer-wise decay: block i of D (Meta4D and Meta3D, ``Flat``
        not counted) gets ``decay ** (D - 1 - i)``; the stem the first block's; a stage's downsample the
        factor of its stage's first block (timm groups the downsample with its stage); the final norm
        and both heads 1."""
        depth = sum(not isinstance(b, Flat) for st in self.stages for b in st.blocks)
        scales: dict[str, float] = {}

        def put(prefix: str, module: nn.Module, i: int) -> None:
            for name, _ in module.named_parameters(prefix=prefix):
                scales[name] = decay ** (depth - 1 - min(i, depth - 1))

        put("stem", self.stem, 0)
        i = 0
        for s, st in enumerate(self.stages):
            put(f"stages.{s}.downsample", st.downsample, i)
            for j, b in enumerate(st.blocks):
                if not isinstance(b, Flat):
                    put(f"stages.{s}.blocks.{j}", b, i)
                    i += 1
        for prefix in ("norm", "head", "head_dist"):
            put(prefix, getattr(self, prefix), depth - 1)
        return scales

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x = self.head_drop(x.mean(dim=1))
        if pre_logits:
            return x
        logits, dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training:
            return logits, dist
        return (logits + dist) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# Architecture of each registered student. timm names in comments.
CONFIGS: dict[str, dict] = {
    # Tiny test model: a Meta4D block and one Meta3D block in the last stage, small attention.
    "efficientformer-mini": dict(embed_dims=(16, 32, 48, 96), depths=(1, 1, 1, 2), num_vit=1,
                                 key_dim=16, num_heads=2),
    # efficientformer_l1
    "efficientformer-l1": dict(embed_dims=(48, 96, 224, 448), depths=(3, 2, 6, 4), num_vit=1),
    # efficientformer_l3
    "efficientformer-l3": dict(embed_dims=(64, 128, 320, 512), depths=(4, 4, 12, 6), num_vit=4),
    # efficientformer_l7
    "efficientformer-l7": dict(embed_dims=(96, 192, 384, 768), depths=(6, 6, 18, 8), num_vit=8),
}
DEFAULT_DROP_PATH_RATE = 0.0   # timm's and mmpretrain's default for all three


BUILDERS = builders(CONFIGS, EfficientFormer, drop_path_rate=DEFAULT_DROP_PATH_RATE)
PAPERS: dict[str, str] = {name: "EfficientFormer (Li et al., NeurIPS 2022)" for name in BUILDERS}

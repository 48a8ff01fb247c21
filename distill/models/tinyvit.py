"""TinyViT students in plain torch.

Paper: Wu et al. 2022, "TinyViT: Fast Pretraining Distillation for Small Vision Transformers".

The module tree and parameter names follow timm's ``tiny_vit`` (``tiny_vit_5m_224`` and friends) so a
timm-format state dict loads without renaming. Layout, top to bottom:

* ``patch_embed``: two stride-2 3x3 ConvNorm layers (stride 4 in all).
* ``stages.0``: MBConv blocks (a conv stage, no attention, no downsample).
* ``stages.1..3``: ``downsample`` (PatchMerging, stride 2) then TinyViT blocks. A block is window
  attention with a learned bias per head and per window offset, a depthwise 3x3 ``local_conv``, and an MLP.
* ``head``: global average pool, LayerNorm (``head.norm``), Linear (``head.fc``).

Stages work in NCHW between each other; TinyViT blocks work in NHWC.

Window attention pads the feature map to a multiple of the window. When a stage's feature map is
smaller than its window (small inputs), the map itself is used as the window instead of padding it
(timm's TinyViT pads here; timm's Swin clamps). The bias table always covers the configured window
(``window_size ** 2`` offsets), so its shape, and the state dict, do not depend on the input size; a
smaller window reads the sub-grid of offsets it needs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.models.layers import builders, drop_path_layer


class ConvNorm(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys ``conv.*`` and ``bn.*``)."""

    def __init__(self, in_chs: int, out_chs: int, ks: int = 1, stride: int = 1, pad: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, ks, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class PatchEmbed(nn.Module):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv1 = ConvNorm(in_chs, out_chs // 2, 3, 2, 1)
        self.act = nn.GELU()
        self.conv2 = ConvNorm(out_chs // 2, out_chs, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project (zero-init BN), residual, GELU."""

    def __init__(self, dim: int, expand_ratio: float, drop_path: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvNorm(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvNorm(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvNorm(hidden, dim, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        y = self.conv3(y)
        return self.act3(x + self.drop_path(y))


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks at stride 4 (timm's ``ConvLayer``)."""

    def __init__(self, dim: int, depth: int, drop_path: Sequence[float], expand_ratio: float):
        super().__init__()
        self.blocks = nn.Sequential(*[MBConv(dim, expand_ratio, drop_path[i]) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class PatchMerging(nn.Module):
    """Halve the resolution: 1x1 conv to the new width, stride-2 depthwise 3x3, 1x1 conv."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv1 = ConvNorm(dim, out_dim)
        self.act1 = nn.GELU()
        self.conv2 = ConvNorm(out_dim, out_dim, 3, 2, 1, groups=out_dim)
        self.act2 = nn.GELU()
        self.conv3 = ConvNorm(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


class NormMlp(nn.Module):
    """Pre-norm MLP (the norm lives inside: ``mlp.norm``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(self.norm(x))))))


def bias_table_index(window: int) -> torch.Tensor:
    """(N, N) index into a ``window x window`` offset table, N = window ** 2.

    Token (i, j) attending to token (k, l) uses the bias at offset (|i - k|, |j - l|), stored at
    ``|i - k| * window + |j - l|``. This is the same order timm builds by first-seen offsets.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).abs()
    return offsets[0] * window + offsets[1]


class Attention(nn.Module):
    """Multi-head self-attention within one window, with a learned bias per (head, window offset)."""

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # Not in the state dict (as in timm): it is derived from the window size.
        self.register_buffer("attention_bias_idxs", bias_table_index(window_size), persistent=False)

    def attention_bias(self, wh: int, ww: int) -> torch.Tensor:
        """(heads, wh*ww, wh*ww) biases for a window of wh x ww tokens (at most the configured window)."""
        idxs = self.attention_bias_idxs
        if (wh, ww) != (self.window_size, self.window_size):
            rows = torch.arange(wh, device=idxs.device)[:, None] * self.window_size
            tokens = (rows + torch.arange(ww, device=idxs.device)).flatten()
            idxs = idxs[tokens][:, tokens]
        return self.attention_biases[:, idxs]

    def forward(self, x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """x: (windows, wh*ww, C) tokens in row-major order within each window."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=-1)  # per head: q, k, v
        bias = self.attention_bias(*window).to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TinyVitBlock(nn.Module):
    """Window attention, depthwise ``local_conv``, MLP. Input and output are NHWC."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float = 4.0,
                 drop: float = 0.0, drop_path: float = 0.0, local_conv_size: int = 3):
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.drop_path1 = drop_path_layer(drop_path)
        self.mlp = NormMlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path2 = drop_path_layer(drop_path)
        pad = local_conv_size // 2
        self.local_conv = ConvNorm(dim, dim, local_conv_size, 1, pad, groups=dim)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        wh, ww = min(self.window_size, h), min(self.window_size, w)
        pad_b, pad_r = -h % wh, -w % ww
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        nh, nw = hp // wh, wp // ww
        x = x.reshape(b, nh, wh, nw, ww, c).transpose(2, 3).reshape(b * nh * nw, wh * ww, c)
        x = self.attn(x, (wh, ww))
        x = x.reshape(b, nh, nw, wh, ww, c).transpose(2, 3).reshape(b, hp, wp, c)
        return x[:, :h, :w] if pad_b or pad_r else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.window_attention(x))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path2(self.mlp(x))

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}"


class TinyVitStage(nn.Module):
    """PatchMerging to ``out_dim`` at half resolution, then TinyViT blocks. NCHW in and out."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, drop: float, drop_path: Sequence[float], local_conv_size: int):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim)
        self.blocks = nn.Sequential(*[
            TinyVitBlock(out_dim, num_heads, window_size, mlp_ratio, drop, drop_path[i], local_conv_size)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        return self.blocks(x).permute(0, 3, 1, 2)


class ClassifierHead(nn.Module):
    """Global average pool, LayerNorm, dropout, Linear (timm's NormMlpClassifierHead without hidden layer)."""

    def __init__(self, dim: int, num_classes: int, drop: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(drop)
        self.fc = _make_fc(dim, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.norm(x.mean(dim=(2, 3))))
        return x if pre_logits else self.fc(x)


def _make_fc(dim: int, num_classes: int) -> nn.Module:
    if num_classes <= 0:
        return nn.Identity()
    fc = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(fc.weight, std=0.02)
    nn.init.zeros_(fc.bias)
    return fc


class TinyVit(nn.Module):
    """TinyViT classifier. ``forward_features`` returns NCHW features at stride 32."""

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int = 224,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (96, 192, 384, 576),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 18),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
    ):
        super().__init__()
        if img_size <= 0 or img_size % 32:
            raise ValueError(f"img_size must be a positive multiple of 32, got {img_size}")
        if not len(embed_dims) == len(depths) == len(num_heads) == len(window_sizes):
            raise ValueError("embed_dims, depths, num_heads and window_sizes must have the same length")
        self.num_classes = num_classes
        self.img_size = img_size
        self.embed_dims = tuple(embed_dims)
        self.window_sizes = tuple(window_sizes)
        self.num_features = embed_dims[-1]

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        # Stochastic depth grows linearly over all blocks (plain floats: works on the meta device).
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        stages: list[nn.Module] = [ConvStage(embed_dims[0], depths[0], dpr[:depths[0]], mbconv_expand_ratio)]
        for i in range(1, len(depths)):
            start = sum(depths[:i])
            stages.append(TinyVitStage(
                embed_dims[i - 1], embed_dims[i], depths[i], num_heads[i], window_sizes[i],
                mlp_ratio, drop_rate, dpr[start:start + depths[i]], local_conv_size,
            ))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(self.num_features, num_classes)
        self.apply(_init_linear)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear with a fresh one (``num_classes <= 0``: no classifier)."""
        self.num_classes = num_classes
        ref = self.head.norm.weight
        self.head.fc = _make_fc(self.num_features, num_classes).to(device=ref.device, dtype=ref.dtype)

    def layer_lr_scales(self, decay: float) -> dict[str, float]:
        """Parameter name -> lr factor of layer-wise decay, as TinyViT's ``set_layer_lr_decay``: block i
        of D gets ``decay ** (D - 1 - i)``; the patch embedding the first block's; a stage's patch merging
        the factor of the block before it (TinyViT's layer i ends with the downsample that our stage
        i + 1 starts with); the head 1."""
        blocks = [b for st in self.stages for b in st.blocks]
        depth = len(blocks)
        scales: dict[str, float] = {}

        def put(prefix: str, module: nn.Module, i: int) -> None:
            for name, _ in module.named_parameters(prefix=prefix):
                scales[name] = decay ** (depth - 1 - i)

        put("patch_embed", self.patch_embed, 0)
        i = 0
        for s, st in enumerate(self.stages):
            if hasattr(st, "downsample"):
                put(f"stages.{s}.downsample", st.downsample, i - 1)
            for j, b in enumerate(st.blocks):
                put(f"stages.{s}.blocks.{j}", b, i)
                i += 1
        put("head", self.head, depth - 1)
        return scales

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# Architecture of each registered student. timm names in comments.
CONFIGS: dict[str, dict] = {
    "tinyvit-tiny": dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                         window_sizes=(7, 7, 7, 7), drop_path_rate=0.0),
    # tiny_vit_5m_224
    "tinyvit-5m": dict(embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10),
                       window_sizes=(7, 7, 14, 7), drop_path_rate=0.0),
    # tiny_vit_11m_224
    "tinyvit-11m": dict(embed_dims=(64, 128, 256, 448), depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 14),
                        window_sizes=(7, 7, 14, 7), drop_path_rate=0.1),
    # tiny_vit_21m_224
    "tinyvit-21m": dict(embed_dims=(96, 192, 384, 576), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 18),
                        window_sizes=(7, 7, 14, 7), drop_path_rate=0.2),
}


BUILDERS = builders(CONFIGS, TinyVit)
PAPERS: dict[str, str] = {name: "TinyViT (Wu et al., ECCV 2022)" for name in BUILDERS}

"""DAT students (Deformable Attention Transformer) in plain torch.

Paper: Xia et al. 2022, "Vision Transformer with Deformable Attention" (CVPR 2022).

This follows the official CVPR 2022 (v1) code, LeapLabTHU/DAT at commit 566a593 (June 2022, before the
September 2023 "DAT++" rewrite on ``main``): ``models/dat.py``, ``models/dat_blocks.py`` and
``configs/dat_{tiny,small,base}.yaml``. The module tree and the parameter and buffer names are the
official ones, so the ``model`` state dict of an official v1 checkpoint loads strictly at 224 px.
Layout, top to bottom:

* ``patch_proj``: 4x4 stride-4 conv and a channel LayerNorm (``patch_proj.0``, ``patch_proj.1.norm``).
* ``stages.0..3``: per block ``d`` a pre-norm attention (``layer_norms.{2d}``, ``attns.{d}``) and a pre-norm
  MLP (``layer_norms.{2d+1}``, ``mlps.{d}.chunk``), each residual. ``attns.{d}`` is, per the config's
  ``stage_spec``: ``L`` local window attention, ``S`` shifted window attention (shift ``ceil(window / 2)``
  as the official code, Swin uses floor), ``D`` deformable attention. The paper's configs: stages 1-2
  ``L, S``; stages 3-4 alternate ``L, D``.
* ``down_projs.0..2``: 2x2 stride-2 conv (no bias) and a channel LayerNorm between stages.
* ``cls_norm`` (channel LayerNorm), global average pool, ``cls_head`` (Linear).

Everything works in NCHW. Window attention keeps Swin's table of ``(2 * window - 1) ** 2`` offsets per
head (``relative_position_bias_table``) and its index (``relative_position_index``, a saved buffer as in
the official code); shifted windows also save their mask (``attn_mask``).

Deformable attention (``DAttentionBaseline``): queries ``q = proj_q(x)``; per offset group (``groups``),
the offset network ``conv_offset`` (depthwise ``k x k`` conv, k = 9/7/5/3 for stage 1/2/3/4, LayerNorm,
GELU, 1x1 conv without bias to 2 channels) maps the group's query channels to one (dy, dx) per point of the
reference grid; with ``offset_range_factor`` s > 0 the offsets are ``tanh(.) * s / (Hk, Wk)`` in
normalised units. The deformed points ``pos = reference + offset`` sample the group's input channels with
``F.grid_sample`` (bilinear), then ``proj_k`` / ``proj_v`` make keys and values; every query attends to all
sampled points. The deformable relative position bias: ``rpe_table`` holds one ``(2H - 1) x (2W - 1)``
table per head and is sampled bilinearly at the displacement ``(query point - pos) / 2``.

Reference grid and ``align_corners``: the reference points are the pixel centres of an H x W grid that
tiles [-1, 1] exactly, ``y_i = (i + 0.5) / H * 2 - 1`` (first -1 + 1/H, last 1 - 1/H; the
``align_corners=False`` convention), while both ``grid_sample`` calls use ``align_corners=True`` (-1 and 1
are the centres of the outer pixels), as the official v1 code does. So even with zero offsets a key is a
slight blend of neighbouring pixels (reference point i sits at pixel ``(i + 0.5) (H - 1) / H``); kept for
checkpoint compatibility.

Small inputs. ``img_size`` must be a positive multiple of 32 (stage maps ``img/4 .. img/32``: 56/28/14/7
at 224, 16/8/4/2 at 64, 8/4/2/1 at 32). The model is built for one input size and checks it.

* Window attention: the window is ``min(window_size, map)``. A map larger than the window but not a
  multiple of it (e.g. 8 or 16 with window 7) is zero-padded at the bottom/right to a multiple of the
  window, after the cyclic shift; padded tokens are masked out as keys (-100, the value of the official
  shift mask) and cropped afterwards. A window that covers the whole map is not shifted (an ``S`` block
  then acts as ``L``, its saved ``attn_mask`` is all zeros). The bias table always covers the configured
  window, so its shape never depends on ``img_size``; a smaller window reads the central sub-grid of
  offsets it needs (``relative_position_index`` is built for the window in use).
* Deformable attention: ``rpe_table`` is sized from the stage's map at ``img_size`` as the official code,
  ``(heads, 2 * map - 1, 2 * map - 1)``: 27 x 27 / 13 x 13 (stages 3/4) at 224, 7 x 7 / 3 x 3 at 64,
  3 x 3 / 1 x 1 at 32. ``DAT.adapt_state_dict`` resizes it bicubically (as the official
  ``load_pretrained``) and takes the derived buffers (``relative_position_index``, ``attn_mask``) from the
  model, for loading a checkpoint trained at another size. On a 1 x 1 map (stage 4 at 32 px) sampling is
  constant and the offsets get no gradient; ``dat-mini`` also has a deformable block in stage 3 (2 x 2 at
  32 px).

Initialisation follows the official code in effect: its ``reset_parameters`` loops over parameters looking
for modules and so changes nothing; layers keep torch's default init, the two bias tables get a truncated
normal with std 0.01.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.models.layers import builders, drop_path_layer

_MASK_VALUE = -100.0          # the official shift-window mask value
_OFFSET_KERNELS = (9, 7, 5, 3)  # depthwise kernel of the offset network, per stage (official ``ksizes``)


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of an NCHW map (the norm lives inside: ``*.norm``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TransformerMLP(nn.Module):
    """Per-token MLP on an NCHW map (``chunk.linear1``, GELU, ``chunk.linear2``)."""

    def __init__(self, dim: int, expansion: int, drop: float):
        super().__init__()
        self.chunk = nn.Sequential(OrderedDict(
            linear1=nn.Linear(dim, dim * expansion), act=nn.GELU(), drop1=nn.Dropout(drop),
            linear2=nn.Linear(dim * expansion, dim), drop2=nn.Dropout(drop),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.chunk(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, c, h, w)


# --- window attention --------------------------------------------------------------------------------

def relative_position_index(window: int, table_window: int) -> torch.Tensor:
    """(N, N) index, N = window ** 2, into Swin's table of ``(2 * table_window - 1) ** 2`` offsets.

    Token (i, j) attending to token (k, l) reads offset (i - k, j - l), stored at
    ``(i - k + T - 1) * (2T - 1) + (j - l + T - 1)`` with T = table_window (Swin's and DAT's order).
    A window smaller than the table reads the central sub-grid.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)
    return rel[0] * (2 * table_window - 1) + rel[1]


def region_ids(size: int, window: int, shift: int) -> torch.Tensor:
    """(nW, N) region label of every token of every window over a ``size`` x ``size`` map that is rolled
    by ``-shift`` and then zero-padded to a multiple of ``window``. Tokens attend only within their region:
    rows/columns kept in place, those wrapped around by the roll, and padding are told apart."""
    padded = size + (-size % window)
    pos = torch.arange(padded)
    region = torch.where(pos >= size, 2, torch.where(pos >= size - shift, 1, 0))
    ids = region[:, None] * 3 + region[None, :]
    n = padded // window
    return ids.reshape(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, window * window)


def window_mask(size: int, window: int, shift: int) -> torch.Tensor | None:
    """(nW, N, N) additive mask (0 within a region, -100 across), or None when nothing needs masking."""
    if not shift and not size % window:
        return None
    ids = region_ids(size, window, shift)
    across = ids[:, :, None] != ids[:, None, :]
    return torch.zeros(across.shape).masked_fill(across, _MASK_VALUE)


class LocalAttention(nn.Module):
    """Multi-head self-attention within non-overlapping windows of an NCHW map, with Swin's relative
    position bias (official ``LocalAttention``). ``window_size`` is the configured window; the one in use
    is ``min(window_size, fmap_size)`` (see the module docstring for padding)."""

    def __init__(self, dim: int, heads: int, window_size: int, fmap_size: int,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.fmap_size = fmap_size
        self.table_window = window_size
        self.window_size = min(window_size, fmap_size)
        self.shift_size = self._shift()
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_drop = nn.Dropout(attn_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.01)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size, window_size))
        self._register_mask(window_mask(fmap_size, self.window_size, self.shift_size))

    def _shift(self) -> int:
        return 0

    def _register_mask(self, mask: torch.Tensor | None) -> None:
        # Only padding needs a mask here; derived from the map size, so not saved (no official key).
        self.register_buffer("attn_mask", mask, persistent=False)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias for the window in use."""
        n = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.heads).permute(2, 0, 1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B * nW, N, C) window tokens -> the same shape."""
        bw, n, c = x.shape
        q, k, v = self.proj_qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.position_bias().unsqueeze(0)
        if self.attn_mask is not None:
            nw = self.attn_mask.shape[0]
            attn = (attn.reshape(bw // nw, nw, self.heads, n, n) + self.attn_mask[None, :, None])
            attn = attn.reshape(bw, self.heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj_drop(self.proj_out((attn @ v).transpose(1, 2).reshape(bw, n, c)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h != self.fmap_size or w != self.fmap_size:
            raise ValueError(f"{type(self).__name__} was built for a {self.fmap_size}x{self.fmap_size} map, got {h}x{w}")
        s, ws = self.shift_size, self.window_size
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(2, 3))
        pad_b, pad_r = -h % ws, -w % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        nh, nw = hp // ws, wp // ws
        t = x.reshape(b, c, nh, ws, nw, ws).permute(0, 2, 4, 3, 5, 1).reshape(b * nh * nw, ws * ws, c)
        t = self.attention(t)
        x = t.reshape(b, nh, nw, ws, ws, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hp, wp)
        if pad_b or pad_r:
            x = x[:, :, :h, :w]
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(2, 3))
        return x

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, fmap_size={self.fmap_size}"


class ShiftWindowAttention(LocalAttention):
    """Window attention on the map rolled by ``-ceil(window / 2)`` (official ``ShiftWindowAttention``);
    the saved ``attn_mask`` keeps tokens wrapped around by the roll (and padding) apart."""

    def _shift(self) -> int:
        return math.ceil(self.window_size / 2) if self.window_size < self.fmap_size else 0

    def _register_mask(self, mask: torch.Tensor | None) -> None:
        if mask is None:  # one window covering the map: no shift; keep the official key
            n = self.window_size ** 2
            mask = torch.zeros((self.fmap_size // self.window_size) ** 2, n, n)
        self.register_buffer("attn_mask", mask)


# --- deformable attention ----------------------------------------------------------------------------

def reference_points(h: int, w: int, dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
    """(h, w, 2) pixel centres in (y, x) order, normalised so the grid tiles [-1, 1]: (i + 0.5) / h * 2 - 1."""
    ys = torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device).div(h).mul(2).sub(1)
    xs = torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device).div(w).mul(2).sub(1)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


class DAttentionBaseline(nn.Module):
    """Deformable multi-head attention on an NCHW map (official ``DAttentionBaseline``, v1)."""

    def __init__(self, fmap_size: int, n_heads: int, n_head_channels: int, n_groups: int,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, stride: int = 1,
                 offset_range_factor: float = 2.0, use_pe: bool = True, ksize: int = 5):
        super().__init__()
        if n_groups <= 0 or n_heads % n_groups:
            raise ValueError(f"deformable attention needs heads ({n_heads}) divisible by groups ({n_groups})")
        self.fmap_size = fmap_size
        self.n_heads = n_heads
        self.n_head_channels = n_head_channels
        self.scale = n_head_channels ** -0.5
        self.nc = n_heads * n_head_channels
        self.n_groups = n_groups
        self.n_group_channels = self.nc // n_groups
        self.n_group_heads = n_heads // n_groups
        self.offset_range_factor = offset_range_factor
        gc = self.n_group_channels
        self.conv_offset = nn.Sequential(
            nn.Conv2d(gc, gc, ksize, max(stride, 1), ksize // 2, groups=gc),
            LayerNormProxy(gc),
            nn.GELU(),
            nn.Conv2d(gc, 2, 1, 1, 0, bias=False),
        )
        self.proj_q = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_k = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_v = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_out = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_drop = nn.Dropout(attn_drop)
        if use_pe:
            self.rpe_table = nn.Parameter(torch.zeros(n_heads, 2 * fmap_size - 1, 2 * fmap_size - 1))
            nn.init.trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.register_parameter("rpe_table", None)

    def sampling_points(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deformed points and reference points, both (B * groups, Hk, Wk, 2) in normalised (y, x)."""
        b, _, h, w = q.shape
        offset = self.conv_offset(q.reshape(b * self.n_groups, self.n_group_channels, h, w))
        hk, wk = offset.shape[2:]
        if self.offset_range_factor > 0:
            offset_range = torch.tensor([1.0 / hk, 1.0 / wk], dtype=offset.dtype, device=q.device).reshape(1, 2, 1, 1)
            offset = offset.tanh().mul(offset_range).mul(self.offset_range_factor)
        offset = offset.permute(0, 2, 3, 1)
        reference = reference_points(hk, wk, q.dtype, q.device).expand(b * self.n_groups, -1, -1, -1)
        pos = offset + reference if self.offset_range_factor >= 0 else (offset + reference).tanh()
        return pos, reference

    def position_bias(self, pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B * heads, h * w, Ns): each head's table sampled at (query point - deformed point) / 2."""
        bg, hk, wk, _ = pos.shape
        table = self.rpe_table[None].expand(bg // self.n_groups, -1, -1, -1)
        table = table.reshape(bg, self.n_group_heads, *self.rpe_table.shape[1:])
        q_grid = reference_points(h, w, pos.dtype, pos.device).reshape(1, h * w, 1, 2)
        displacement = (q_grid - pos.reshape(bg, 1, hk * wk, 2)).mul(0.5)
        bias = F.grid_sample(table, displacement[..., (1, 0)], mode="bilinear", align_corners=True)
        return bias.reshape(bg // self.n_groups * self.n_heads, h * w, hk * wk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.proj_q(x)
        pos, _ = self.sampling_points(q)
        n_sample = pos.shape[1] * pos.shape[2]
        sampled = F.grid_sample(x.reshape(b * self.n_groups, self.n_group_channels, h, w),
                                pos[..., (1, 0)], mode="bilinear", align_corners=True)  # grid is (x, y)
        sampled = sampled.reshape(b, c, 1, n_sample)
        q = q.reshape(b * self.n_heads, self.n_head_channels, h * w)
        k = self.proj_k(sampled).reshape(b * self.n_heads, self.n_head_channels, n_sample)
        v = self.proj_v(sampled).reshape(b * self.n_heads, self.n_head_channels, n_sample)
        attn = (q.transpose(1, 2) @ k).mul(self.scale)          # (B * heads, HW, Ns)
        if self.rpe_table is not None:
            attn = attn + self.position_bias(pos, h, w)
        attn = self.attn_drop(attn.softmax(dim=2))
        out = (v @ attn.transpose(1, 2)).reshape(b, c, h, w)
        return self.proj_drop(self.proj_out(out))

    def extra_repr(self) -> str:
        return (f"fmap_size={self.fmap_size}, groups={self.n_groups}, "
                f"offset_range_factor={self.offset_range_factor}")


# --- model -------------------------------------------------------------------------------------------

class TransformerStage(nn.Module):
    """Blocks of one resolution: pre-norm attention (``L``/``S``/``D``) and pre-norm MLP, both residual."""

    def __init__(self, fmap_size: int, window_size: int, dim_in: int, dim_embed: int, depth: int,
                 stage_spec: Sequence[str], n_groups: int, use_pe: bool, heads: int, stride: int,
                 offset_range_factor: float, stage_idx: int, attn_drop: float, proj_drop: float,
                 expansion: int, drop: float, drop_path: Sequence[float]):
        super().__init__()
        if dim_embed % heads:
            raise ValueError(f"stage {stage_idx + 1}: dim {dim_embed} is not divisible by heads {heads}")
        if len(stage_spec) != depth:
            raise ValueError(f"stage {stage_idx + 1}: stage_spec {list(stage_spec)} has not {depth} entries")
        self.depths = depth
        self.proj = nn.Conv2d(dim_in, dim_embed, 1) if dim_in != dim_embed else nn.Identity()
        self.layer_norms = nn.ModuleList([LayerNormProxy(dim_embed) for _ in range(2 * depth)])
        self.mlps = nn.ModuleList([TransformerMLP(dim_embed, expansion, drop) for _ in range(depth)])
        self.attns = nn.ModuleList()
        for kind in stage_spec:
            if kind == "L":
                attn: nn.Module = LocalAttention(dim_embed, heads, window_size, fmap_size, attn_drop, proj_drop)
            elif kind == "S":
                attn = ShiftWindowAttention(dim_embed, heads, window_size, fmap_size, attn_drop, proj_drop)
            elif kind == "D":
                attn = DAttentionBaseline(fmap_size, heads, dim_embed // heads, n_groups, attn_drop, proj_drop,
                                          stride, offset_range_factor, use_pe, _OFFSET_KERNELS[stage_idx])
            else:
                raise ValueError(f"stage {stage_idx + 1}: unknown block kind {kind!r} (valid: L, S, D)")
            self.attns.append(attn)
        self.drop_path = nn.ModuleList([drop_path_layer(p) for p in drop_path])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for d in range(self.depths):
            x = x + self.drop_path[d](self.attns[d](self.layer_norms[2 * d](x)))
            x = x + self.drop_path[d](self.mlps[d](self.layer_norms[2 * d + 1](x)))
        return x


class DAT(nn.Module):
    """DAT classifier. ``forward_features`` returns the normalised NCHW map at stride 32."""

    head_keys: tuple[str, ...] = ("cls_head.weight", "cls_head.bias")
    # Official ``no_weight_decay_keywords``: the bias tables.
    bias_table_names: tuple[str, ...] = ("relative_position_bias_table", "rpe_table")
    derived_buffer_names: tuple[str, ...] = ("relative_position_index", "attn_mask")

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int = 224,
        in_chans: int = 3,
        expansion: int = 4,
        dim_stem: int = 96,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        heads: Sequence[int] = (3, 6, 12, 24),
        window_sizes: Sequence[int] = (7, 7, 7, 7),
        stage_spec: Sequence[Sequence[str]] = (("L", "S"), ("L", "S"), ("L", "D") * 3, ("L", "D")),
        groups: Sequence[int] = (-1, -1, 3, 6),
        use_pes: Sequence[bool] = (False, False, True, True),
        strides: Sequence[int] = (-1, -1, 1, 1),
        offset_range_factor: Sequence[float] = (-1, -1, 2, 2),
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
    ):
        super().__init__()
        if img_size <= 0 or img_size % 32:
            raise ValueError(f"img_size must be a positive multiple of 32, got {img_size}")
        per_stage = (dims, depths, heads, window_sizes, stage_spec, groups, use_pes, strides, offset_range_factor)
        if any(len(v) != 4 for v in per_stage):
            raise ValueError("dims, depths, heads, window_sizes, stage_spec, groups, use_pes, strides and "
                             "offset_range_factor need one entry per stage (4)")
        self.num_classes = num_classes
        self.img_size = img_size
        self.num_features = dims[-1]
        self.patch_proj = nn.Sequential(nn.Conv2d(in_chans, dim_stem, 4, 4, 0), LayerNormProxy(dim_stem))

        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # torch.linspace's values, as floats
        fmap = img_size // 4
        self.stages = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.stages.append(TransformerStage(
                fmap, window_sizes[i], dim_stem if i == 0 else dims[i], dims[i], depths[i], stage_spec[i],
                groups[i], use_pes[i], heads[i], strides[i], offset_range_factor[i], i,
                attn_drop_rate, drop_rate, expansion, drop_rate, dpr[start:start + depths[i]],
            ))
            fmap //= 2
        self.down_projs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 2, 2, 0, bias=False), LayerNormProxy(dims[i + 1]))
            for i in range(3)
        ])
        self.cls_norm = LayerNormProxy(dims[-1])
        self.cls_head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``cls_head`` with a fresh Linear (``num_classes <= 0``: no classifier)."""
        self.num_classes = num_classes
        ref = self.cls_norm.norm.weight
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.cls_head = head.to(device=ref.device, dtype=ref.dtype)

    def no_weight_decay_keywords(self) -> set[str]:
        return set(self.bias_table_names)

    def layer_lr_scales(self, decay: float) -> dict[str, float]:
        """Parameter name -> lr factor of layer-wise decay: block i of D (attention + MLP) gets
        ``decay ** (D - 1 - i)``; ``patch_proj`` the first block's; a stage's input ``proj`` that stage's
        first block's; ``down_projs.i`` the factor of the block before it; ``cls_norm``/``cls_head`` 1."""
        depth = sum(st.depths for st in self.stages)
        scales: dict[str, float] = {}

        def put(module: nn.Module, prefix: str, i: int) -> None:
            for name, _ in module.named_parameters(prefix=prefix):
                scales[name] = decay ** (depth - 1 - i)

        put(self.patch_proj, "patch_proj", 0)
        i = 0
        for s, st in enumerate(self.stages):
            put(st.proj, f"stages.{s}.proj", i)
            for d in range(st.depths):
                for k in (2 * d, 2 * d + 1):
                    put(st.layer_norms[k], f"stages.{s}.layer_norms.{k}", i)
                put(st.attns[d], f"stages.{s}.attns.{d}", i)
                put(st.mlps[d], f"stages.{s}.mlps.{d}", i)
                i += 1
            if s < len(self.down_projs):
                put(self.down_projs[s], f"down_projs.{s}", i - 1)
        put(self.cls_norm, "cls_norm", depth - 1)
        put(self.cls_head, "cls_head", depth - 1)
        return scales

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict saved at another ``img_size`` made to fit this model (as the official
        ``load_pretrained``): ``rpe_table`` resized bicubically, ``relative_position_index`` and
        ``attn_mask`` (derived from the map size) taken from this model. Other keys pass unchanged."""
        own = self.state_dict()
        out = dict(state_dict)
        for key, mine in own.items():
            name = key.rsplit(".", 1)[-1]
            if name in self.derived_buffer_names:
                out[key] = mine.clone()
            elif name == "rpe_table" and key in out and out[key].shape != mine.shape:
                table = out[key].float().unsqueeze(0)
                out[key] = F.interpolate(table, size=mine.shape[1:], mode="bicubic").squeeze(0).to(mine.dtype)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"this DAT was built for {self.img_size}x{self.img_size} inputs, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        x = self.patch_proj(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.down_projs):
                x = self.down_projs[i](x)
        return self.cls_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.cls_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Architecture of each registered student (official config in the comment).
_COMMON = dict(window_sizes=(7, 7, 7, 7), use_pes=(False, False, True, True), strides=(-1, -1, 1, 1),
               offset_range_factor=(-1, -1, 2, 2), expansion=4)
_SPEC_6 = (("L", "S"), ("L", "S"), ("L", "D") * 3, ("L", "D"))
_SPEC_18 = (("L", "S"), ("L", "S"), ("L", "D") * 9, ("L", "D"))
CONFIGS: dict[str, dict] = {
    "dat-mini": dict(_COMMON, dim_stem=16, dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), heads=(1, 2, 4, 8),
                     stage_spec=(("L", "S"), ("L", "S"), ("L", "D"), ("L", "D")), groups=(-1, -1, 2, 4),
                     drop_path_rate=0.0),
    # configs/dat_tiny.yaml
    "dat-tiny": dict(_COMMON, dim_stem=96, dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), heads=(3, 6, 12, 24),
                     stage_spec=_SPEC_6, groups=(-1, -1, 3, 6), drop_path_rate=0.2),
    # configs/dat_small.yaml
    "dat-small": dict(_COMMON, dim_stem=96, dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), heads=(3, 6, 12, 24),
                      stage_spec=_SPEC_18, groups=(-1, -1, 3, 6), drop_path_rate=0.3),
    # configs/dat_base.yaml
    "dat-base": dict(_COMMON, dim_stem=128, dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2),
                     heads=(4, 8, 16, 32), stage_spec=_SPEC_18, groups=(-1, -1, 4, 8), drop_path_rate=0.5),
}


BUILDERS = builders(CONFIGS, DAT)
PAPERS: dict[str, str] = {name: "DAT (Xia et al., CVPR 2022)" for name in BUILDERS}

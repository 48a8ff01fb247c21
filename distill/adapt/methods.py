"""What each adaptation method trains, RepAdapter itself, and merging adapters back into the base.

A *ViT-like* module has ``blocks`` (a sequence of transformer blocks) and a Linear ``head``. Inside a
block this module finds, by timm's names, the linears that read the block's normalised input:

* attention input ``...attn.qkv`` and MLP input ``...mlp.fc1`` (timm ``Block``, distill's ``Block`` and
  ``ParallelThingsBlock``, whose branches are ``attns.J.attn.qkv`` / ``ffns.J.mlp.fc1``);
* the fused input ``in_proj`` of a ViT-22B ``ParallelScalingBlock`` (attention and MLP read the same
  normalised input through one Linear; its output rows ``[:hidden]`` are the MLP's, ``[hidden:]`` q, k, v).

Methods:

* ``linear``: the new head only.
* ``full``: everything.
* ``attn-only`` ("Three things everyone should know about ViTs", §2): the attention modules' parameters
  (``...attn.*``: qkv, proj, q/k norms), the head and ``pos_embed``; MLPs, norms, patch embedding and class
  token stay frozen. In a parallel-scaling block the attention's rows of ``in_proj`` train and its MLP
  rows are held by a gradient mask (and no weight decay on that tensor), so they do not move.
* ``repadapter`` (Luo et al. 2023): a ``RepAdapter`` in front of every input linear above (one per fused
  ``in_proj``), trained with the head; everything else frozen. ``merge_adapters`` then folds each adapter
  into its linear: ``W' = W (I + s B A)``, ``b' = b + s W (B b_A + b_B)``; the merged model has the base's
  modules and parameter names again.

Adapter biases follow the linear: an adapter in front of a bias-free linear is bias-free (then the merge
adds no bias and the merged state dict keeps the base's keys); ``bias=True`` there makes the merge create
the linear's bias.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..files import UserError

METHODS = ("attn-only", "repadapter", "linear", "full")
ATTN_INPUT, MLP_INPUT, FUSED_INPUT = "attn.qkv", "mlp.fc1", "in_proj"


# ----------------------------------------------------------------------------- finding the parts

def check_vit_like(model: nn.Module, what: str) -> None:
    """Refuse a module without ``blocks`` and a Linear ``head``, or whose blocks have no input linears."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks):
        raise UserError(f"{what} is not ViT-like ({type(model).__name__} has no 'blocks' sequence of transformer "
                        "blocks); attn-only and repadapter need a timm-style ViT")
    if not input_linears(model):
        raise UserError(f"{what} is not ViT-like: its blocks have no attention input linears named like timm's "
                        f"(attn.qkv, mlp.fc1 or in_proj); attn-only and repadapter need a timm-style ViT")


def input_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every attention / MLP / fused input linear inside ``model.blocks``."""
    out = []
    for name, m in model.blocks.named_modules():
        if name.endswith((ATTN_INPUT, MLP_INPUT)) or (name.split(".")[-1] == FUSED_INPUT and _is_fused(model, name)):
            if isinstance(m, (nn.Linear, AdaptedLinear)):
                out.append((f"blocks.{name}", m))
    return out


def _is_fused(model: nn.Module, name: str) -> bool:
    parent = model.blocks.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model.blocks
    return hasattr(parent, "in_split")


def fused_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of the parallel-scaling blocks (a fused ``in_proj`` split by ``in_split``)."""
    return [(f"blocks.{n}", m) for n, m in model.blocks.named_modules() if hasattr(m, "in_split")]


def replace_head(model: nn.Module, num_classes: int, what: str) -> None:
    """A fresh classifier for ``num_classes`` (``reset_classifier`` when the model has one)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
    elif isinstance(getattr(model, "head", None), nn.Linear):
        old = model.head
        model.head = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)
    else:
        raise UserError(f"{what} has no Linear 'head' (nor reset_classifier) to replace for the shards' classes")
    if not isinstance(getattr(model, "head", None), nn.Linear):
        raise UserError(f"{what}: its head is {type(model.head).__name__} after reset_classifier, not a Linear")


# ----------------------------------------------------------------------------- RepAdapter

class RepAdapter(nn.Module):
    """``x + s * B(drop(A x))``: A a dense ``dim -> r`` linear, B a grouped ``r -> dim`` projection
    (``groups`` diagonal blocks, each ``r/groups -> dim/groups``) initialised to zero, so a new adapter
    is the identity. Re-parameterisable: without dropout it is the affine map ``x -> M x + c``."""

    def __init__(self, dim: int, r: int = 8, groups: int = 2, scale: float = 1.0, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        if r < 1 or groups < 1 or r % groups or dim % groups:
            raise UserError(f"adapter dim {r} and groups {groups}: both the adapter dim and the model width {dim} "
                            f"must be divisible by groups")
        self.dim, self.r, self.groups, self.scale = dim, r, groups, float(scale)
        self.A = nn.Linear(dim, r, bias=bias)
        self.B_weight = nn.Parameter(torch.zeros(groups, dim // groups, r // groups))
        self.B_bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.drop = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.A.weight)
        if bias:
            nn.init.zeros_(self.A.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.A(x))
        h = h.unflatten(-1, (self.groups, self.r // self.groups))
        y = torch.einsum("...gi,goi->...go", h, self.B_weight).flatten(-2)
        if self.B_bias is not None:
            y = y + self.B_bias
        return x + self.scale * y

    def dense_b(self) -> torch.Tensor:
        """B as a dense (dim, r) matrix (block-diagonal)."""
        return torch.block_diag(*self.B_weight.unbind(0))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, r={self.r}, groups={self.groups}, scale={self.scale:g}"


class AdaptedLinear(nn.Module):
    """A frozen linear with an adapter in front: ``linear(adapter(x))``."""

    def __init__(self, linear: nn.Linear, adapter: RepAdapter):
        super().__init__()
        self.adapter, self.linear = adapter, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.adapter(x))

    def merged(self) -> nn.Linear:
        """The one Linear equal to this module in eval mode (computed in float64)."""
        lin, ad = self.linear, self.adapter
        w = lin.weight.detach().double()
        a, b = ad.A.weight.detach().double(), ad.dense_b().detach().double()
        new_w = w + ad.scale * (w @ b) @ a
        shift = torch.zeros(ad.dim, dtype=torch.float64, device=w.device)
        if ad.A.bias is not None:
            shift = shift + b @ ad.A.bias.detach().double()
        if ad.B_bias is not None:
            shift = shift + ad.B_bias.detach().double()
        has_bias = lin.bias is not None or bool(shift.any())
        out = nn.Linear(lin.in_features, lin.out_features, bias=has_bias).to(lin.weight.device, lin.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(new_w)
            if has_bias:
                bias = ad.scale * (w @ shift)
                if lin.bias is not None:
                    bias = bias + lin.bias.detach().double()
                out.bias.copy_(bias)
        out.requires_grad_(lin.weight.requires_grad)
        return out


def add_adapters(model: nn.Module, r: int, groups: int, scale: float, dropout: float,
                 bias: bool | None = None) -> int:
    """Put a RepAdapter in front of every input linear (see the module docstring); returns how many.
    ``bias=None``: an adapter has biases when its linear has one."""
    made = 0
    for name, lin in input_linears(model):
        if isinstance(lin, AdaptedLinear):
            continue
        want = lin.bias is not None if bias is None else bias
        ad = RepAdapter(lin.in_features, r, groups, scale, dropout, want).to(lin.weight.device, lin.weight.dtype)
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, AdaptedLinear(lin, ad))
        made += 1
    return made


def merge_adapters(model: nn.Module) -> int:
    """Replace every ``AdaptedLinear`` by its merged Linear (in place); returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    for name in names:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, getattr(parent, leaf).merged())
    return len(names)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    head, _, leaf = name.rpartition(".")
    return (model.get_submodule(head) if head else model), leaf


# ----------------------------------------------------------------------------- what trains

def set_trainable(model: nn.Module, method: str, what: str, adapter: dict | None = None) -> dict[str, torch.Tensor]:
    """Freeze / unfreeze ``model`` for ``method`` (adding adapters for repadapter, from ``adapter``:
    r, groups, scale, dropout). Returns {parameter name: row mask} of parameters that train only in part
    (a parallel-scaling ``in_proj`` under attn-only); their gradients are masked by a hook."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in ("attn-only", "repadapter"):
        check_vit_like(model, what)
    if method == "repadapter":
        add_adapters(model, **(adapter or {}))
    masks: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        p.requires_grad_(_trains(name, method))
    if method == "attn-only":
        masks = _fused_attention_rows(model)
    return masks


def _trains(name: str, method: str) -> bool:
    if method == "full" or name.startswith("head."):
        return True
    if method == "linear":
        return False
    if method == "repadapter":
        return ".adapter." in name
    parts = name.split(".")                               # attn-only
    return name == "pos_embed" or (parts[0] == "blocks" and ("attn" in parts[:-1] or parts[-2:-1] in
                                                             (["q_norm"], ["k_norm"], ["attn_out_proj"])))


def _fused_attention_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """Under attn-only: a fused ``in_proj`` trains its q, k, v rows only (a gradient mask on the MLP rows)."""
    masks = {}
    for name, block in fused_blocks(model):
        hidden = block.in_split[0]
        for pname in ("weight", "bias"):
            p = getattr(block.in_proj, pname, None)
            if p is None:
                continue
            mask = torch.ones_like(p)
            mask[:hidden] = 0
            p.requires_grad_(True)
            p.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype))
            masks[f"{name}.in_proj.{pname}"] = mask
    return masks


def count_trained(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Parameters that train (a masked tensor counts its unmasked elements)."""
    return sum(int(masks[n].sum()) if n in masks else p.numel()
               for n, p in model.named_parameters() if p.requires_grad)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

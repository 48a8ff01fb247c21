"""adapt-teacher's methods on real torch ViTs (no data): RepAdapter merging (sequential, parallel and
ViT-22B blocks, with and without biases), what attn-only trains, and the ViT-like check."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from distill.adapt.methods import (AdaptedLinear, add_adapters, count_params, count_trained, input_linears,
                                   merge_adapters, set_trainable)
from distill.adapt.train import optimizer
from distill.files import UserError
from distill.models.vit import VisionTransformer

BLOCKS = {
    "sequential": dict(block="sequential"),
    "parallel": dict(block="parallel", num_parallel=2, init_values=0.5),
    "parallel-scaling": dict(block="parallel-scaling", qk_norm=True, norm="rmsnorm", pre_norm=True, no_embed_class=True),
}


def tiny(block: str, bias: bool = True) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(num_classes=5, img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             bias=bias, **BLOCKS[block]).eval()


def _randomise_adapters(model: nn.Module) -> None:
    """Trained-looking adapters (a fresh one is the identity: B = 0)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdaptedLinear):
                for p in m.adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("bias", [True, False])
def test_merged_repadapter_equals_unmerged(block, bias):
    """Merged == unmerged (max |Δ logit| <= 1e-4, fp32); the merged model has the base's parameters and
    state-dict keys: a bias-free base gets bias-free adapters and no new bias."""
    base = tiny(block, bias)
    model = copy.deepcopy(base)
    n = add_adapters(model, r=8, groups=2, scale=0.7, dropout=0.1)
    assert n == (2 if block == "parallel-scaling" else 4 if block == "sequential" else 8)
    assert all(isinstance(m, AdaptedLinear) for _, m in input_linears(model))
    _randomise_adapters(model)
    model.eval()
    x = torch.randn(6, 3, 16, 16)
    before = model(x)
    assert (before - base(x)).abs().max() > 1e-2            # the adapters do change the model
    merge_adapters(model)
    assert (model(x) - before).abs().max() <= 1e-4
    assert count_params(model) == count_params(base)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}


@pytest.mark.parametrize("block", ["sequential", "parallel-scaling"])
def test_bias_free_base_with_biased_adapters_merge_creates_bias(block):
    base = tiny(block, bias=False)
    model = copy.deepcopy(base)
    add_adapters(model, r=8, groups=2, scale=1.0, dropout=0.0, bias=True)
    _randomise_adapters(model)
    x = torch.randn(4, 3, 16, 16)
    before = model(x)
    merge_adapters(model)
    assert (model(x) - before).abs().max() <= 1e-4
    made = sorted(set(model.state_dict()) - set(base.state_dict()))
    assert made and all(k.endswith(("qkv.bias", "fc1.bias", "in_proj.bias")) for k in made)


def test_grouped_adapter_is_block_diagonal():
    model = tiny("sequential")
    add_adapters(model, r=8, groups=4, scale=1.0, dropout=0.0)
    ad = model.blocks[0].attn.qkv.adapter
    with torch.no_grad():
        ad.B_weight.normal_()
    b = ad.dense_b()
    assert b.shape == (32, 8)
    assert b[:8, 2:].abs().sum() == 0 and b[8:16, :2].abs().sum() == 0 and b[:8, :2].abs().sum() > 0


@pytest.mark.parametrize("block", ["sequential", "parallel", "parallel-scaling"])
def test_attn_only_trains_attention_head_and_pos_embed(block):
    model = tiny(block)
    masks = set_trainable(model, "attn-only", "tiny")
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias", "pos_embed"} <= trains
    for n in trains - {"head.weight", "head.bias", "pos_embed"}:
        assert ".attn." in n or n.split(".")[-2] in ("q_norm", "k_norm", "attn_out_proj", "in_proj"), n
    assert not any(k in n for n in trains for k in ("mlp", "ffns", "patch_embed", "norm1", "norm2", "cls_token"))
    assert (block == "parallel-scaling") == bool(masks)
    before = copy.deepcopy(model.state_dict())
    opt = optimizer(model, masks, lr=1e-2, weight_decay=0.05)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.arange(8) % 5).backward()
    opt.step()
    after = model.state_dict()
    for name, old in before.items():
        moved = not torch.equal(old, after[name])
        if name in masks:                                    # in_proj: q, k, v rows move, MLP rows do not
            hidden = model.blocks[0].in_split[0]
            assert torch.equal(old[:hidden], after[name][:hidden]) and moved, name
        else:
            assert moved == (name in trains), name
    hidden = model.blocks[0].in_split[0] if block == "parallel-scaling" else 0
    frozen_rows = sum(hidden * m.shape[1] if m.ndim == 2 else hidden for m in masks.values())
    assert count_trained(model, masks) == sum(model.get_parameter(n).numel() for n in trains) - frozen_rows


def test_linear_and_full():
    model = tiny("sequential")
    set_trainable(model, "linear", "tiny")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    set_trainable(model, "full", "tiny")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["attn-only", "repadapter"])
def test_not_vit_like_refused(method):
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with pytest.raises(UserError, match="not ViT-like"):
        set_trainable(cnn, method, "--base cnn")
    set_trainable(cnn, "full", "--base cnn")                 # any module can be fine-tuned fully

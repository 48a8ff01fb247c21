"""Vision Transformer students (distill/models/vit.py): sizes, timm names and logits, block variants."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

from distill.models import param_groups
from distill.models.vit import (
    BUILDERS, CONFIGS, PAPERS, Block, ParallelScalingBlock, ParallelThingsBlock, VisionTransformer,
    resample_pos_embed,
)
from tests.helpers.timm_stub import import_timm

# timm 1.0.31, 1,000 classes.
TIMM_NAMES = {
    "vit-ti16": "vit_tiny_patch16_224",
    "vit-s16": "vit_small_patch16_224",
    "vit-b16": "vit_base_patch16_224",
    "vit-s16-18x2": "vit_small_patch16_18x2_224",
    "vit-b16-22b": "vit_base_patch16_xp_224",
}
TIMM_PARAMS = {
    "vit-ti16": 5_717_416,
    "vit-s16": 22_050_664,
    "vit-b16": 86_567_656,
    "vit-s16-18x2": 64_665_448,
    "vit-b16-22b": 86_512_360,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, num_classes: int = 1000, img_size: int = 224, meta: bool = False, **kw) -> nn.Module:
    if meta:
        with torch.device("meta"):
            return BUILDERS[name](num_classes, img_size, **kw)
    return BUILDERS[name](num_classes, img_size, **kw)


def small(**kw) -> VisionTransformer:
    """A small model of any configuration, for behaviour tests."""
    args = dict(num_classes=5, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    return VisionTransformer(**args)


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Make every tensor non-trivial (zero biases, 1e-5 layer scales, BN stats) so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = 0.1 * torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(1.0 + noise.abs())
            elif t.ndim == 1 and (name.endswith("weight") or name.endswith("gamma")):
                t.copy_(1.0 + noise)
            else:
                t.copy_(noise)


# --- registry -------------------------------------------------------------------------------------

def test_registry_and_builder_interface():
    assert set(BUILDERS) == set(PAPERS) == set(CONFIGS) == {
        "vit-mini", "vit-ti16", "vit-s16", "vit-b16", "vit-s16-18x2", "vit-s16-hmlp", "vit-b16-22b"}
    for fn in BUILDERS.values():
        params = inspect.signature(fn).parameters
        assert list(params) == ["num_classes", "img_size", "drop_path_rate"]
        assert params["img_size"].default == 224 and params["drop_path_rate"].default is None


def test_drop_path_rate_override():
    model = build("vit-s16", 10, meta=True)
    assert model.blocks[-1].drop_path1.p == pytest.approx(0.1)
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)        # linear from 0
    model = build("vit-s16", 10, meta=True, drop_path_rate=0.0)
    assert isinstance(model.blocks[-1].drop_path1, nn.Identity)
    model = build("vit-s16-18x2", 10, meta=True, drop_path_rate=0.2)
    assert model.blocks[-1].attns[1].drop_path.p == pytest.approx(0.2)


@pytest.mark.parametrize("name,size", [("vit-s16", 0), ("vit-s16", 100), ("vit-b16-22b", 232),
                                       ("vit-mini", 36), ("vit-s16-hmlp", 24)])
def test_img_size_must_be_a_multiple_of_the_patch(name, size):
    patch = 8 if name == "vit-mini" else 16
    with pytest.raises(ValueError, match=f"positive multiple of {patch}"):
        build(name, 10, size)


def test_input_of_another_size_is_refused():
    model = build("vit-mini", 3, 32)
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 3, 64, 64))


def test_bad_options():
    with pytest.raises(ValueError, match="block must be one of"):
        small(block="serial")
    with pytest.raises(ValueError, match="needs class_token"):
        small(class_token=False)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        small(num_heads=3)


# --- sizes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_param_counts_match_timm(name):
    assert n_params(build(name, meta=True)) == TIMM_PARAMS[name]


def test_hmlp_param_count():
    # vit-s16 with its 16x16 patch conv replaced by 4x4/4 -> 2x2/2 -> 2x2/2 convs (D/4, D/4, D) and 3 BNs.
    d, m = 384, 96
    patch = 3 * d * 16 * 16 + d
    hmlp = (3 * m * 16 + m) + 2 * m + (m * m * 4 + m) + 2 * m + (m * d * 4 + d) + 2 * d
    assert n_params(build("vit-s16-hmlp", meta=True)) == TIMM_PARAMS["vit-s16"] - patch + hmlp == 21_946_024


def test_mini_is_small():
    assert n_params(build("vit-mini", 1000, 224)) < 1_000_000
    assert n_params(build("vit-mini", 1000, 32)) < 300_000


def test_pos_embed_follows_the_grid():
    assert build("vit-s16", 10, 32, meta=True).pos_embed.shape == (1, 2 * 2 + 1, 384)
    assert build("vit-s16", 10, 224, meta=True).pos_embed.shape == (1, 14 * 14 + 1, 384)
    assert build("vit-mini", 10, 32).pos_embed.shape == (1, 4 * 4 + 1, 64)
    # no_embed_class: the position embedding covers only the patches.
    assert build("vit-b16-22b", 10, 64, meta=True).pos_embed.shape == (1, 4 * 4, 768)


# --- forward --------------------------------------------------------------------------------------

# Full-depth presets are too slow to initialise here (trunc-normal init of 20-86M weights, three sizes):
# their builders are checked on the meta device (counts, timm keys) and their code at depth 2 against timm.
# Here each preset's width, stem and block type run at every size with one block.
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_forward_at_224_32_64(name):
    torch.manual_seed(0)
    cfg = dict(CONFIGS[name])
    if name != "vit-mini":
        cfg["depth"] = 1
    for size in (224, 32, 64):
        model = VisionTransformer(num_classes=7, img_size=size, **cfg).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, size, size))
        assert out.shape == (1, 7) and torch.isfinite(out).all(), size


def test_mini_backward():
    torch.manual_seed(0)
    model = build("vit-mini", 7, 32)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("kw", [
    dict(block="parallel", init_values=1e-5), dict(block="parallel-scaling", qk_norm=True),
    dict(block="parallel-scaling", bias=False, norm="layernorm"), dict(stem="hmlp", img_size=32),
    dict(class_token=False, global_pool="avg", qk_norm=True, pre_norm=True, no_embed_class=True),
])
def test_variants_backward(kw):
    torch.manual_seed(0)
    model = small(drop_path_rate=0.1, **kw)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 5)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_avg_pool_uses_fc_norm_like_timm():
    model = small(global_pool="avg", class_token=False)
    keys = set(model.state_dict())
    assert "fc_norm.weight" in keys and not any(k.startswith("norm.") for k in keys) and "cls_token" not in keys
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)


def test_reset_classifier_and_head_keys():
    model = build("vit-mini", 10, 32).eval()
    assert set(model.head_keys) <= set(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64) and not set(model.head_keys) & set(model.state_dict())
    model.reset_classifier(4)
    assert model(x).shape == (2, 4)


# --- block variants -------------------------------------------------------------------------------

def test_parallel_blocks_are_two_sequential_blocks_wide():
    model = build("vit-s16-18x2", meta=True)
    assert len(model.blocks) == 18
    assert all(isinstance(b, ParallelThingsBlock) and len(b.attns) == len(b.ffns) == 2 for b in model.blocks)
    with torch.device("meta"):
        seq = Block(384, 6, 4.0, True, True, False, "layernorm", True, 1e-5, 0.0)
    # Each branch pair (norm, attention, ls) + (norm, MLP, ls) is one sequential block.
    assert n_params(model.blocks[0]) == 2 * n_params(seq) == 2 * 1_775_232
    assert n_params(model) == TIMM_PARAMS["vit-s16-18x2"]


def test_parallel_block_sums_its_branches():
    torch.manual_seed(0)
    blk = small(block="parallel", init_values=0.5).blocks[0].eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        y = x + blk.attns[0](x) + blk.attns[1](x)
        y = y + blk.ffns[0](y) + blk.ffns[1](y)
        torch.testing.assert_close(blk(x), y)


def test_22b_biases_are_timms():
    """timm's vit_base_patch16_xp_224 has no bias in its norms (RMSNorm), its fused in_proj or the patch
    embedding; the MLP's fc1 bias (``mlp_bias``) and the two output projections keep theirs."""
    model = build("vit-b16-22b", meta=True)
    assert all(isinstance(b, ParallelScalingBlock) for b in model.blocks)
    biases = {n for n, _ in model.named_parameters() if "bias" in n}
    per_block = {"mlp_bias", "attn_out_proj.bias", "mlp_out_proj.bias"}
    assert biases == {f"blocks.{i}.{k}" for i in range(12) for k in per_block} | {"head.bias"}
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert norms and all(isinstance(m, nn.RMSNorm) for m in norms)   # norm_pre, in/q/k_norm, norm
    assert isinstance(model.norm_pre, nn.RMSNorm) and model.patch_embed.proj.bias is None
    assert not hasattr(model.blocks[0], "ls") or isinstance(model.blocks[0].ls, nn.Identity)
    assert isinstance(model.blocks[0].q_norm, nn.RMSNorm) and model.blocks[0].q_norm.weight.shape == (64,)


@pytest.mark.parametrize("block", ["sequential", "parallel", "parallel-scaling"])
def test_bias_false_removes_every_block_and_norm_bias(block):
    model = small(block=block, bias=False, qk_norm=True, init_values=0.1)
    biases = {n for n, _ in model.named_parameters() if "bias" in n}
    assert biases == {"patch_embed.proj.bias", "head.bias"}
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())


@pytest.mark.parametrize("block", ["sequential", "parallel-scaling"])
def test_qk_norm_makes_attention_scale_free(block):
    """With LayerNorm on queries and keys, scaling the q and k projections changes nothing."""
    torch.manual_seed(0)
    model = small(block=block, qk_norm=True).eval()
    randomise(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for b in model.blocks:
            lin, start = (b.attn.qkv, 0) if block == "sequential" else (b.in_proj, b.in_split[0])
            lin.weight[start:start + 64].mul_(7.0)
            lin.bias[start:start + 64].mul_(7.0)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_sequential_names_for_adapters():
    model = build("vit-ti16", 10, 32, meta=True)
    for b in model.blocks:
        assert type(b.attn.qkv) is nn.Linear and type(b.mlp.fc1) is nn.Linear
    assert dict(model.named_modules())["blocks.3.attn.qkv"] is model.blocks[3].attn.qkv


# --- hMLP stem ------------------------------------------------------------------------------------

def test_hmlp_stem_layout():
    stem = build("vit-s16-hmlp", 10, 32, meta=True).patch_embed.proj
    convs = [(m.kernel_size, m.stride, m.out_channels) for m in stem if isinstance(m, nn.Conv2d)]
    assert convs == [((4, 4), (4, 4), 96), ((2, 2), (2, 2), 96), ((2, 2), (2, 2), 384)]
    assert [type(m).__name__ for m in stem] == [
        "Conv2d", "BatchNorm2d", "GELU", "Conv2d", "BatchNorm2d", "GELU", "Conv2d", "BatchNorm2d"]


def test_hmlp_keeps_patches_independent():
    torch.manual_seed(0)
    model = small(stem="hmlp", img_size=64, embed_dim=32).eval()      # eval: BatchNorm uses running stats
    randomise(model)
    x = torch.randn(2, 3, 64, 64)
    y = x.clone()
    y[:, :, 16:32, 32:48] = torch.randn(2, 3, 16, 16)                 # patch (row 1, col 2) of a 4x4 grid
    with torch.no_grad():
        a, b = model.patch_embed(x), model.patch_embed(y)
    assert a.shape == (2, 16, 32)
    changed = (a - b).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [1 * 4 + 2]


# --- position embeddings and lr scales -------------------------------------------------------------

def test_resample_pos_embed():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    assert resample_pos_embed(pe, 14, 1) is pe
    torch.testing.assert_close(resample_pos_embed(pe, (14, 14), 1), pe)
    out = resample_pos_embed(pe, 2, 1)
    assert out.shape == (1, 1 + 4, 8) and torch.equal(out[:, 0], pe[:, 0])
    const = torch.cat([torch.randn(1, 1, 8), torch.full((1, 4, 8), 0.25)], dim=1)
    for grid in (4, (3, 5), 1):
        up = resample_pos_embed(const, grid, 1)
        torch.testing.assert_close(up[:, 1:], torch.full_like(up[:, 1:], 0.25))
    assert resample_pos_embed(torch.randn(1, 16, 8), 8, 0).shape == (1, 64, 8)
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 15, 8), 4, 1)


def test_resampled_checkpoint_loads_at_another_size():
    src = build("vit-mini", 10, 64)
    sd = src.state_dict()
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], 32 // 8, 1)
    dst = build("vit-mini", 10, 32)
    dst.load_state_dict(sd)
    assert dst(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_layer_lr_scales():
    model = build("vit-s16-18x2", 10, 32, meta=True)
    scales = model.layer_lr_scales(0.5)
    assert set(scales) == {n for n, _ in model.named_parameters()}
    d = len(model.blocks)
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attns.1.attn.qkv.weight"):
        assert scales[name] == 0.5 ** (d - 1), name
    assert scales["blocks.10.ffns.0.mlp.fc1.bias"] == 0.5 ** (d - 11)
    assert scales["blocks.17.attns.0.ls.gamma"] == scales["norm.weight"] == scales["head.weight"] == 1.0
    groups = param_groups(model, weight_decay=0.05, layer_lr_decay=0.5)
    assert sorted({g["lr_scale"] for g in groups}) == sorted({0.5 ** i for i in range(d)})
    assert model.no_weight_decay() <= set(scales)


# --- against timm ---------------------------------------------------------------------------------

def timm_model(name: str, img_size: int = 224, meta: bool = False, **kw) -> nn.Module:
    timm = import_timm()
    args = dict(pretrained=False, num_classes=1000, img_size=img_size, **kw)
    if meta:
        with torch.device("meta"):
            return timm.create_model(TIMM_NAMES[name], **args)
    return timm.create_model(TIMM_NAMES[name], **args)


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_state_dict_matches_timm(name):
    ref = {k: v.shape for k, v in timm_model(name, meta=True).state_dict().items()}
    ours = {k: v.shape for k, v in build(name, meta=True).state_dict().items()}
    assert ours == ref


# ViT-Ti whole at 224 with one image; the others with two blocks (timm's ``depth`` override) at 64 px.
@pytest.mark.parametrize("name,size,depth", [("vit-ti16", 224, None), ("vit-s16", 64, 2), ("vit-b16", 64, 2),
                                             ("vit-s16-18x2", 64, 2), ("vit-b16-22b", 64, 2)])
def test_logits_match_timm(name, size, depth):
    ref = timm_model(name, size, **({} if depth is None else {"depth": depth}))
    randomise(ref)
    if depth is None:
        ours = build(name, 1000, size)
    else:
        ours = VisionTransformer(num_classes=1000, img_size=size, **{**CONFIGS[name], "depth": depth})
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval()
    ours.eval()
    batch = 1 if size == 224 else 2
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5, rtol=0)

"""Tests for distill.models: registry, TinyViT shapes and sizes, timm-compatible state dicts, load_init."""
from __future__ import annotations

import itertools

import pytest
import torch

from distill.models import (
    MODELS, InitReport, create_model, list_models, load_init, param_groups, resize_attention_biases,
)
from distill.models.tinyvit import CONFIGS, TinyVit, bias_table_index
from tests.helpers.timm_stub import import_timm

# Published sizes (TinyViT paper / timm) with a 1,000-class head.
PUBLISHED_PARAMS = {"tinyvit-5m": 5.39e6, "tinyvit-11m": 11.00e6, "tinyvit-21m": 21.20e6}
TIMM_NAMES = {"tinyvit-5m": "tiny_vit_5m_224", "tinyvit-11m": "tiny_vit_11m_224", "tinyvit-21m": "tiny_vit_21m_224"}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- registry -------------------------------------------------------------------------------------

def test_registry_lists_all_models():
    assert list_models() == sorted(MODELS)
    assert {"tinyvit-tiny", "tinyvit-5m", "tinyvit-11m", "tinyvit-21m"} <= set(MODELS)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="tinyvit-5m"):
        create_model("tinyvit-7m", num_classes=10)


@pytest.mark.parametrize("img_size", [0, 100, 225])
def test_img_size_must_be_multiple_of_32(img_size):
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("tinyvit-tiny", num_classes=10, img_size=img_size)


def test_drop_path_rate_override():
    assert create_model("tinyvit-11m", 10).stages[3].blocks[1].drop_path1.p == pytest.approx(0.1)
    model = create_model("tinyvit-11m", 10, drop_path_rate=0.0)
    assert isinstance(model.stages[3].blocks[1].drop_path1, torch.nn.Identity)


# --- sizes and shapes -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_counts_match_published(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
    assert n_params(model) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


def test_tiny_is_under_a_million_params():
    assert n_params(create_model("tinyvit-tiny", num_classes=1000)) < 1_000_000


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward(name):
    torch.manual_seed(0)
    tiny = name == "tinyvit-tiny"
    model = create_model(name, num_classes=7, img_size=32 if tiny else 64)
    x = torch.randn(4 if tiny else 2, 3, *(2 * [32 if tiny else 64]))
    out = model(x)
    assert out.shape == (x.shape[0], 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("size", [32, 64, 96, 224, 256])
def test_tiny_input_sizes(size):
    model = create_model("tinyvit-tiny", num_classes=5, img_size=size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, size // 32, size // 32)
        assert model.forward_head(feats).shape == (2, 5)
        assert torch.isfinite(model(x)).all()


def test_5m_runs_at_256():
    model = create_model("tinyvit-5m", num_classes=3, img_size=256).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 3)


def test_reset_classifier():
    model = create_model("tinyvit-tiny", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (2, model.num_features)
    model.reset_classifier(4)
    assert model.num_classes == 4 and model(x).shape == (2, 4)


# --- attention-bias tables ------------------------------------------------------------------------

def timm_bias_index(window: int) -> torch.Tensor:
    """timm's construction: offsets numbered in the order first seen over all (p1, p2) pairs."""
    points = list(itertools.product(range(window), range(window)))
    seen: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(seen.setdefault(offset, len(seen)))
    return torch.tensor(idxs).view(len(points), len(points))


@pytest.mark.parametrize("window", [1, 2, 5, 7, 14])
def test_bias_index_matches_timm_order(window):
    assert torch.equal(bias_table_index(window), timm_bias_index(window))


def test_smaller_window_reads_offset_subgrid():
    model = create_model("tinyvit-tiny", num_classes=2)
    attn = model.stages[1].blocks[0].attn
    ws = attn.window_size
    with torch.no_grad():
        attn.attention_biases.normal_()
    wh, ww = 3, 2
    bias = attn.attention_bias(wh, ww)
    assert bias.shape == (attn.num_heads, wh * ww, wh * ww)
    pts = list(itertools.product(range(wh), range(ww)))
    for a, (i, j) in enumerate(pts):
        for b, (k, l) in enumerate(pts):
            assert torch.equal(bias[:, a, b], attn.attention_biases[:, abs(i - k) * ws + abs(j - l)])


def test_bias_table_shape_does_not_depend_on_img_size():
    small = create_model("tinyvit-5m", num_classes=10, img_size=32).state_dict()
    big = create_model("tinyvit-5m", num_classes=10, img_size=256).state_dict()
    assert {k: v.shape for k, v in small.items()} == {k: v.shape for k, v in big.items()}


# --- state-dict names -----------------------------------------------------------------------------

def conv_norm(prefix: str) -> list[str]:
    return [f"{prefix}.conv.weight"] + [f"{prefix}.bn.{n}" for n in
                                       ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


# Names read off timm's timm/models/tiny_vit.py, one list per kind of block.
PATCH_EMBED = conv_norm("conv1") + conv_norm("conv2")
MBCONV_BLOCK = conv_norm("conv1") + conv_norm("conv2") + conv_norm("conv3")
PATCH_MERGING = conv_norm("conv1") + conv_norm("conv2") + conv_norm("conv3")
TINYVIT_BLOCK = [
    "attn.attention_biases", "attn.norm.weight", "attn.norm.bias", "attn.qkv.weight", "attn.qkv.bias",
    "attn.proj.weight", "attn.proj.bias",
    "mlp.norm.weight", "mlp.norm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
] + conv_norm("local_conv")
HEAD = ["norm.weight", "norm.bias", "fc.weight", "fc.bias"]


def expected_keys(depths) -> set[str]:
    keys = {f"patch_embed.{k}" for k in PATCH_EMBED}
    keys |= {f"stages.0.blocks.{b}.{k}" for b in range(depths[0]) for k in MBCONV_BLOCK}
    for s in range(1, len(depths)):
        keys |= {f"stages.{s}.downsample.{k}" for k in PATCH_MERGING}
        keys |= {f"stages.{s}.blocks.{b}.{k}" for b in range(depths[s]) for k in TINYVIT_BLOCK}
    return keys | {f"head.{k}" for k in HEAD}


def test_state_dict_keys_follow_timm():
    sd = create_model("tinyvit-5m", num_classes=1000).state_dict()
    for key in ["patch_embed.conv1.conv.weight", "patch_embed.conv1.bn.weight", "stages.0.blocks.0.conv1.conv.weight",
                "stages.1.downsample.conv1.conv.weight", "stages.1.blocks.0.attn.qkv.weight",
                "stages.1.blocks.0.attn.attention_biases", "stages.1.blocks.0.local_conv.conv.weight",
                "stages.1.blocks.0.mlp.norm.weight", "stages.3.blocks.1.mlp.fc2.bias",
                "head.norm.weight", "head.fc.weight"]:
        assert key in sd, key
    assert set(sd) == expected_keys(CONFIGS["tinyvit-5m"]["depths"])
    # As in timm, the index buffer is derived from the window size and is not saved.
    assert not any("attention_bias_idxs" in k for k in sd)
    assert sd["stages.3.blocks.0.attn.attention_biases"].shape == (10, 49)
    assert sd["stages.2.blocks.0.attn.attention_biases"].shape == (5, 196)


# --- param_groups ---------------------------------------------------------------------------------

def test_param_groups_exclude_norms_biases_and_attention_biases():
    model = create_model("tinyvit-tiny", num_classes=10)
    groups = param_groups(model, weight_decay=0.05)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay | no_decay == {id(p) for p in named.values()} and not decay & no_decay
    for name in ["stages.1.blocks.0.attn.attention_biases", "stages.1.blocks.0.attn.norm.weight",
                 "stages.1.blocks.0.mlp.norm.bias", "head.norm.weight", "patch_embed.conv1.bn.weight",
                 "head.fc.bias"]:
        assert id(named[name]) in no_decay, name
    for name in ["stages.1.blocks.0.attn.qkv.weight", "patch_embed.conv1.conv.weight", "head.fc.weight"]:
        assert id(named[name]) in decay, name
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()


# --- load_init ------------------------------------------------------------------------------------

def randomise(model: torch.nn.Module) -> None:
    """Make every tensor non-trivial (BN stats, zero-init BN gammas, bias tables) so comparisons mean something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = 0.1 * torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(1.0 + noise.abs())
            elif t.ndim == 1 and name.endswith("weight"):
                t.copy_(1.0 + noise)
            else:
                t.copy_(noise)


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_load_init_round_trip_drops_head(tmp_path, wrap):
    src = create_model("tinyvit-tiny", num_classes=10)
    randomise(src)
    sd = src.state_dict()
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, tmp_path / "ckpt.pth")

    dst = create_model("tinyvit-tiny", num_classes=4)
    fresh_fc = dst.head.fc.weight.detach().clone()
    report = load_init(dst, tmp_path / "ckpt.pth")
    assert isinstance(report, InitReport)
    assert sorted(report.dropped_head) == ["head.fc.bias", "head.fc.weight"]
    assert report.resized == []
    for key, value in dst.state_dict().items():
        if not key.startswith("head.fc."):
            assert torch.equal(value, sd[key]), key
    assert torch.equal(dst.head.fc.weight, fresh_fc)


def test_load_init_same_classes_loads_everything(tmp_path):
    src = create_model("tinyvit-tiny", num_classes=10)
    randomise(src)
    torch.save(src.state_dict(), tmp_path / "ckpt.pth")
    dst = create_model("tinyvit-tiny", num_classes=10)
    report = load_init(dst, tmp_path / "ckpt.pth")
    assert report.dropped_head == [] and report.loaded == len(src.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src.eval()(x))


def test_load_init_resizes_attention_biases(tmp_path):
    cfg = dict(CONFIGS["tinyvit-tiny"])
    src = TinyVit(num_classes=10, **cfg)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith("attention_biases"):
                p.fill_(0.5)
    torch.save(src.state_dict(), tmp_path / "ckpt.pth")
    cfg["window_sizes"] = (7, 14, 14, 5)
    dst = TinyVit(num_classes=10, **cfg)
    report = load_init(dst, tmp_path / "ckpt.pth")
    assert set(report.resized) == {k for k in dst.state_dict()
                                   if k.endswith("attention_biases") and not k.startswith("stages.0.")}
    assert dst.stages[1].blocks[0].attn.attention_biases.shape == (2, 196)
    assert dst.stages[3].blocks[0].attn.attention_biases.shape == (4, 25)
    # A constant table stays constant under bicubic resizing.
    torch.testing.assert_close(dst.stages[1].blocks[0].attn.attention_biases, torch.full((2, 196), 0.5))


def test_resize_attention_biases_identity_and_errors():
    table = torch.randn(3, 49)
    torch.testing.assert_close(resize_attention_biases(table, 49), table)
    with pytest.raises(ValueError, match="square"):
        resize_attention_biases(table, 50)


def test_load_init_mismatches(tmp_path):
    torch.save(create_model("tinyvit-tiny", num_classes=10).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_init(create_model("tinyvit-5m", num_classes=10), tmp_path / "tiny.pth")

    sd = create_model("tinyvit-tiny", num_classes=10).state_dict()
    sd["stages.9.extra.weight"] = torch.zeros(1)
    del sd["stages.1.blocks.0.mlp.fc1.weight"]
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"(?s)missing: stages\.1\.blocks\.0\.mlp\.fc1\.weight.*unexpected"):
        load_init(create_model("tinyvit-tiny", num_classes=10), tmp_path / "odd.pth")

    headless = create_model("tinyvit-tiny", num_classes=0).state_dict()
    torch.save(headless, tmp_path / "headless.pth")
    report = load_init(create_model("tinyvit-tiny", num_classes=10), tmp_path / "headless.pth")
    assert sorted(report.dropped_head) == ["head.fc.bias", "head.fc.weight"]

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_init(create_model("tinyvit-tiny", num_classes=10), tmp_path / "list.pth")


# --- against timm itself (only where timm is installed) ---------------------------------------------

@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_matches_timm(tmp_path, name):
    timm = import_timm()
    reference = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000)
    ref_sd = reference.state_dict()
    if "head.norm.weight" not in ref_sd:
        pytest.skip(f"timm {timm.__version__} uses an older TinyViT layout")
    ours = create_model(name, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref_sd.items()}
    if name != "tinyvit-5m":
        return  # names and shapes are enough for the bigger two; outputs are compared on 5m
    randomise(reference)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    report = load_init(ours, tmp_path / "timm.pth")
    assert report.dropped_head == [] and report.resized == []
    reference.eval()
    ours.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for size in (224, 256):  # no stage is smaller than its window at these sizes
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x), atol=1e-4, rtol=1e-4)

"""Tests for distill.models.efficientformer: sizes, timm-compatible state dicts and logits, small
inputs, the distillation head's two modes, and attention-bias tables that follow img_size."""
from __future__ import annotations

import inspect

import pytest
import torch

from distill.models import resize_attention_biases
from distill.models.efficientformer import (
    BUILDERS, CONFIGS, PAPERS, EfficientFormer, Flat, Meta3D, Meta4D, bias_table_index,
)
from tests.helpers.timm_stub import import_timm

# timm 1.0.31, 1,000-class head, both heads.
TIMM_PARAMS = {"efficientformer-l1": 12_289_928, "efficientformer-l3": 31_406_000, "efficientformer-l7": 82_229_328}
TIMM_NAMES = {name: name.replace("-", "_") for name in TIMM_PARAMS}
HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning threads make these forwards ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, num_classes: int = 1000, **kwargs) -> EfficientFormer:
    return BUILDERS[name](num_classes, **kwargs)


def randomise(model: torch.nn.Module) -> None:
    """Make every float tensor non-trivial (BN stats, layer scales, bias tables)."""
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


# --- registry and interface -----------------------------------------------------------------------

def test_builders_and_papers():
    assert set(BUILDERS) == set(PAPERS) == {"efficientformer-mini", "efficientformer-l1",
                                            "efficientformer-l3", "efficientformer-l7"}
    for name, fn in BUILDERS.items():
        assert list(inspect.signature(fn).parameters) == ["num_classes", "img_size", "drop_path_rate"], name
        assert "Li et al." in PAPERS[name]
    assert EfficientFormer.head_keys == HEAD_KEYS


@pytest.mark.parametrize("img_size", [0, 100, 225, -32])
def test_img_size_must_be_multiple_of_32(img_size):
    with pytest.raises(ValueError, match="multiple of 32"):
        build("efficientformer-mini", 10, img_size=img_size)


def test_drop_path_rate_default_and_override():
    assert isinstance(build("efficientformer-mini", 10).stages[3].blocks[2].drop_path1, torch.nn.Identity)
    model = build("efficientformer-mini", 10, drop_path_rate=0.1)
    assert model.stages[3].blocks[2].drop_path1.p == pytest.approx(0.1)   # the last block
    assert isinstance(model.stages[0].blocks[0].drop_path1, torch.nn.Identity)


# --- sizes and layout -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_param_counts_match_timm(name):
    with torch.device("meta"):
        model = build(name)
    assert n_params(model) == TIMM_PARAMS[name]


def test_mini_is_well_under_a_million_params():
    assert n_params(build("efficientformer-mini")) < 600_000


def test_blocks_layout_and_flat_position():
    model = build("efficientformer-mini", 10)
    last = [type(b) for b in model.stages[3].blocks]
    assert last == [Meta4D, Flat, Meta3D]
    assert [type(b) for b in model.stages[0].blocks] == [Meta4D]
    assert isinstance(model.stages[0].downsample, torch.nn.Identity)
    # All blocks of the last stage 3D: Flat comes first (as timm's num_vit >= depth).
    cfg = dict(CONFIGS["efficientformer-mini"], depths=(1, 1, 1, 2), num_vit=2)
    model = EfficientFormer(num_classes=3, img_size=64, **cfg)
    assert [type(b) for b in model.stages[3].blocks] == [Flat, Meta3D, Meta3D]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


# --- against timm (skipped without timm) ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_state_dict_keys_and_shapes_match_timm(name):
    timm = import_timm()
    with torch.device("meta"):
        reference = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000)
        ours = build(name)
    ref = {k: (tuple(v.shape), v.dtype) for k, v in reference.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in ours.state_dict().items()} == ref
    assert list(ours.state_dict()) == list(ref)   # same order too


def test_logits_match_timm_l1():
    timm = import_timm()
    reference = timm.create_model("efficientformer_l1", pretrained=False, num_classes=1000)
    randomise(reference)
    ours = build("efficientformer-l1")
    ours.load_state_dict(reference.state_dict(), strict=True)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference.eval()
        ours.eval()
        assert (ours(x) - reference(x)).abs().max() <= 1e-5
        # Train mode (batch-stat BN, no dropout / drop path), distilled: the same pair of heads.
        reference.train().set_distilled_training(True)
        ours.train().set_distilled_training(True)
        for a, b in zip(ours(x), reference(x)):
            assert (a - b).abs().max() <= 1e-5


# --- forward / backward ---------------------------------------------------------------------------

def resized_state_dict(model: EfficientFormer, img_size: int) -> dict[str, torch.Tensor]:
    """``model``'s state dict with its attention-bias tables resized for ``img_size``."""
    n = (img_size // 32) ** 2
    return {k: resize_attention_biases(v, n) if k.endswith("attention_biases") else v
            for k, v in model.state_dict().items()}


def check_forward(model: EfficientFormer, size: int, batch: int) -> None:
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        feats = model.eval().forward_features(x)
        assert feats.shape == (batch, (size // 32) ** 2, model.num_features)
        out = model(x)
    assert out.shape == (batch, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_forward_at_224_64_32(name):
    torch.manual_seed(0)
    if name == "efficientformer-mini":
        for size in (224, 64, 32):
            check_forward(build(name, 5, img_size=size), size, 1 if size == 224 else 2)
        return
    big = build(name, 5)   # one real build per big variant; the small-size models reuse its weights
    check_forward(big, 224, 1)
    for size in (64, 32):
        with torch.device("meta"):
            model = build(name, 5, img_size=size)
        model.load_state_dict(resized_state_dict(big, size), strict=True, assign=True)
        check_forward(model, size, 1)


def test_mini_backward_at_32():
    torch.manual_seed(0)
    model = build("efficientformer-mini", 7, img_size=32)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7)
    out.square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad


def test_wrong_input_size_is_a_clear_error():
    model = build("efficientformer-mini", 3, img_size=64).eval()
    with pytest.raises(ValueError, match="2x2 final feature map"):
        model(torch.randn(1, 3, 96, 96))


# --- distillation head ----------------------------------------------------------------------------

def test_distillation_head_modes():
    torch.manual_seed(0)
    model = build("efficientformer-mini", 6, img_size=32)
    randomise(model)
    x = torch.randn(3, 3, 32, 32)
    assert model.distilled_training is False

    model.train()
    out = model(x)   # plain training: averaged
    assert isinstance(out, torch.Tensor) and out.shape == (3, 6)

    model.set_distilled_training()
    assert model.distilled_training is True
    cls, dist = model(x)
    assert cls.shape == dist.shape == (3, 6)
    assert not torch.allclose(cls, dist)

    model.eval()   # eval: averaged, even with distilled training set
    with torch.no_grad():
        out = model(x)
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = (model.head(feats) + model.head_dist(feats)) / 2
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, expected)

    model.set_distilled_training(False)
    model.train()
    assert isinstance(model(x), torch.Tensor)


def test_reset_classifier():
    model = build("efficientformer-mini", 10, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (2, model.num_features)
    assert not any(k.startswith("head") for k in model.state_dict())
    model.reset_classifier(4)
    assert model.num_classes == 4 and model(x).shape == (2, 4)
    assert all(k in model.state_dict() for k in HEAD_KEYS)


# --- attention biases and img_size ----------------------------------------------------------------

@pytest.mark.parametrize("size,r", [(32, 1), (64, 2), (224, 7)])
def test_bias_tables_follow_img_size(size, r):
    sd = build("efficientformer-mini", 3, img_size=size).state_dict()
    heads = CONFIGS["efficientformer-mini"]["num_heads"]
    assert sd["stages.3.blocks.2.token_mixer.attention_biases"].shape == (heads, r * r)
    assert sd["stages.3.blocks.2.token_mixer.attention_bias_idxs"].shape == (r * r, r * r)


def test_bias_index_order():
    r = 3
    idx = bias_table_index(r)
    for a in range(r * r):
        for b in range(r * r):
            assert idx[a, b] == abs(a // r - b // r) * r + abs(a % r - b % r)


def test_224_checkpoint_into_64px_model():
    src = build("efficientformer-mini", 3, img_size=224)
    randomise(src)
    sd = src.state_dict()
    dst = build("efficientformer-mini", 3, img_size=64)
    with pytest.raises(RuntimeError, match="attention_biases"):
        dst.load_state_dict(sd)
    key = "stages.3.blocks.2.token_mixer.attention_biases"
    sd[key] = resize_attention_biases(sd[key], 4)
    dst.load_state_dict(sd, strict=True)   # the (49, 49) index in the file is replaced by the model's own
    assert torch.equal(dst.stages[3].blocks[2].token_mixer.attention_bias_idxs, bias_table_index(2))
    del sd["stages.3.blocks.2.token_mixer.attention_bias_idxs"]
    dst.load_state_dict(sd, strict=True)   # a file without the derived index loads too
    with torch.no_grad():
        assert torch.isfinite(dst.eval()(torch.randn(1, 3, 64, 64))).all()


# --- layer-wise lr decay --------------------------------------------------------------------------

def test_layer_lr_scales():
    model = build("efficientformer-mini", 10)
    scales = model.layer_lr_scales(0.5)
    assert set(scales) == {n for n, _ in model.named_parameters()}
    depth = 5   # (1, 1, 1, 2) blocks, Flat not counted
    assert scales["stem.conv1.weight"] == 0.5 ** (depth - 1)
    assert scales["stages.1.downsample.conv.weight"] == scales["stages.1.blocks.0.mlp.fc1.weight"] == 0.5 ** 3
    assert scales["stages.3.blocks.2.token_mixer.qkv.weight"] == 1.0
    assert scales["norm.weight"] == scales["head.weight"] == scales["head_dist.bias"] == 1.0

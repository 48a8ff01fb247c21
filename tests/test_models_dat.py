"""DAT students (distill/models/dat.py): sizes, official layout, deformable attention, small inputs."""
from __future__ import annotations

import inspect
import math
import os
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from distill.models.dat import (
    BUILDERS, CONFIGS, DAT, PAPERS, DAttentionBaseline, LocalAttention, ShiftWindowAttention, reference_points,
)
from tests.helpers.timm_stub import import_timm

# Paper (Table 1 / README): parameters and FLOPs at 224 with a 1,000-class head.
PAPER_PARAMS = {"dat-tiny": 29e6, "dat-small": 50e6, "dat-base": 88e6}
PAPER_GFLOPS = {"dat-tiny": 4.6, "dat-small": 9.0, "dat-base": 15.8}
# Measured here; dat-tiny equals the official v1 code's count (test_matches_official_code).
MEASURED_PARAMS = {"dat-tiny": 28_319_138, "dat-small": 49_700_402, "dat-base": 87_881_632}

# The official CVPR 2022 code: LeapLabTHU/DAT at this commit (the last one before the DAT++ rewrite).
OFFICIAL_COMMIT = "566a593"
OFFICIAL_REPO = os.environ.get("DAT_OFFICIAL_REPO", "/work/.mirror/LeapLabTHU+DAT/repo")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads run these small ops several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial values everywhere learnable (norms, bias tables, offsets), so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("rpe_table", "relative_position_bias_table")):
                p.copy_(0.5 * noise)
            elif "conv_offset.3" in name:
                p.copy_(noise)  # offsets of a pixel or so, tanh partly saturated
            else:
                p.add_(0.02 * noise)


# --- registry and sizes -------------------------------------------------------------------------------

def test_builders_and_papers():
    assert set(BUILDERS) == {"dat-mini", "dat-tiny", "dat-small", "dat-base"} == set(PAPERS)
    assert all("Xia" in p and "2022" in p for p in PAPERS.values())
    for builder in BUILDERS.values():
        sig = inspect.signature(builder)
        assert list(sig.parameters) == ["num_classes", "img_size", "drop_path_rate"]
        assert sig.parameters["img_size"].default == 224 and sig.parameters["drop_path_rate"].default is None


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_param_counts_match_paper(name):
    with torch.device("meta"):
        model = BUILDERS[name](num_classes=1000)
    assert n_params(model) == MEASURED_PARAMS[name]
    assert n_params(model) == pytest.approx(PAPER_PARAMS[name], rel=0.03)


def test_mini_is_well_under_a_million_params_and_keeps_a_deformable_stage():
    model = BUILDERS["dat-mini"](num_classes=1000, img_size=32)
    assert n_params(model) < 750_000
    kinds = [[type(a).__name__ for a in st.attns] for st in model.stages]
    assert "DAttentionBaseline" in kinds[2] and "ShiftWindowAttention" in kinds[0]


@pytest.mark.parametrize("img_size", [0, 100, 225, -32])
def test_img_size_must_be_multiple_of_32(img_size):
    with pytest.raises(ValueError, match="multiple of 32"):
        BUILDERS["dat-mini"](num_classes=10, img_size=img_size)


def test_input_size_must_match_the_built_size():
    model = BUILDERS["dat-mini"](num_classes=10, img_size=32)
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 3, 64, 64))


def test_drop_path_rate_default_and_override():
    with torch.device("meta"):
        model = BUILDERS["dat-tiny"](num_classes=10)
        assert model.stages[3].drop_path[1].p == pytest.approx(0.2)
        assert isinstance(model.stages[0].drop_path[0], torch.nn.Identity)
        assert BUILDERS["dat-base"](num_classes=10).stages[3].drop_path[1].p == pytest.approx(0.5)
        model = BUILDERS["dat-tiny"](num_classes=10, drop_path_rate=0.0)
    assert all(isinstance(m, torch.nn.Identity) for st in model.stages for m in st.drop_path)


# --- forward / backward -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_forward_224_and_flops(name):
    model = BUILDERS[name](num_classes=1000).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    if name in PAPER_GFLOPS:
        # FlopCounterMode counts 2 per multiply-add; the paper's "FLOPs" are multiply-adds.
        assert counter.get_total_flops() / 2e9 == pytest.approx(PAPER_GFLOPS[name], rel=0.03)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_forward_small_sizes(name):
    batch = 2 if name == "dat-mini" else 1
    for size in (32, 64):
        model = BUILDERS[name](num_classes=5, img_size=size).eval()
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            feats = model.forward_features(x)
            assert feats.shape == (batch, model.num_features, size // 32, size // 32)
            out = model.forward_head(feats)
        assert out.shape == (batch, 5) and torch.isfinite(out).all()


def test_mini_backward_at_32():
    torch.manual_seed(0)
    model = BUILDERS["dat-mini"](num_classes=7, img_size=32)
    out = model(torch.randn(4, 3, 32, 32))
    out.square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad


def test_gradient_reaches_the_offset_network():
    torch.manual_seed(0)
    model = BUILDERS["dat-mini"](num_classes=7, img_size=32)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    stage3 = dict(model.stages[2].attns[1].conv_offset.named_parameters())
    assert set(stage3) == {"0.weight", "0.bias", "1.norm.weight", "1.norm.bias", "3.weight"}
    for name, p in stage3.items():
        assert p.grad.abs().sum() > 0, name
    assert model.stages[2].attns[1].rpe_table.grad.abs().sum() > 0
    # Stage 4 is 1 x 1 at 32 px: grid_sample with align_corners=True reads the one pixel wherever it
    # is asked, so the offsets get no gradient there (documented); at 64 px (2 x 2) they do.
    assert model.stages[3].attns[1].conv_offset[3].weight.grad.abs().sum() == 0
    model = BUILDERS["dat-mini"](num_classes=7, img_size=64)
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert model.stages[3].attns[1].conv_offset[3].weight.grad.abs().sum() > 0


def test_reset_classifier_and_head_keys():
    model = BUILDERS["dat-mini"](num_classes=10, img_size=32).eval()
    assert set(DAT.head_keys) <= set(model.state_dict())
    assert model.state_dict()["cls_head.weight"].shape == (10, model.num_features)
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (2, model.num_features)
    model.reset_classifier(4)
    assert model.num_classes == 4 and model(x).shape == (2, 4)


def test_layer_lr_scales_cover_every_parameter():
    model = BUILDERS["dat-mini"](num_classes=10, img_size=32)
    scales = model.layer_lr_scales(0.5)
    assert set(scales) == {n for n, _ in model.named_parameters()}
    depth = sum(CONFIGS["dat-mini"]["depths"])
    assert scales["patch_proj.0.weight"] == scales["stages.0.attns.0.proj_qkv.weight"] == 0.5 ** (depth - 1)
    assert scales["down_projs.0.0.weight"] == scales["stages.0.mlps.1.chunk.linear1.weight"] == 0.5 ** (depth - 2)
    assert scales["stages.3.attns.1.conv_offset.3.weight"] == scales["cls_head.weight"] == 1.0


# --- deformable attention -----------------------------------------------------------------------------

def small_dattn(fmap: int = 8) -> DAttentionBaseline:
    torch.manual_seed(0)
    attn = DAttentionBaseline(fmap, n_heads=4, n_head_channels=8, n_groups=2, stride=1,
                              offset_range_factor=2, use_pe=True, ksize=5)
    randomise(attn)
    return attn.eval()


def test_reference_grid_tiles_minus_one_to_one():
    for h, w in [(1, 1), (2, 3), (7, 7), (14, 5)]:
        ref = reference_points(h, w)
        assert ref.shape == (h, w, 2)
        ys, xs = ref[:, 0, 0], ref[0, :, 1]           # (y, x) order
        # Pixel centres of cells of size 2/h that exactly cover [-1, 1] (align_corners=False convention).
        torch.testing.assert_close(ys, torch.arange(h) * 2 / h - 1 + 1 / h)
        torch.testing.assert_close(xs, torch.arange(w) * 2 / w - 1 + 1 / w)
        assert ys.min() - 1 / h == pytest.approx(-1) and ys.max() + 1 / h == pytest.approx(1)
        assert xs.min() - 1 / w == pytest.approx(-1) and xs.max() + 1 / w == pytest.approx(1)


def test_zero_offsets_sample_at_the_reference_with_align_corners_true():
    attn = small_dattn()
    with torch.no_grad():
        attn.conv_offset[3].weight.zero_()
        q = attn.proj_q(torch.randn(2, 32, 8, 8))
        pos, ref = attn.sampling_points(q)
    assert torch.equal(pos, ref)
    # A map whose value is its x pixel index: bilinear sampling with align_corners=True at the
    # reference x_j reads pixel (x_j + 1) / 2 * (W - 1) = (j + 0.5) (W - 1) / W.
    w = 8
    ramp = torch.arange(w, dtype=torch.float32).expand(1, 1, w, w)
    got = F.grid_sample(ramp, ref[:1, ..., (1, 0)], mode="bilinear", align_corners=True)[0, 0, 0]
    torch.testing.assert_close(got, (torch.arange(w) + 0.5) * (w - 1) / w)


def test_offsets_change_the_sampled_keys():
    attn = small_dattn()
    x = torch.randn(2, 32, 8, 8)
    seen = []
    hook = attn.proj_k.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    with torch.no_grad():
        moved = attn(x)
        pos, ref = attn.sampling_points(attn.proj_q(x))
        attn.conv_offset[3].weight.zero_()
        still = attn(x)
    hook.remove()
    assert (pos - ref).abs().max() > 0.05
    # Offsets stay within offset_range_factor / H (normalised units) of the reference.
    assert (pos - ref).abs().max() <= 2 / 8 + 1e-6
    assert not torch.allclose(seen[0], seen[1], atol=1e-3)      # the sampled keys/values moved
    assert not torch.allclose(moved, still, atol=1e-3)


def test_groups_have_their_own_offsets():
    attn = small_dattn()
    with torch.no_grad():
        pos, _ = attn.sampling_points(attn.proj_q(torch.randn(1, 32, 8, 8)))
    assert pos.shape == (2, 8, 8, 2)                            # (B * groups, Hk, Wk, 2)
    assert not torch.allclose(pos[0], pos[1])


def test_deformable_position_bias_is_bilinear_in_the_displacement():
    attn = small_dattn()
    h = w = 8
    # A table linear in its row index: bilinear sampling reproduces it exactly, so the bias read for
    # (query, point) is the row coordinate of (query - point) / 2 on the 2H - 1 grid, align_corners=True.
    rows = torch.arange(2 * h - 1, dtype=torch.float32).view(1, -1, 1).expand(4, -1, 2 * w - 1)
    scale = torch.tensor([1.0, 2.0, -1.0, 0.5]).view(4, 1, 1)
    with torch.no_grad():
        attn.rpe_table.copy_(rows * scale)
        pos, _ = attn.sampling_points(attn.proj_q(torch.randn(1, 32, h, w)))
        bias = attn.position_bias(pos, h, w)                    # (heads, HW, Ns)
    q = reference_points(h, w).reshape(h * w, 1, 2)
    dy = (q[..., 0] - pos.reshape(2, 1, h * w, 2)[..., 0]) * 0.5   # (groups, HW, Ns)
    expect = (dy + 1) / 2 * (2 * h - 2)
    expect = expect.repeat_interleave(2, dim=0) * scale          # heads 0-1 use group 0's points, 2-3 group 1's
    torch.testing.assert_close(bias, expect, atol=1e-4, rtol=1e-4)


# --- window attention and small maps ------------------------------------------------------------------

def test_windows_clamp_to_small_maps():
    model = BUILDERS["dat-mini"](num_classes=10, img_size=32)
    windows = [st.attns[0].window_size for st in model.stages]
    assert windows == [7, 4, 2, 1]
    assert [st.attns[0].fmap_size for st in model.stages] == [8, 4, 2, 1]
    assert model.stages[0].attns[1].shift_size == 4             # ceil(7 / 2), as the official code
    assert model.stages[1].attns[1].shift_size == 0             # one window covers the map: no shift
    assert torch.equal(model.stages[1].attns[1].attn_mask, torch.zeros(1, 16, 16))
    sd = model.state_dict()
    assert sd["stages.1.attns.0.relative_position_bias_table"].shape == (13 * 13, 2)   # configured window
    assert sd["stages.1.attns.0.relative_position_index"].shape == (16, 16)
    assert sd["stages.2.attns.1.rpe_table"].shape == (4, 3, 3)
    assert sd["stages.3.attns.1.rpe_table"].shape == (8, 1, 1)


def test_smaller_window_reads_the_central_offsets():
    attn = LocalAttention(8, 2, window_size=7, fmap_size=4)
    idx = attn.relative_position_index
    for a in range(16):
        for b in range(16):
            (i, j), (k, l) = divmod(a, 4), divmod(b, 4)
            assert idx[a, b] == (i - k + 6) * 13 + (j - l + 6)


def test_padding_is_masked_out():
    torch.manual_seed(0)
    attn = LocalAttention(8, 2, window_size=7, fmap_size=8).eval()   # 8 x 8 padded to 14 x 14
    randomise(attn)
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        out = attn(x)
        # The bottom-right window holds one real token: it attends to itself only.
        qkv = attn.proj_qkv(x[0, :, 7, 7])
        torch.testing.assert_close(out[0, :, 7, 7], attn.proj_out(qkv[16:]), atol=1e-5, rtol=1e-5)
        # The top-left window is all real: tokens outside it do not matter.
        y = x.clone()
        y[:, :, 7, :] = 5.0
        y[:, :, :, 7] = -5.0
        torch.testing.assert_close(attn(y)[..., :7, :7], out[..., :7, :7])


def swin_shift_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """The official ShiftWindowAttention mask, re-derived: nine slabs, -100 across slabs."""
    img = torch.zeros(size, size)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for n, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
        img[hs, ws] = n
    win = img.reshape(size // window, window, size // window, window).permute(0, 2, 1, 3).reshape(-1, window ** 2)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


@pytest.mark.parametrize("size", [56, 28, 14])
def test_shift_mask_equals_the_official_one(size):
    attn = ShiftWindowAttention(12, 3, window_size=7, fmap_size=size)
    assert attn.shift_size == 4
    assert torch.equal(attn.attn_mask, swin_shift_mask(size, 7, 4))


def test_shifted_block_on_a_single_window_equals_local():
    local = LocalAttention(8, 2, window_size=7, fmap_size=4).eval()
    shifted = ShiftWindowAttention(8, 2, window_size=7, fmap_size=4).eval()
    randomise(local)
    shifted.load_state_dict(local.state_dict(), strict=False)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(shifted(x), local(x))


# --- state-dict layout (the official v1 names) --------------------------------------------------------

def official_keys(cfg: dict) -> set[str]:
    """Keys read by hand off the official v1 models/dat.py + dat_blocks.py (commit 566a593)."""
    keys = {"patch_proj.0.weight", "patch_proj.0.bias", "patch_proj.1.norm.weight", "patch_proj.1.norm.bias"}
    for s, spec in enumerate(cfg["stage_spec"]):
        p = f"stages.{s}"
        for d, kind in enumerate(spec):
            keys |= {f"{p}.layer_norms.{i}.norm.{n}" for i in (2 * d, 2 * d + 1) for n in ("weight", "bias")}
            keys |= {f"{p}.mlps.{d}.chunk.linear{i}.{n}" for i in (1, 2) for n in ("weight", "bias")}
            a = f"{p}.attns.{d}"
            if kind in "LS":
                keys |= {f"{a}.proj_qkv.weight", f"{a}.proj_qkv.bias", f"{a}.proj_out.weight", f"{a}.proj_out.bias",
                         f"{a}.relative_position_bias_table", f"{a}.relative_position_index"}
                if kind == "S":
                    keys.add(f"{a}.attn_mask")
            else:
                keys |= {f"{a}.conv_offset.0.weight", f"{a}.conv_offset.0.bias", f"{a}.conv_offset.1.norm.weight",
                         f"{a}.conv_offset.1.norm.bias", f"{a}.conv_offset.3.weight", f"{a}.rpe_table"}
                keys |= {f"{a}.proj_{n}.{t}" for n in ("q", "k", "v", "out") for t in ("weight", "bias")}
    for i in range(3):
        keys |= {f"down_projs.{i}.0.weight", f"down_projs.{i}.1.norm.weight", f"down_projs.{i}.1.norm.bias"}
    return keys | {"cls_norm.norm.weight", "cls_norm.norm.bias", "cls_head.weight", "cls_head.bias"}


def test_state_dict_keys_follow_the_official_code():
    with torch.device("meta"):
        sd = BUILDERS["dat-tiny"](num_classes=1000).state_dict()
    assert set(sd) == official_keys(CONFIGS["dat-tiny"])
    assert len(sd) == 219
    shapes = {
        "patch_proj.0.weight": (96, 3, 4, 4),
        "stages.0.attns.0.relative_position_bias_table": (169, 3),
        "stages.0.attns.0.relative_position_index": (49, 49),
        "stages.0.attns.1.attn_mask": (64, 49, 49),
        "stages.1.attns.1.attn_mask": (16, 49, 49),
        "stages.2.attns.1.conv_offset.0.weight": (128, 1, 5, 5),     # 3 groups of 128 channels, 5x5 in stage 3
        "stages.2.attns.1.conv_offset.3.weight": (2, 128, 1, 1),
        "stages.2.attns.1.rpe_table": (12, 27, 27),
        "stages.3.attns.1.conv_offset.0.weight": (128, 1, 3, 3),     # 6 groups, 3x3 in stage 4
        "stages.3.attns.1.rpe_table": (24, 13, 13),
        "stages.2.attns.1.proj_q.weight": (384, 384, 1, 1),
        "down_projs.2.0.weight": (768, 384, 2, 2),
        "cls_head.weight": (1000, 768),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def test_key_set_does_not_depend_on_img_size():
    with torch.device("meta"):
        keys = {s: set(BUILDERS["dat-tiny"](num_classes=10, img_size=s).state_dict()) for s in (32, 64, 224, 256)}
    assert keys[32] == keys[64] == keys[224] == keys[256]


def test_adapt_state_dict_loads_a_224_checkpoint_at_64():
    src = BUILDERS["dat-mini"](num_classes=10, img_size=224)
    with torch.no_grad():
        src.stages[2].attns[1].rpe_table.fill_(0.25)
    dst = BUILDERS["dat-mini"](num_classes=10, img_size=64)
    sd = dst.adapt_state_dict(src.state_dict())
    dst.load_state_dict(sd, strict=True)
    assert dst.stages[2].attns[1].rpe_table.shape == (4, 7, 7)
    torch.testing.assert_close(dst.stages[2].attns[1].rpe_table, torch.full((4, 7, 7), 0.25))
    assert torch.equal(dst.stages[0].attns[0].proj_qkv.weight, src.stages[0].attns[0].proj_qkv.weight)
    assert dst(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# --- against the official code (only where its source and timm are at hand) ---------------------------

def rearrange(t: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """The few einops.rearrange patterns the official code uses (einops is not installed here)."""
    lhs, rhs = pattern.split("->")

    def parse(side: str) -> list[list[str]]:
        return [g.split() if g else [n] for g, n in re.findall(r"\(([^)]*)\)|(\S+)", side)]

    left, right = parse(lhs), parse(rhs)
    known = dict(sizes)
    for group, dim in zip(left, t.shape):
        unknown = [n for n in group if n not in known]
        if unknown:
            known[unknown[0]] = dim // math.prod(known[n] for n in group if n in known)
    flat = [n for g in left for n in g]
    t = t.reshape([known[n] for n in flat]).permute([flat.index(n) for g in right for n in g])
    return t.reshape([math.prod(known[n] for n in g) for g in right])


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official v1 ``models/dat.py`` + ``dat_blocks.py``, read from a git copy of LeapLabTHU/DAT
    (``DAT_OFFICIAL_REPO``), imported with timm's old ``timm.models.layers`` and an einops shim."""
    import_timm()                                              # skips without timm
    pkg = tmp_path_factory.mktemp("official") / "dat_official"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("dat.py", "dat_blocks.py"):
        try:
            src = subprocess.run(["git", "-C", OFFICIAL_REPO, "show", f"{OFFICIAL_COMMIT}:models/{name}"],
                                 capture_output=True, text=True, check=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            pytest.skip(f"official DAT source not at {OFFICIAL_REPO} (set DAT_OFFICIAL_REPO to a git copy)")
        (pkg / name).write_text(src)
    saved_einops = sys.modules.get("einops")
    sys.modules["einops"] = types.SimpleNamespace(rearrange=rearrange)
    sys.path.insert(0, str(pkg.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import dat_official.dat as module
    finally:
        sys.path.remove(str(pkg.parent))
        if saved_einops is None:
            sys.modules.pop("einops", None)
        else:
            sys.modules["einops"] = saved_einops
    return module


def official_model(module, name: str, img_size: int = 224):
    cfg = CONFIGS[name]
    kwargs = dict(
        img_size=img_size, dim_stem=cfg["dim_stem"], dims=list(cfg["dims"]), depths=list(cfg["depths"]),
        heads=list(cfg["heads"]), window_sizes=list(cfg["window_sizes"]), groups=list(cfg["groups"]),
        stage_spec=[list(s) for s in cfg["stage_spec"]], use_pes=list(cfg["use_pes"]),
        strides=list(cfg["strides"]), offset_range_factor=list(cfg["offset_range_factor"]),
        dwc_pes=[False] * 4, sr_ratios=[-1] * 4, no_offs=[False] * 4, fixed_pes=[False] * 4,
        use_dwc_mlps=[False] * 4, use_conv_patches=False, drop_path_rate=cfg["drop_path_rate"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.DAT(**kwargs)


@pytest.mark.parametrize("name", ["dat-tiny", "dat-mini"])
def test_matches_official_code(official, name):
    reference = official_model(official, name)
    ours = BUILDERS[name](num_classes=1000)
    ref_sd = reference.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref_sd.items()}
    assert n_params(ours) == n_params(reference)
    # Derived buffers (window index, shift masks) are built identically.
    for key, value in ours.state_dict().items():
        if key.endswith(("relative_position_index", "attn_mask")):
            assert torch.equal(value, ref_sd[key]), key
    randomise(reference)
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.eval()
    ours.eval()
    torch.manual_seed(0)
    x = torch.randn(1 if name == "dat-tiny" else 2, 3, 224, 224)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = reference(x)[0]
        got = ours(x)
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())

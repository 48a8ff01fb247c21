"""Teacher specs: TorchScript, torch.export (.pt2), module:callable, timm; ensembles, temperature,
precision, identity by weights, the expect check and the input-size hint."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import DEMO_TEACHER, REPO
from distill import teachers
from distill.files import UserError, sha256_file

sys.path.insert(0, str(REPO / "tests"))
from helpers.tiny_teacher import build  # noqa: E402
from helpers.timm_stub import import_timm  # noqa: E402

X = torch.rand(4, 3, 32, 32)


def test_all_spec_forms_load_and_agree(tmp_path):
    model = build().eval()
    torch.jit.script(model).save(str(tmp_path / "t.pt"))
    torch.export.save(torch.export.export(model, (X,)), str(tmp_path / "t.pt2"))
    want = torch.softmax(model(X), -1)
    for spec in (str(tmp_path / "t.pt"), str(tmp_path / "t.pt2"), "helpers.tiny_teacher:build"):
        ens = teachers.Ensemble([teachers.TeacherSpec(spec)])
        assert torch.allclose(ens(X), want, atol=1e-5), spec
    assert teachers.TeacherSpec(str(tmp_path / "t.pt2")).kind == "export"
    assert teachers.TeacherSpec("helpers.tiny_teacher:build").identity()["source_sha256"]


def test_ensemble_averages_probabilities_and_temperature_softens():
    a, b = teachers.TeacherSpec(str(DEMO_TEACHER)), teachers.TeacherSpec("helpers.tiny_teacher:build")
    pa, pb = teachers.Ensemble([a])(X), teachers.Ensemble([b])(X)
    assert torch.allclose(teachers.Ensemble([a, b])(X), (pa + pb) / 2, atol=1e-6)
    hot = teachers.Ensemble([a], temperature=4.0)(X)
    assert (hot.max(-1).values < pa.max(-1).values).all()
    idx, val, lp = teachers.topk(pa, 3, torch.tensor([0, 1, 2, 3]))
    assert idx.shape == (4, 3) and torch.allclose(lp, pa[torch.arange(4), torch.tensor([0, 1, 2, 3])])


def test_cpu_teachers_run_unoptimised_graphs_and_need_no_warmup():
    """On CPU every call runs the same TorchScript graph (no profiling-then-optimising first calls whose
    numbers could differ): the executor's optimisation is off inside the call, restored after it."""
    ens = teachers.Ensemble([teachers.TeacherSpec("helpers.tiny_teacher:executor_probe")])
    first, later = ens(X), ens(X)
    assert ens.models[0].seen == [False, False] and torch._C._get_graph_executor_optimize()
    assert not ens.warmup_needed and torch.equal(first, later)
    scripted = teachers.Ensemble([teachers.TeacherSpec(str(DEMO_TEACHER))])
    assert torch.equal(scripted(X), scripted(X)) and torch.equal(scripted(X), scripted(X))


@pytest.mark.parametrize("spec, message", [("nowhere.pt", "not found"), ("no_such_module:x", "cannot import"),
                                           ("helpers.tiny_teacher:missing", "no callable"),
                                           ("helpers.tiny_teacher:not_a_module", "not a torch.nn.Module")])
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        teachers.Ensemble([teachers.TeacherSpec(spec)])


# --- identity is the weights --------------------------------------------------------------------

WEIGHTS_TEACHER = '''
import os
import torch
from helpers.tiny_teacher import Tiny


def build():
    """Weights from the file TEST_TEACHER_WEIGHTS names: a callable that owns its weights."""
    model = Tiny()
    model.load_state_dict(torch.load(os.environ["TEST_TEACHER_WEIGHTS"], weights_only=True))
    return model


def declared():
    model = Tiny()
    model.pretrained_cfg = {"input_size": (3, 64, 64)}
    return model


def declared_default():
    model = Tiny()
    model.default_cfg = {"input_size": (3, 64, 64)}
    return model


def unseeded():
    return Tiny()
'''


@pytest.fixture
def tt_module(tmp_path, monkeypatch):
    """The module ``tt_weights_teacher`` (WEIGHTS_TEACHER) importable from tmp_path, freshly imported."""
    (tmp_path / "tt_weights_teacher.py").write_text(WEIGHTS_TEACHER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tt_weights_teacher", raising=False)


@pytest.fixture
def weights_teacher(tmp_path, monkeypatch, tt_module):
    """A ``tt_weights_teacher:build`` callable whose weights come from a file; returns a writer of
    that file (state dict -> path)."""
    path = tmp_path / "weights.pth"
    monkeypatch.setenv("TEST_TEACHER_WEIGHTS", str(path))

    def write(state):
        torch.save(state, path)
    return write


def test_weights_digest_covers_names_dtypes_shapes_and_bytes():
    def digest_of(**buffers):
        m = torch.nn.Module()
        for name, t in buffers.items():
            m.register_buffer(name, t)
        return teachers.weights_digest(m)
    base = digest_of(a=torch.zeros(4), b=torch.ones(2))
    assert base == digest_of(b=torch.ones(2), a=torch.zeros(4))          # sorted-name order
    assert base != digest_of(a=torch.zeros(4, dtype=torch.int32), b=torch.ones(2))   # same bytes, other dtype
    assert base != digest_of(a=torch.zeros(2, 2), b=torch.ones(2))       # same bytes, other shape
    assert base != digest_of(c=torch.zeros(4), b=torch.ones(2))          # other name
    assert base != digest_of(a=torch.tensor([0.0, 0.0, 1e-7, 0.0]), b=torch.ones(2))
    assert digest_of(a=torch.zeros(4, 4).t(), b=torch.ones(2, dtype=torch.bfloat16))   # non-contiguous, bf16


def test_callable_identity_follows_its_weights(weights_teacher):
    state = build().state_dict()
    weights_teacher(state)
    spec = teachers.TeacherSpec("tt_weights_teacher:build")
    first = spec.identity()
    assert first == spec.identity()                                      # same weights, same identity
    assert first["weights_sha256"] == teachers.weights_digest(build())
    state["fc.bias"][3] += 0.01                                          # one weight changes ...
    weights_teacher(state)
    second = spec.identity()
    assert second["weights_sha256"] != first["weights_sha256"]           # ... and so does the identity
    assert second["source_sha256"] == first["source_sha256"]             # (the source did not)


def test_callable_identity_digests_the_state_after_the_checkpoint(tmp_path):
    state = build().state_dict()
    state["conv.weight"][0, 0, 0, 0] = 5.0
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    ident = teachers.TeacherSpec("helpers.tiny_teacher:build", str(tmp_path / "ckpt.pth")).identity()
    want = build()
    want.load_state_dict(state)
    assert ident["weights_sha256"] == teachers.weights_digest(want) != teachers.weights_digest(build())
    assert ident["checkpoint_sha256"]


def test_a_ddp_saved_checkpoint_loads_as_teacher_weights_like_through_init(tmp_path):
    """One reader for every weights file: keys prefixed ``module.`` (a DDP-wrapped model's) load through
    --teacher-checkpoint as through --init, to the same weights as the unprefixed file."""
    from distill.models import read_state_dict

    state = build().state_dict()
    state["conv.weight"][0, 0, 0, 0] = 5.0
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    torch.save(state, tmp_path / "plain.pth")
    assert read_state_dict(tmp_path / "ddp.pth").keys() == state.keys()
    ddp = teachers.TeacherSpec("helpers.tiny_teacher:build", str(tmp_path / "ddp.pth")).identity()
    plain = teachers.TeacherSpec("helpers.tiny_teacher:build", str(tmp_path / "plain.pth")).identity()
    assert ddp["weights_sha256"] == plain["weights_sha256"] != teachers.weights_digest(build())


def test_every_kind_has_weights_sha256(tmp_path):
    model = build().eval()
    torch.jit.script(model).save(str(tmp_path / "t.pt"))
    torch.export.save(torch.export.export(model, (X,)), str(tmp_path / "t.pt2"))
    specs = teachers.make_specs([str(tmp_path / "t.pt"), str(tmp_path / "t.pt2"), "helpers.tiny_teacher:build"])
    idents = teachers.identity(specs)
    assert all(len(i["weights_sha256"]) == 64 for i in idents)
    assert idents[0]["weights_sha256"] == sha256_file(tmp_path / "t.pt")


def test_callable_weights_are_seeded_and_leave_the_callers_rng_alone(tt_module):
    spec = teachers.TeacherSpec("tt_weights_teacher:unseeded")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    assert spec.identity()["weights_sha256"] == spec.identity()["weights_sha256"]
    assert torch.equal(torch.random.get_rng_state(), before)


# --- expect: workers prove they loaded the driver's weights ------------------------------------------

def test_expect_accepts_the_same_weights_and_refuses_others(weights_teacher, tmp_path):
    state = build().state_dict()
    weights_teacher(state)
    torch.jit.script(build().eval()).save(str(tmp_path / "t.pt"))
    specs = teachers.make_specs(["tt_weights_teacher:build", str(tmp_path / "t.pt")])
    expect = teachers.identity(specs)
    ens = teachers.Ensemble(specs, expect=expect)
    assert ens(X).shape == (4, 10) and ens.identity() == expect           # the loaded models, no reload
    wrong = [dict(expect[0]), dict(expect[1], weights_sha256="0" * 64)]
    with pytest.raises(UserError, match=f"{tmp_path / 't.pt'} loaded with other weights than the run expects"):
        teachers.Ensemble(specs, expect=wrong)
    state["fc.weight"][0, 0] += 1.0                                      # weights change after identity
    weights_teacher(state)
    with pytest.raises(UserError, match="tt_weights_teacher:build loaded with other weights.*sha256 [0-9a-f]+ != "):
        teachers.Ensemble(specs, expect=expect)
    with pytest.raises(UserError, match="1 expected teacher identities for 2"):
        teachers.Ensemble(specs, expect=expect[:1])


# --- precision --------------------------------------------------------------------------------------

def test_resolve_precision():
    assert teachers.resolve_precision(None, "cpu") == "fp32"
    assert teachers.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert teachers.resolve_precision(None, torch.device("cuda")) == "bf16"
    assert teachers.resolve_precision("auto", "cuda:1") == "bf16"
    assert teachers.resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(UserError, match="'float16'.*fp32, bf16, fp16"):
        teachers.resolve_precision("float16", "cpu")
    with pytest.raises(UserError, match="fp32, bf16, fp16"):
        teachers.Ensemble([teachers.TeacherSpec(str(DEMO_TEACHER))], precision="half")


@pytest.mark.parametrize("spec", [str(DEMO_TEACHER), "helpers.tiny_teacher:build"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_is_close_to_fp32_and_returns_float32(spec, precision):
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = teachers.Ensemble([teachers.TeacherSpec(spec)], precision="fp32")(x)
    low_ens = teachers.Ensemble([teachers.TeacherSpec(spec)], precision=precision, temperature=2.0)
    low = low_ens(x)
    assert low_ens.precision == precision and low.dtype == ref.dtype == torch.float32
    ref2 = teachers.Ensemble([teachers.TeacherSpec(spec)], temperature=2.0)(x)
    diff = (low - ref2).abs().max().item()
    assert 0 < diff < 0.02                                      # autocast ran, and only rounding differs
    assert torch.allclose(low.sum(-1), torch.ones(16), atol=1e-5)
    if spec == str(DEMO_TEACHER):                               # a trained model: margins survive rounding
        assert torch.equal(low.argmax(-1), ref.argmax(-1))


def test_precision_this_torch_cannot_autocast_is_refused(monkeypatch):
    class NoCast:                                               # an autocast that leaves dtypes alone
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(teachers.torch, "autocast", NoCast)
    with pytest.raises(UserError, match="precision fp16 is not supported on cpu"):
        teachers.Ensemble([teachers.TeacherSpec(str(DEMO_TEACHER))], precision="fp16")
    assert teachers.Ensemble([teachers.TeacherSpec(str(DEMO_TEACHER))], precision="fp32")(X).shape == (4, 10)


# --- input size hint ----------------------------------------------------------------------------

def test_input_size_hint(tmp_path, tt_module):
    model = build().eval()
    torch.jit.script(model).save(str(tmp_path / "t.pt"))
    torch.export.save(torch.export.export(model, (X,)), str(tmp_path / "t32.pt2"))
    torch.export.save(torch.export.export(model, (torch.rand(1, 3, 48, 48),)), str(tmp_path / "t48.pt2"))
    hint = lambda *specs: teachers.input_size_hint(teachers.make_specs(specs))  # noqa: E731
    assert hint(str(tmp_path / "t32.pt2")) == 32
    assert hint(str(tmp_path / "t48.pt2")) == 48
    assert hint(str(tmp_path / "t32.pt2"), str(tmp_path / "t32.pt2")) == 32
    assert hint(str(tmp_path / "t.pt")) is None
    assert hint("helpers.tiny_teacher:build") is None
    assert hint("tt_weights_teacher:declared") == hint("tt_weights_teacher:declared_default") == 64
    assert hint(str(tmp_path / "t32.pt2"), str(tmp_path / "t48.pt2")) is None       # members disagree
    assert hint(str(tmp_path / "t32.pt2"), str(tmp_path / "t.pt")) is None          # one does not say


# --- timm (only where timm is installed; a stub torchvision stands in for a missing one) -------------

TIMM_SPEC = "timm:test_vit"         # timm's own tiny test model (0.4 M parameters, 160 px)


def test_timm_without_timm_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)          # import timm -> ImportError
    with pytest.raises(UserError, match="distill\\[timm\\]"):
        teachers.Ensemble(teachers.make_specs([TIMM_SPEC], random_weights=True))


def test_timm_without_checkpoint_needs_the_random_weights_opt_in():
    timm = import_timm()
    with pytest.raises(UserError, match="timm:test_vit has no --teacher-checkpoint: its weights would be random"):
        teachers.Ensemble(teachers.make_specs([TIMM_SPEC]))
    with pytest.raises(UserError, match="--teacher-random-weights"):
        teachers.identity(teachers.make_specs([TIMM_SPEC]))
    specs = teachers.make_specs([TIMM_SPEC], random_weights=True)
    assert specs[0].random_weights
    before = torch.random.get_rng_state()
    a, b = teachers.identity(specs)[0], teachers.identity(specs)[0]
    assert a == b and a["random_weights"] and a["timm_version"] == timm.__version__
    assert torch.equal(torch.random.get_rng_state(), before)
    x = torch.rand(2, 3, 160, 160)
    pa, pb = teachers.Ensemble(specs, expect=[a])(x), teachers.Ensemble(specs, expect=[b])(x)
    assert pa.shape == (2, 1000) and torch.equal(pa, pb)


def test_timm_checkpoint_sets_the_weights_and_the_identity(tmp_path):
    import_timm()
    random_spec = teachers.TeacherSpec(TIMM_SPEC, random_weights=True)
    model = teachers.load_module(random_spec)
    state = model.state_dict()
    state["head.bias"][7] = 3.0
    torch.save(state, tmp_path / "vit.pth")
    spec = teachers.TeacherSpec(TIMM_SPEC, str(tmp_path / "vit.pth"))
    model.load_state_dict(state)
    ident = spec.identity()
    assert ident["weights_sha256"] == teachers.weights_digest(model) != random_spec.identity()["weights_sha256"]
    assert "random_weights" not in ident
    probs = teachers.Ensemble([spec], expect=[ident])(torch.rand(2, 3, 160, 160))
    assert torch.equal(probs.argmax(-1), torch.tensor([7, 7]))


def test_timm_input_size_hint_is_timms_default():
    timm = import_timm()
    want = timm.create_model(TIMM_SPEC[5:]).pretrained_cfg["input_size"][-1]
    # the architecture declares it: no checkpoint is loaded (make_specs would refuse a checkpoint-less spec)
    assert teachers.input_size_hint([teachers.TeacherSpec(TIMM_SPEC)]) == want == 160

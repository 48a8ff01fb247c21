"""Teacher specs: TorchScript, torch.export (.pt2), module:callable, ensembles, temperature, identity."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import DEMO_TEACHER, REPO
from distill import teachers
from distill.files import UserError

sys.path.insert(0, str(REPO / "tests"))
from helpers.tiny_teacher import build  # noqa: E402

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


@pytest.mark.parametrize("spec, message", [("nowhere.pt", "not found"), ("no_such_module:x", "cannot import"),
                                           ("helpers.tiny_teacher:missing", "no callable"),
                                           ("helpers.tiny_teacher:not_a_module", "not a torch.nn.Module")])
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        teachers.Ensemble([teachers.TeacherSpec(spec)])


def test_timm_spec_needs_the_extra_or_works():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="distill\\[timm\\]"):
            teachers.Ensemble([teachers.TeacherSpec("timm:resnet18")])
    else:
        ens = teachers.Ensemble([teachers.TeacherSpec("timm:resnet18")])
        assert ens(X).shape == (4, 1000)

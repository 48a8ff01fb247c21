"""No code from data (issue 27): a teacher file or a downloaded cache runs no code of its own when distill
loads it. A ``.pt2`` program whose parts would run code on load (a pickle that is not plain tensors, guard
or shape-expression code) is refused; ``verify --recompute`` imports no callable and loads no TorchScript
file a manifest names unless the user names the teacher (``--teacher``)."""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import DEMO_POLICY, DEMO_TEACHER, REPO, cache_config, demo_head, run_group, one_line_error
from distill import teachers
from distill.cache import cache_teacher
from distill.files import UserError
from distill.format import MANIFEST_NAME

sys.path.insert(0, str(REPO / "tests"))
from helpers.tiny_teacher import build  # noqa: E402

X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
SYMBOL = "Symbol('s77', positive=True, integer=True)"


class Touch:
    """Unpickled, it creates ``path`` (a stand-in for any code a crafted pickle runs)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _cli(*args, env=None, timeout=300):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return run_group([sys.executable, "-m", "distill.cli", *map(str, args)], env=env, timeout=timeout)


def _export(path: Path) -> Path:
    """A real program (the tiny teacher, dynamic batch) as torch.export.save writes it."""
    ep = torch.export.export(build().eval(), (torch.zeros(2, 3, 32, 32),),
                             dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(ep, str(path))
    return path


def _rewrite(src: Path, dst: Path, change: dict, add: dict | None = None) -> Path:
    """A copy of the archive ``src`` with members changed ({name under the archive's root: new bytes, or
    a function of the old ones}) and members added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            new = change.get(info.filename.split("/", 1)[1], data)
            zout.writestr(info, new(data) if callable(new) else new)
        for name, data in (add or {}).items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def _json_edit(fn):
    def edit(data: bytes) -> bytes:
        doc = json.loads(data)
        fn(doc)
        return json.dumps(doc).encode()
    return edit


def _torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _pickled_weight(marker):
    def use_pickle(doc):
        doc["config"]["conv.weight"].update(use_pickle=True, tensor_meta=None)
    return {"data/weights/model_weights_config.json": _json_edit(use_pickle),
            "data/weights/weight_0": _torch_saved(Touch(marker))}, {}


def _opaque_constant(marker):
    def opaque(doc):
        doc["config"]["c"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    return ({"data/constants/model_constants_config.json": _json_edit(opaque)},
            {"data/constants/opaque_obj_0": pickle.dumps(Touch(marker))})


def _shape_expression(marker):
    code = f"__import__('pathlib').Path({str(marker)!r}).touch() or {SYMBOL}"
    return {"models/model.json": lambda d: d.replace(json.dumps(SYMBOL)[1:-1].encode(), json.dumps(code)[1:-1].encode())}, {}


def _guard_code(marker):
    def guard(doc):
        doc["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch() is None"]
    return {"models/model.json": _json_edit(guard)}, {}


CRAFTED = {
    "sample inputs": lambda marker: ({"data/sample_inputs/model.pt": _torch_saved(Touch(marker))}, {}),
    "pickled weight": _pickled_weight,
    "opaque constant": _opaque_constant,
    "shape expression": _shape_expression,
    "guard code": _guard_code,
}


def _crafted(tmp_path: Path, how: str) -> tuple[Path, Path]:
    marker = tmp_path / "ran"
    change, add = CRAFTED[how](marker)
    return _rewrite(_export(tmp_path / "ok.pt2"), tmp_path / "crafted.pt2", change, add), marker


def _legacy(tmp_path: Path) -> tuple[Path, Path]:
    """torch.export.save's old layout (a zip with ``version`` at its top), whose load unpickles fully
    what the weights-only load refuses."""
    from torch._export.serde.schema import SCHEMA_VERSION
    marker = tmp_path / "ran"
    with zipfile.ZipFile(_export(tmp_path / "ok.pt2")) as z:
        program = next(z.read(n) for n in z.namelist() if n.endswith("models/model.json"))
    with zipfile.ZipFile(tmp_path / "legacy.pt2", "w") as z:
        z.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        z.writestr("serialized_exported_program.json", program)
        z.writestr("serialized_state_dict.pt", _torch_saved({}))
        z.writestr("serialized_constants.pt", _torch_saved({}))
        z.writestr("serialized_example_inputs.pt", _torch_saved(Touch(marker)))
    return tmp_path / "legacy.pt2", marker


# ----------------------------------------------------------------------------- .pt2 programs

@pytest.mark.parametrize("how", [*CRAFTED, "legacy layout"])
def test_a_crafted_pt2_is_refused_without_running_its_code(tmp_path, how):
    path, marker = _legacy(tmp_path) if how == "legacy layout" else _crafted(tmp_path, how)
    with pytest.raises(UserError, match="refusing .pt2 teacher") as e:
        teachers.load_module(teachers.TeacherSpec(str(path)))(X)
    assert "\n" not in str(e.value)
    assert not marker.exists(), f"the crafted {how} ran on load"


def test_cache_teacher_given_a_crafted_pt2_exits_2_and_runs_nothing(tmp_path):
    path, marker = _crafted(tmp_path, "sample inputs")
    shards = demo_head(tmp_path, 16)
    r = _cli("cache-teacher", "--shards", shards, "--teacher", path, "--teacher-input-size", "32",
             "--out", tmp_path / "c", "--epochs", "1", "--workers", "1", "--threads", "1", "--quiet")
    one_line_error(r, "refusing .pt2 teacher", str(path), "data/sample_inputs/model.pt")
    assert not marker.exists()
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()


def test_a_crafted_adapted_teacher_directory_is_refused(tmp_path):
    from distill.format import read_teacher_json
    adapted = tmp_path / "adapted"
    adapted.mkdir()
    path, marker = _crafted(tmp_path, "sample inputs")
    path.rename(adapted / "teacher.pt2")
    doc = {"format": "distill-adapted-teacher", "version": 1, "file": "teacher.pt2", "input_size": 32,
           "mean": [0.5] * 3, "std": [0.5] * 3}
    (adapted / "teacher.json").write_text(json.dumps(doc))
    assert read_teacher_json(str(adapted))
    with pytest.raises(UserError, match="refusing .pt2 teacher"):
        teachers.load_module(teachers.TeacherSpec(str(adapted)))
    assert not marker.exists()
    (adapted / "teacher.json").write_text(json.dumps(dict(doc, file="teacher.pt")))     # a TorchScript file
    torch.jit.script(build().eval()).save(str(adapted / "teacher.pt"))
    with pytest.raises(UserError, match="names 'teacher.pt'.*a .pt2 program"):
        teachers.load_module(teachers.TeacherSpec(str(adapted)))


def test_a_legit_pt2_loads_and_gives_the_modules_logits(tmp_path):
    path = _export(tmp_path / "ok.pt2")
    model = build().eval()
    got = teachers.load_module(teachers.TeacherSpec(str(path)))
    with torch.no_grad():
        assert torch.equal(got(X), torch.export.load(str(path)).module()(X))     # what torch's own load gives
        assert torch.allclose(got(X), model(X), atol=1e-5)
    assert teachers.input_size_hint([teachers.TeacherSpec(str(path))]) == 32


# ----------------------------------------------------------------------------- verify --recompute

@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, ray_local):
    """A cache of the demo (TorchScript) teacher over 48 samples, and its shards."""
    tmp = tmp_path_factory.mktemp("nocode")
    shards = demo_head(tmp, 48)
    cache_teacher(cache_config(shards, tmp / "cache", epochs=1), DEMO_POLICY)
    return tmp / "cache", shards


def _copy_with_member(cache: Path, dst: Path, **member) -> Path:
    """A copy of the cache whose manifest names another teacher member, made consistent as a hostile
    cache would be (run_id, the files' footers and checksums): every check but the teacher's passes."""
    import hashlib
    import shutil
    from distill import format as F
    shutil.copytree(cache, dst)
    m = json.loads((dst / MANIFEST_NAME).read_text())
    m["teacher"]["members"][0].update(member)
    m["run_id"] = F.run_id_of(F.manifest_identity(m))
    for e in m["shards"]:
        t = F.read_ipc(dst / e["file"])
        data = F.ipc_bytes(t.replace_schema_metadata({**t.schema.metadata, F.ARROW_RUN_ID_KEY: m["run_id"].encode()}))
        (dst / e["file"]).write_bytes(data)
        e.update(file_bytes=len(data), file_sha256=hashlib.sha256(data).hexdigest())
    (dst / MANIFEST_NAME).write_text(json.dumps(m))
    return dst


IMPORT_MARKER = '''
from pathlib import Path
Path(__file__).with_name("imported").touch()
from helpers.tiny_teacher import build
'''


def test_verify_imports_no_callable_a_manifest_names(small_cache, tmp_path):
    cache, _ = small_cache
    mod = tmp_path / "mod"
    mod.mkdir()
    (mod / "manifest_teacher.py").write_text(IMPORT_MARKER)
    bad = _copy_with_member(cache, tmp_path / "cache", spec="manifest_teacher:build", kind="callable")
    env = {"PYTHONPATH": os.pathsep.join([str(mod), str(REPO / "tests")])}
    r = _cli("verify", bad, "--recompute", "4", env=env)
    one_line_error(r, "manifest_teacher:build", "--teacher SPEC")
    assert not (mod / "imported").exists()
    ok = _cli("verify", bad, "--recompute", "4", "--teacher", DEMO_TEACHER, env=env)
    assert ok.returncode == 0 and "recomputed 4 records" in ok.stdout, ok.stderr[-2000:]
    assert not (mod / "imported").exists()


def test_verify_loads_no_torchscript_file_a_manifest_names(small_cache):
    from distill.cache import verify_cache
    cache, _ = small_cache
    with pytest.raises(UserError, match="TorchScript.*--teacher SPEC"):
        verify_cache(cache, recompute=2)
    assert verify_cache(cache).ok                                          # no recompute: no teacher needed
    res = verify_cache(cache, recompute=2, teacher=(str(DEMO_TEACHER),))
    assert res.ok and res.recomputed == 2, res.summary()


def test_verify_takes_a_pt2_teacher_from_the_manifest(tmp_path, ray_local):
    from distill.cache import verify_cache
    shards = demo_head(tmp_path, 32)
    path = _export(tmp_path / "teacher.pt2")
    cache_teacher(cache_config(shards, tmp_path / "c", epochs=1, teacher=(str(path),)), DEMO_POLICY)
    res = verify_cache(tmp_path / "c", recompute=3)
    assert res.ok and res.recomputed == 3 and res.top1_agreement == 1.0, res.summary()

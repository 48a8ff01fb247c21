"""adapt-teacher end to end on the real demo shards: the teacher directory, resume, the directory as
--scorer/--teacher of filter-labels and cache-teacher (real Ray), one-line refusals (exit 2)."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from conftest import DEMO_DIR, DEMO_POLICY, REPO, cache_config, demo_subset
from distill import cli
from distill.adapt import adapt_teacher
from distill.config import AdaptConfig, build, load_pipeline
from distill.files import UserError
from distill.format import read_teacher_json

sys.path.insert(0, str(REPO / "tests"))


def _cfg(tmp, out, **kw) -> AdaptConfig:
    base = dict(base="vit-mini", shards=str(tmp / "train"), val_shards=str(tmp / "val"), method="repadapter",
                out=str(out), epochs=1, batch_size=64, image_size=32, loader_workers=0, quiet=True)
    base.update(kw)
    return AdaptConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapt")
    demo_subset(tmp, ["train-000000.tar"])
    demo_subset(tmp, ["val-000000.tar"], "val")
    return tmp


@pytest.fixture(scope="module")
def adapted(data):
    """One RepAdapter run (vit-mini, 32 px, 1 epoch on one demo shard), shared by the tests below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = adapt_teacher(_cfg(data, data / "teacher", adapter_scale=2.0), DEMO_POLICY)
    finally:
        torch.set_num_threads(threads)
    return data, res


def test_teacher_directory(adapted):
    tmp, res = adapted
    out = tmp / "teacher"
    doc = read_teacher_json(out)
    assert res.complete and doc == res.teacher
    assert doc["input_size"] == 32 and doc["classes"] == [f"digit_{i}" for i in range(10)]
    assert doc["method"] == "repadapter" and doc["base"]["spec"] == "vit-mini" and len(doc["base"]["weights_sha256"]) == 64
    m = doc["metrics"]
    assert m["merge_max_abs_logit_diff"] <= 1e-4 and m["merge_checked_images"] > 100
    assert m["export_max_abs_logit_diff"] <= 1e-5
    assert doc["params"] == doc["base"]["params"] + 64 * 10 + 10          # merged: the base's + the new head
    assert 0 < m["trained_params"] == res.trained_params < 0.05 * doc["params"]
    assert m["memory"]["activations_bytes"] > 0 and m["memory"]["train_step_bytes"] > m["memory"]["params_bytes"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["val_top1"] is not None
    state = torch.load(out / "weights.pth", weights_only=True)
    assert not any("adapter" in k for k in state) and "blocks.0.attn.qkv.weight" in state
    program = torch.export.load(out / "teacher.pt2").module()
    assert program(torch.zeros(5, 3, 32, 32)).shape == (5, 10)            # any batch size


def test_resume_continues_exactly(data, tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(data, tmp_path / "a", method="attn-only", epochs=2)
    first = adapt_teacher(cfg, DEMO_POLICY, stop_after=1)
    assert not first.complete and not (tmp_path / "a" / "teacher.json").exists()
    with pytest.raises(UserError, match="--resume"):
        adapt_teacher(cfg, DEMO_POLICY)
    resumed = adapt_teacher(dataclasses.replace(cfg, resume=True), DEMO_POLICY)
    straight = adapt_teacher(dataclasses.replace(cfg, out=str(tmp_path / "b")), DEMO_POLICY)
    a = torch.load(tmp_path / "a" / "weights.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "weights.pth", weights_only=True)
    assert resumed.complete and all(torch.equal(a[k], b[k]) for k in b)
    assert resumed.val_top1 == straight.val_top1


def test_directory_drives_filter_and_cache(adapted, ray_local):
    """--scorer OUT / --teacher OUT: input size and mean/std from teacher.json, the program's sha256 in the
    manifests (the same as teacher.json's)."""
    from distill.cache import cache_teacher, open_cache
    from distill.config import FilterConfig
    from distill.filter import filter_labels
    tmp, res = adapted
    teacher = str(tmp / "teacher")
    sha = res.teacher["weights_sha256"]
    f = filter_labels(FilterConfig(shards=str(tmp / "train"), scorer=(teacher,), out=str(tmp / "filter"), topk=5,
                                   quiet=True, workers=1, threads=1))
    assert not f.failed
    scoring = json.loads((tmp / "filter" / "scoring" / "manifest.json").read_text())
    c = cache_teacher(cache_config(tmp / "train", tmp / "cache", teacher=(teacher,), teacher_input_size=0,
                                   exclude=str(tmp / "filter"), epochs=1), DEMO_POLICY)
    assert not c.failed
    for manifest in (scoring, open_cache(tmp / "cache").manifest):
        t = manifest["teacher"]
        member = t["members"][0]
        assert member["kind"] == "directory" and member["weights_sha256"] == sha and member["method"] == "repadapter"
        assert t["input_size"] == 32 and t["mean"] == res.teacher["mean"]


def _main(argv, capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err.strip()


def _flags(tmp, out, *extra):
    return ["adapt-teacher", "--shards", str(tmp / "train"), "--val-shards", str(tmp / "val"), "--out", str(out),
            "--image-size", "32", "--epochs", "1", "--loader-workers", "0", "--quiet", *extra]


def test_not_vit_like_base_exit_2(data, tmp_path, capsys):
    rc, err = _main(_flags(data, tmp_path / "o", "--base", "helpers.tiny_teacher:build", "--method", "attn-only"), capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "not ViT-like" in err
    assert not (tmp_path / "o").exists()                      # refused before anything is written


def test_callable_vit_base_trains(data, tmp_path, capsys):
    rc = cli.main(_flags(data, tmp_path / "o", "--base", "helpers.tiny_vit:build", "--method", "linear"))
    assert rc == 0 and read_teacher_json(tmp_path / "o")["base"]["spec"] == "helpers.tiny_vit:build"


def test_checkpoint_keys_not_matching_exit_2(data, tmp_path, capsys):
    from distill.models.vit import VisionTransformer
    other = VisionTransformer(num_classes=10, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    rc, err = _main(_flags(data, tmp_path / "o", "--base", "vit-mini", "--base-checkpoint", str(tmp_path / "other.pth")),
                    capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--base-checkpoint" in err and "shape mismatch" in err
    from safetensors.torch import save_file
    state = {k.replace("blocks.", "layers."): v for k, v in other.state_dict().items()}
    save_file(state, str(tmp_path / "renamed.safetensors"))
    rc, err = _main(_flags(data, tmp_path / "o", "--base", "vit-mini", "--base-checkpoint",
                           str(tmp_path / "renamed.safetensors")), capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "unexpected" in err


def test_class_mismatch_exit_2(data, tmp_path, capsys):
    from distill.format import ShardIndex
    val = demo_subset(tmp_path, ["val-000000.tar"], "val")
    index = ShardIndex.read(val)
    ShardIndex(classes=index.classes[:9] + ["ten"], shards=index.shards).write(val)
    flags = _flags(data, tmp_path / "o", "--base", "vit-mini")
    flags[flags.index("--val-shards") + 1] = str(val)
    rc, err = _main(flags, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "classes differ" in err and "digit_9 vs ten" in err


def test_pipeline_table():
    pipe = load_pipeline(REPO / "pipelines" / "adapt.toml")
    cfg = build(AdaptConfig, pipe.stage_layer("adapt-teacher"))
    assert cfg.val_shards == "shards/demo/val" and cfg.base == "vit-mini"
    assert pipe.stages["cache-teacher"]["teacher"] == [cfg.out]
    with pytest.raises(UserError, match="unknown key 'adaptor-dim'"):
        build(AdaptConfig, dict(pipe.stage_layer("adapt-teacher"), **{"adaptor-dim": 4}))

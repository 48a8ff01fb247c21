"""Every student family trains from a real cache with the existing loop: sparse soft targets with
Mixup/CutMix replay, loss falling; EfficientFormer's distillation head learns from the cache; the
class relations of a finished run against its teacher."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.config import CacheConfig, TrainConfig
from distill.format import RUN_CLASS_STATS_NAME
from distill.models import create_model, load_init
from distill.train import train_student

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "shards" / "demo"
TEACHER = DEMO / "teacher.pt"
TRAIN1 = str(DEMO / "train" / "train-000000.tar")
VAL1 = str(DEMO / "val" / "val-000000.tar")
MIX_POLICY = {"size": 32, "scale": [0.35, 1.0], "hflip": 0.0, "auto_augment": "rand-n1-m5-mstd0.5-inc1",
              "re_prob": 0.0, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 0.5, "mix_block": 16}
FAMILIES = ["tinyvit-tiny", "efficientformer-mini", "vit-mini", "dat-mini"]

pytestmark = pytest.mark.skipif(not TEACHER.is_file(), reason="demo shards/teacher not generated")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the 2-core test machine runs these small models faster that way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, ray_local) -> Path:
    from distill.cache import cache_teacher   # test side only: the trainer never imports it
    out = tmp_path_factory.mktemp("students") / "cache"
    res = cache_teacher(CacheConfig(shards=TRAIN1, teacher=(str(TEACHER),), out=str(out), epochs=2, topk=5,
                                    teacher_input_size=32, quiet=True, workers=1, threads=1), MIX_POLICY)
    assert not res.failed and res.samples == 360
    return out


def _train(cache_dir, out, model, **kw):
    cfg = dict(shards=TRAIN1, cache=str(cache_dir), val_shards=VAL1, out=str(out), model=model, image_size=32,
               epochs=3, batch_size=32, lr=2e-3, warmup_epochs=0.3, quiet=True, recipe="none", seed=0)
    cfg.update(kw)
    return train_student(TrainConfig(**cfg))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", FAMILIES)
def test_each_family_learns_from_the_cache(cache_dir, tmp_path, model):
    res = _train(cache_dir, tmp_path / "run", model)
    rows = _rows(tmp_path / "run")
    assert res.complete and len(rows) == 3
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], [r["train_loss"] for r in rows]
    assert (tmp_path / "run" / RUN_CLASS_STATS_NAME).exists()
    # the saved weights load back into the registered model (strict keys, derived buffers aside)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    torch.save(state, tmp_path / "w.pth")
    assert load_init(create_model(model, num_classes=10, img_size=32), tmp_path / "w.pth").loaded > 0
    if model == "efficientformer-mini":      # the distillation head learned from the teacher, the class head from labels
        assert all(r["dist_loss"] > 0 and r["hard_loss"] > 0 and "soft_loss" not in r for r in rows)
        assert rows[-1]["dist_loss"] < rows[0]["dist_loss"]
    else:
        assert all("dist_loss" not in r and r["soft_loss"] > 0 for r in rows)


def test_distillation_head_targets_and_averaged_inference(cache_dir, tmp_path):
    res = _train(cache_dir, tmp_path / "hard", "efficientformer-mini", epochs=1, dist_head_target="hard")
    assert res.complete and _rows(tmp_path / "hard")[0]["dist_loss"] > 0
    model = create_model("efficientformer-mini", num_classes=10, img_size=32)
    model.load_state_dict(torch.load(tmp_path / "hard" / "last.pt", weights_only=True)["model"])
    x = torch.randn(4, 3, 32, 32)
    model.set_distilled_training(True)
    model.eval()
    with torch.no_grad():
        both = model(x)                       # inference: one output, the mean of the two heads
        feats = model.forward_features(x).mean(1)
        want = (model.head(feats) + model.head_dist(feats)) / 2
        model.train()
        out = model(x)                        # distilled training: the two heads apart
    torch.testing.assert_close(both, want)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == out[1].shape == (4, 10)
    # a --hard-labels run has no teacher: the distillation head is off, one averaged output, hard loss only
    res = _train(None, tmp_path / "labels", "efficientformer-mini", epochs=1, hard_labels=True, cache=None)
    row = _rows(tmp_path / "labels")[0]
    assert res.complete and "dist_loss" not in row and row["hard_loss"] > 0


def test_class_relations_of_a_run(cache_dir, tmp_path):
    import distill
    _train(cache_dir, tmp_path / "run", "tinyvit-tiny", epochs=1)
    rel = distill.open_run(tmp_path / "run").class_relations()
    assert rel.student.shape == rel.teacher.shape == (10, 10) and len(rel.classes) == 10
    np.testing.assert_allclose(np.diag(rel.teacher), 1.0)
    assert -1.0 <= rel.agreement <= 1.0 and rel.teacher_records == 360 and rel.student_images > 0
    both = distill.open_run(tmp_path / "run").class_relations(epochs=(0, 1), max_records=500)
    assert both.teacher_records == 500 and np.allclose(both.student, rel.student)
    with pytest.raises(distill.UserError, match="no cache to compare"):
        train_dir = tmp_path / "run2"
        _train(None, train_dir, "tinyvit-tiny", epochs=1, hard_labels=True, cache=None)
        distill.open_run(train_dir).class_relations()

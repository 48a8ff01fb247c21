"""One student of each family trained on the demo data from the same cache, with the same schedule.

    python tools/demo_students.py                          # the README's table; prints one JSON line
    python tools/demo_students.py --models tinyvit-tiny,vit-mini --epochs 4

It runs the demo pipeline's filter-labels and cache-teacher first when ``out/demo/cache`` is missing
(the same files ``distill demo`` makes), then trains each model with the pipeline's [train-student]
options (32 px, 8 epochs, batch 64, lr 2e-3, recipe none) — only ``--model`` and ``--out`` change — and
reads back val top-1, wall time and the class-relation agreement with the teacher
(``Run.class_relations``). The first model is also trained from hard labels, for the agreement of a
student that never saw the teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PIPELINE = REPO / "pipelines" / "demo.toml"
MODELS = ["tinyvit-tiny", "efficientformer-mini", "vit-mini", "dat-mini"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--epochs", type=int, help="override the pipeline's epochs")
    ap.add_argument("--out", default="out/demo-students", help="run directories go under this")
    a = ap.parse_args()
    os.chdir(REPO)                                    # the pipeline's paths are relative to the repository

    import torch

    import distill
    from distill import config as C
    from distill.cli import run_pipeline
    from distill.models.catalog import describe_models
    from distill.train import train_student

    pipe = C.load_pipeline(PIPELINE)
    train_layer = pipe.stage_layer("train-student")
    if not (Path(train_layer["cache"]) / "manifest.json").exists():
        run_pipeline(str(PIPELINE), only=["filter-labels", "cache-teacher"], quiet=True)
    names = a.models.split(",")
    params = {r["name"]: r["params"] for r in describe_models(names)}
    rows = {}
    for i, name in enumerate(names):
        for hard in ([False, True] if i == 0 else [False]):
            out = Path(a.out) / (name + ("-hard-labels" if hard else ""))
            extra = {"model": name, "out": str(out), "resume": False, "quiet": True, "compare-hard-labels": False}
            if hard:
                extra.update({"hard-labels": True, "cache": None})
            if a.epochs:
                extra["epochs"] = a.epochs
            if out.exists():
                import shutil
                shutil.rmtree(out)
            cfg = C.build(C.TrainConfig, train_layer, extra, where="tools/demo_students.py")
            torch.manual_seed(0)
            t = time.perf_counter()
            res = train_student(cfg, pipe.policy)
            wall = time.perf_counter() - t
            rel = distill.open_run(out).class_relations(cache=train_layer["cache"])
            key = name + (" (hard labels)" if hard else "")
            rows[key] = {"val_top1": res.final_top1, "best_top1": res.best_top1, "wall_s": round(wall, 1),
                         "params_1000_classes": params[name], "img_s": round(res.img_s, 1),
                         "class_relation_agreement": round(rel.agreement, 3)}
            print(f"{key}: val top-1 {res.final_top1:.1f}%, {wall:.0f} s, agreement {rel.agreement:.3f}", flush=True)
    print(json.dumps({"bench": "demo_students", "epochs": cfg.epochs, "image_size": cfg.image_size,
                      "batch_size": cfg.batch_size, "models": rows, "load": [round(v, 2) for v in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

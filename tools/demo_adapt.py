"""The adapt-teacher transfer demo: pretrain a small ViT on digits 0-4, adapt it to digits 5-9.

1. Split the bundled demo shards by class: ``pre`` (digit_0..digit_4, labels 0-4) and ``new``
   (digit_5..digit_9, relabelled 0-4), train and val each (``OUT/data``).
2. Pretrain the base: ``adapt-teacher --method full`` from random weights on ``pre`` (its ``weights.pth``
   is the base checkpoint, timm names; ``--save-base PATH`` copies it, e.g. to shards/demo).
3. Adapt that base to ``new`` with each method (linear, attn-only, repadapter, full): same epochs, batch,
   views, seed and val set; each method at its default lr / weight decay.
4. Print a markdown table (val top-1, trained parameters, training memory per step, wall time) and, last,
   one JSON line with every number.

    python tools/demo_adapt.py [--out out/demo-adapt] [--epochs 15] [--pretrain-epochs 30]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from distill.adapt import adapt_teacher  # noqa: E402
from distill.config import AdaptConfig  # noqa: E402
from distill.data.shards import Sample, iter_shard, resolve_shards, write_shards  # noqa: E402

DEMO = REPO / "shards" / "demo"
METHODS = ("linear", "attn-only", "repadapter", "full")
# Each method's lr (and RepAdapter's scale): the best of the same small grid on this task (15 epochs, val top-1):
# linear {3e-3, 3e-2, 0.1, 0.3}; attn-only {1e-3, 3e-3, 1e-2}; repadapter lr {3e-3, 1e-2, 3e-2} x scale {0.1, 1, 10};
# full {5e-4, 1e-3, 2e-3}. The package defaults (distill adapt-teacher --help) are lower, for big pretrained ViTs.
SETTINGS = {"linear": dict(lr=0.1), "attn-only": dict(lr=1e-2), "repadapter": dict(lr=1e-2, adapter_scale=10.0),
            "full": dict(lr=2e-3)}
SIZE = 32
POLICY = {"size": SIZE, "scale": [0.35, 1.0], "hflip": 0.0, "auto_augment": "rand-n1-m5-mstd0.5-inc1", "re_prob": 0.0}


def split_by_class(src: Path, dst: Path, keep: range) -> None:
    """Write the samples of classes ``keep`` of ``src`` to ``dst``, relabelled 0..len(keep)-1."""
    paths, index = resolve_shards(src)
    samples = [Sample(it.key, it.data, it.ext, it.label - keep.start)
               for p in paths for it in iter_shard(p) if isinstance(it, Sample) and it.label in keep]
    if dst.exists():
        shutil.rmtree(dst)
    write_shards(samples, dst, src.name if src.name in ("train", "val") else "train", 1000,
                 [index.classes[i] for i in keep])


def make_data(out: Path) -> dict[str, Path]:
    parts = {}
    for part, keep in (("pre", range(0, 5)), ("new", range(5, 10))):
        for split in ("train", "val"):
            split_by_class(DEMO / split, out / part / split, keep)
        parts[part] = out / part
    return parts


def run(out: Path, base_ckpt: str | None, data: Path, method: str, epochs: int, **kw) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cfg = AdaptConfig(base="vit-mini", base_checkpoint=base_ckpt, shards=str(data / "train"),
                      val_shards=str(data / "val"), method=method, out=str(out), epochs=epochs, image_size=SIZE,
                      batch_size=64, loader_workers=kw.pop("loader_workers", 1), quiet=True, **kw)
    t0 = time.perf_counter()
    res = adapt_teacher(cfg, POLICY)
    m = res.teacher["metrics"]
    return {"method": method, "val_top1": round(res.val_top1, 2), "trained_params": res.trained_params,
            "train_step_mib": round(res.memory["train_step_bytes"] / 2**20, 2),
            "activations_mib": round(res.memory["activations_bytes"] / 2**20, 2),
            "wall_s": round(time.perf_counter() - t0, 1), "train_s": m["train_s"], "lr": json.loads((out / "config.json").read_text())["lr"],
            "merge_max_abs_logit_diff": m.get("merge_max_abs_logit_diff"), "val_top1_merged": m.get("val_top1_merged")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo-adapt")
    ap.add_argument("--epochs", type=int, default=15, help="adaptation epochs (every method)")
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--base", help="use this base checkpoint instead of pretraining one")
    ap.add_argument("--save-base", help="copy the pretrained base checkpoint here")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    data = make_data(out / "data")
    base, pre = a.base, None
    if not base:
        pre = run(out / "base", None, data["pre"], "full", a.pretrain_epochs, lr=a.pretrain_lr, weight_decay=0.05)
        base = str(out / "base" / "weights.pth")
        print(f"base: vit-mini pretrained on digits 0-4 for {a.pretrain_epochs} epochs: val top-1 {pre['val_top1']:.1f}% "
              f"({pre['wall_s']:.0f} s)", flush=True)
        if a.save_base:
            shutil.copyfile(base, a.save_base)
    rows = []
    for method in a.methods.split(","):
        rows.append(run(out / method, base, data["new"], method, a.epochs, **SETTINGS.get(method, {})))
        print(f"  {method}: val top-1 {rows[-1]['val_top1']:.1f}%", flush=True)
    print(f"\n| method | lr | val top-1 (digits 5-9) | trained params | train-step memory (batch 64) | wall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['lr']:g} | {r['val_top1']:.1f}% | {r['trained_params']:,} | "
              f"{r['train_step_mib']:.1f} MiB | {r['wall_s']:.0f} s |")
    print(json.dumps({"epochs": a.epochs, "pretrain": pre, "base": base, "methods": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train-step throughput of the registered students, as ratios to tinyvit-5m, measured in one run.

    python tools/bench_students.py                 # 224 px, batch 8: one model or more per family
    python tools/bench_students.py --quick         # 64 px, the tiny variants (a smoke run)
    python tools/bench_students.py --models tinyvit-5m,dat-tiny --size 224

A step is what train-student does per batch on the device: forward, soft cross-entropy against dense
targets (two heads for EfficientFormer, as in distilled training), backward, AdamW. Random inputs and
targets (the loader is measured elsewhere: tools/bench_train.py). Models are timed in interleaved rounds
(A B C ... A B C ...), the median step of each kept, so that a load change hits every model alike; each
ratio is img/s ÷ tinyvit-5m's img/s in the same run. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distill.models import create_model  # noqa: E402
from distill.models.catalog import count_gflops  # noqa: E402

BASELINE = "tinyvit-5m"
FULL = ["tinyvit-5m", "tinyvit-21m", "efficientformer-l1", "efficientformer-l3", "vit-ti16", "vit-s16",
        "vit-s16-hmlp", "vit-s16-18x2", "vit-b16-22b", "dat-tiny"]
QUICK = ["tinyvit-5m", "tinyvit-tiny", "efficientformer-mini", "vit-mini", "dat-mini"]


def _step_fn(name: str, size: int, batch: int, classes: int):
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, img_size=size)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    target = torch.softmax(torch.randn(batch, classes), 1)

    def step():
        out = model(x)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(torch.nn.functional.cross_entropy(o.float(), target) for o in outs) / len(outs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in model.parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 px, tiny variants")
    ap.add_argument("--models", help=f"comma-separated (default: {','.join(FULL)}); {BASELINE} is always added")
    ap.add_argument("--size", type=int, help="image size (default 224; 64 with --quick)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 2 with --quick)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    a = ap.parse_args()
    size = a.size or (64 if a.quick else 224)
    rounds = a.rounds or (2 if a.quick else 3)
    names = a.models.split(",") if a.models else (QUICK if a.quick else FULL)
    if BASELINE not in names:
        names = [BASELINE] + names
    torch.set_num_threads(a.threads or os.cpu_count() or 1)

    steps, params, gflops = {}, {}, {}
    for n in names:
        steps[n], params[n] = _step_fn(n, size, a.batch, a.classes)
        with torch.device("meta"):
            gflops[n] = count_gflops(create_model(n, num_classes=a.classes, img_size=size), size)
        steps[n]()                                   # warm-up: allocator, first-call paths
    times: dict[str, list[float]] = {n: [] for n in names}
    t_all = time.perf_counter()
    for _ in range(rounds):
        for n in names:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    img_s = {n: a.batch / statistics.median(times[n]) for n in names}
    base = img_s[BASELINE]
    out = {"bench": "students", "size": size, "batch": a.batch, "rounds": rounds, "threads": torch.get_num_threads(),
           "baseline": BASELINE, "seconds": round(time.perf_counter() - t_all, 1),
           "models": {n: {"img_s": round(img_s[n], 2), "ratio_to_baseline": round(img_s[n] / base, 3),
                          "params": params[n], "gflops_at_size": round(gflops[n], 3)} for n in names},
           "load": [round(v, 2) for v in os.getloadavg()]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

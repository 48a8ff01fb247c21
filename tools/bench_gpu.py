"""One command for a CUDA machine: the teacher pass and the student step on a GPU, measured.

    python tools/bench_gpu.py                 # on a CUDA machine (one GPU is enough); prints a table + JSON
    python tools/bench_gpu.py --cpu-smoke     # tiny shapes on CPU: the same code paths, so this cannot rot (CI)

No downloads: synthetic 500x375 JPEG shards, random-weight teachers built here in the shapes of
ViT-L/14 (21,841 classes) and ViT-B/16 (the ``module:callable`` teacher kind, seeded weights).

1. bare teacher forward img/s (bf16, batch B, in this process) vs cache-teacher records/s over the
   time its worker spent in shard tasks (one Ray worker on the GPU, ``--view-workers`` producers),
   their ratio, and the CPU cores the machine was busy with during the run (/proc/stat);
2. TinyViT-21M and -5M train steps (fwd + bwd + AdamW, bf16 autocast) from cached sparse targets vs
   online distillation (the ViT-L/14-shaped teacher's forward inside the step) vs hard labels
   (synthetic device tensors: data loading is measured elsewhere);
3. bf16 vs fp32 stored top-K on the same views: top-1 agreement and mean top-5 overlap.
Prints one JSON line last (``tools/bench.py`` part ``gpu`` reads it into BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TEACHER_MODULE = '''
import torch
from torch import nn


class ViT(nn.Module):
    """A plain ViT (pre-norm blocks, class token, learned positions), random seeded weights."""

    def __init__(self, img, patch, dim, depth, heads, classes):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


SHAPES = {SHAPES!r}


def make(name):
    return ViT(**SHAPES[name]).eval()
'''
SHAPES = {"vit_l14": dict(img=224, patch=14, dim=1024, depth=24, heads=16, classes=21841),
          "vit_b16": dict(img=224, patch=16, dim=768, depth=12, heads=12, classes=21841)}
SMOKE = {"vit_l14": dict(img=32, patch=8, dim=64, depth=2, heads=2, classes=50),
         "vit_b16": dict(img=32, patch=16, dim=48, depth=1, heads=2, classes=50)}


def _cpu_busy() -> tuple[float, float]:
    """(busy jiffies, all jiffies) of the whole machine."""
    v = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)
    return sum(v) - idle, sum(v)


def _shards(root: Path, n: int, classes: int) -> Path:
    """n JPEGs in folders c00000.. (labels 0..9), then an index naming all ``classes`` (the teacher's width)."""
    import dataclasses
    import numpy as np
    from PIL import Image
    from distill.data.shards import make_shards
    from distill.format import ShardIndex
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n):
        d = root / "src" / f"c{i % 10:05d}"
        d.mkdir(parents=True, exist_ok=True)
        base = np.stack([(xx * (1 + i % 5)) % 256, (yy * (1 + i % 3)) % 256, (xx + yy + 17 * i) % 256], -1)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        (d / f"img{i:05d}.jpg").write_bytes(buf.getvalue())
    make_shards(str(root / "src"), str(root / "shards"), shard_size=max(64, n // 4))
    index = ShardIndex.read(root / "shards")
    dataclasses.replace(index, classes=[f"c{i:05d}" for i in range(classes)]).write(root / "shards")
    return root / "shards"


def _teacher(root: Path, shapes: dict) -> str:
    (root / "distill_gpu_teachers.py").write_text(TEACHER_MODULE.replace("{SHAPES!r}", repr(shapes)))
    sys.path.insert(0, str(root))
    return "distill_gpu_teachers"


def _timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bare_forward(mod: str, name: str, dev, batch: int, size: int, precision: str, repeats: int) -> float:
    import torch
    from distill import teachers
    ens = teachers.Ensemble(teachers.make_specs([f"{mod}:make_{name}"]), dev, precision=precision)
    x = torch.randn(batch, 3, size, size, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    return batch / _timed(lambda: ens(x), repeats, sync)


def cache_pass(shards: Path, out: Path, spec: str, size: int, batch: int, epochs: int, device: str,
               classes: int) -> dict:
    from distill.cache import cache_teacher
    from distill.config import CacheConfig
    b0, a0 = _cpu_busy()
    t = time.perf_counter()
    res = cache_teacher(CacheConfig(shards=str(shards), teacher=(spec,), out=str(out), epochs=epochs, topk=10,
                                    batch_size=batch, teacher_input_size=size, device=device, workers=1,
                                    teacher_num_classes=0, quiet=True, overwrite=True),
                        {"size": size, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25})
    wall = time.perf_counter() - t
    b1, a1 = _cpu_busy()
    if res.failed:
        raise SystemExit(f"cache-teacher failed: {res.failed}")
    cores = (os.cpu_count() or 1) * (b1 - b0) / max(a1 - a0, 1.0)
    return {"records": res.records, "records_per_s_tasks": res.records / res.worker_s,
            "records_per_s_command": res.records / wall, "cpu_cores_busy": round(cores, 2)}


def student_steps(mod: str, dev, batch: int, size: int, repeats: int, classes: int, smoke: bool) -> dict:
    import torch
    from distill import teachers
    from distill.models import create_model, param_groups
    from distill.train.losses import sparse_to_dense, soft_cross_entropy
    import torch.nn.functional as F
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    teacher = teachers.Ensemble(teachers.make_specs([f"{mod}:make_vit_l14"]), dev,
                                precision="bf16" if cuda else "fp32")
    out = {}
    for name in (("tinyvit-tiny",) if smoke else ("tinyvit-21m", "tinyvit-5m")):
        torch.manual_seed(0)
        model = create_model(name, classes, img_size=size).to(dev)
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
        x = torch.randn(batch, 3, size, size, device=dev)
        tx = torch.randn(batch, 3, SHAPES_USED["vit_l14"]["img"], SHAPES_USED["vit_l14"]["img"], device=dev)
        y = torch.randint(0, classes, (batch,), device=dev)
        idx = torch.stack([torch.randperm(classes)[:10] for _ in range(batch)]).to(dev)
        prob = torch.rand(batch, 10).softmax(-1).mul(0.9).to(dev)

        def step(kind: str) -> None:
            if kind == "online":
                p = teacher(tx)
                v, i = p.topk(10, dim=-1)
                target = sparse_to_dense(i, v, classes, "uniform")
            elif kind == "offline":
                target = sparse_to_dense(idx, prob, classes, "uniform")
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
            loss = (F.cross_entropy(logits.float(), y, label_smoothing=0.1) if kind == "hard"
                    else soft_cross_entropy(logits, target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        r = {k: batch / _timed(lambda k=k: step(k), repeats, sync) for k in ("offline", "online", "hard")}
        r["offline_over_online"] = r["offline"] / r["online"]
        out[name] = {k: round(v, 3 if k == "offline_over_online" else 1) for k, v in r.items()}
    return out


def bf16_agreement(mod: str, dev, shards: Path, size: int, n: int) -> dict:
    """The ViT-L/14-shaped teacher at fp32 and bf16 on the same augmented views of the shards."""
    import torch
    from distill import teachers
    from distill.data import augment, shards as shardio
    pol = augment.Policy(size=size)
    xs = []
    for path in sorted(shards.glob("*.tar")):
        for item in shardio.iter_shard(path):
            if hasattr(item, "data") and len(xs) < n:
                src = augment.SourceImage(item.data)
                xs.append(augment.view(src, augment.decode(pol, len(xs), src.width, src.height), size))
    x = torch.stack(xs)
    specs = teachers.make_specs([f"{mod}:make_vit_l14"])
    p32 = teachers.Ensemble(specs, dev, precision="fp32")(x)
    p16 = teachers.Ensemble(specs, dev, precision="bf16")(x)
    t32, t16 = p32.topk(5, -1).indices.cpu(), p16.topk(5, -1).indices.cpu()
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(t32, t16)) / (5 * len(x))
    return {"views": len(x), "top1_agreement": round(float((t32[:, 0] == t16[:, 0]).float().mean()), 4),
            "top5_overlap": round(overlap, 4)}


SHAPES_USED: dict = {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (CI): the code paths, not GPU numbers")
    ap.add_argument("--images", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--batch", type=int, default=0)
    a = ap.parse_args()
    import torch
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here; run with --cpu-smoke to exercise the code paths on CPU")
    dev = torch.device("cpu" if smoke else "cuda")
    SHAPES_USED.update(SMOKE if smoke else SHAPES)
    images, epochs = a.images or (64 if smoke else 2048), a.epochs or (1 if smoke else 4)
    batch = a.batch or (16 if smoke else 256)
    size = SHAPES_USED["vit_l14"]["img"]
    classes = SHAPES_USED["vit_l14"]["classes"]
    out: dict = {"device": torch.cuda.get_device_name(0) if not smoke else "cpu (smoke)", "cpu_cores": os.cpu_count(),
                 "smoke": smoke, "images": images, "epochs": epochs, "batch": batch,
                 "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    with tempfile.TemporaryDirectory(prefix="distill-gpu-") as d:
        root = Path(d)
        mod = _teacher(root, SHAPES_USED)
        (root / f"{mod}.py").write_text((root / f"{mod}.py").read_text() + "".join(
            f"\n\ndef make_{k}():\n    return make({k!r})\n" for k in SHAPES_USED))
        shards = _shards(root, images, classes)
        for name in ("vit_l14", "vit_b16"):
            s = SHAPES_USED[name]
            if s["classes"] != classes:
                continue
            bare = bare_forward(mod, name, dev, batch, s["img"], "bf16" if not smoke else "fp32", 3 if smoke else 10)
            cp = cache_pass(shards, root / f"cache-{name}", f"{mod}:make_{name}", s["img"], batch, epochs,
                            dev.type, classes) if name == "vit_l14" or not smoke else {}
            r = {"bare_img_s": round(bare, 1), **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in cp.items()}}
            if cp:
                r["ratio_tasks"] = round(cp["records_per_s_tasks"] / bare, 3)
                r["ratio_command"] = round(cp["records_per_s_command"] / bare, 3)
            out[name] = r
            print(f"{name}: bare forward {bare:,.1f} img/s; " + (
                f"cache-teacher {cp['records_per_s_tasks']:,.1f} records/s in tasks ({r['ratio_tasks']:.3f} of bare), "
                f"{cp['records_per_s_command']:,.1f} for the whole command, {cp['cpu_cores_busy']} cores busy"
                if cp else "(cache pass skipped in the smoke run)"), flush=True)
        out["students"] = student_steps(mod, dev, batch, SHAPES_USED["vit_l14"]["img"], 2 if smoke else 10,
                                        classes, smoke)
        for name, r in out["students"].items():
            print(f"{name}: offline {r['offline']:,.1f} img/s, online {r['online']:,.1f}, hard labels {r['hard']:,.1f}; "
                  f"offline / online {r['offline_over_online']:.2f}", flush=True)
        out["bf16_vs_fp32"] = bf16_agreement(mod, dev, shards, size, 32 if smoke else 512)
        print(f"bf16 vs fp32: top-1 agreement {out['bf16_vs_fp32']['top1_agreement']:.4f}, "
              f"top-5 overlap {out['bf16_vs_fp32']['top5_overlap']:.4f}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

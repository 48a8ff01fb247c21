"""View producers against a simulated GPU: in the worker's thread (--view-workers 0) vs processes (--view-workers N).

    python tools/bench_producers.py            # prints a table and one JSON line
    python tools/bench_producers.py --quick

A GPU runs the teacher without holding the worker's CPU; here a stub teacher stands in for it: its
forward sleeps a fixed time per batch (releasing the GIL) and declares ``distill_off_cpu``, so the
views do not take turns with it. The real ``cache-teacher`` runs over synthetic 500x375 JPEG shards
(224 px views, RandAugment + erasing), one Ray worker, and reports records/s over the time its worker
spent from its first teacher batch to its last (steady state: Ray, actor and producer start-up and the
pipeline's first fill excluded).

1. Capacity: the stub at 0 s per batch; views in the worker's thread (--view-workers 0), 1 and 2 view
   loader processes. Goal: 2 producer
   processes / 1 >= 1.8x views/s. One shard of 512 images x 8 epochs (4,096 views): the steady window
   still holds the shard's drain (while the last blocks finish, a producer without a block idles), which
   an ImageNet-21K shard (~1,400 images x 90 epochs = 126,000 views) spreads over 30x as many views;
   with 4 epochs the drain weighs twice as much (measured 2 / 1 = 1.50-1.77 vs 1.89-2.04 with 8).
2. Efficiency: the stub set to 80% of the 2-process capacity; cache-teacher's records/s / the stub's own
   rate, in the worker's thread and with 2 processes. Goal: >= 0.90 with processes.
3. Shard tail: 2 producer processes over a shard of 3 blocks (96 images x 8 epochs), the pieces taken as
   fast as they come (the worker's GPU side at no cost): views/s when the last block is shared out by
   epoch ranges (``tasks_of``) / whole blocks (the last block on one producer while the other idles),
   in interleaved pairs. And the same planner's producer use at ImageNet-21K's shape (22 blocks of 64 x
   90 epochs on 7 and 15 producers), modelled with equal producers and a cut costing 1.5 views per image
   (a decode, 1.23 ms, and the block's view parameters, 2.7 ms, against 2.53 ms per view; BENCHMARKS.md 1).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STUB = '''
import time
import torch


class Stub(torch.nn.Module):
    distill_off_cpu = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        time.sleep({per_batch_s!r})
        # fixed logits 1, 2, ... (not 0, 1: two classes' [0, 1] is a row of probabilities, which distill refuses)
        return torch.arange(1, {classes} + 1, dtype=torch.float32).expand(x.shape[0], {classes}).clone()


def make():
    return Stub()
'''


def _shards(root: Path, n_images: int, shards: int) -> Path:
    """Smooth-gradient + noise 500x375 JPEGs (quality 90, ~40 KB) in ``shards`` shards of 2 classes."""
    import numpy as np
    from PIL import Image
    from distill.data.shards import make_shards
    rng = np.random.default_rng(0)
    src = root / "src"
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n_images):
        d = src / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        base = np.stack([(xx * (1 + i % 5)) % 256, (yy * (1 + i % 3)) % 256, (xx + yy + 17 * i) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        (d / f"img{i:05d}.jpg").write_bytes(buf.getvalue())
    make_shards(str(src), str(root / "shards"), shard_size=-(-n_images // shards))
    return root / "shards"


def _stub(root: Path, per_batch_s: float, tag: str) -> str:
    mod = f"distill_stub_{tag}"
    (root / f"{mod}.py").write_text(STUB.format(per_batch_s=per_batch_s, classes=2))
    return f"{mod}:make"


def _run(shards: Path, out: Path, spec: str, epochs: int, batch: int, n: int) -> float:
    from distill.cache import cache_teacher
    from distill.config import CacheConfig
    # blocks of 32: one shard holds many, so that 2 producers have work side by side
    policy = {"size": 224, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "mix_block": 32}
    cfg = CacheConfig(shards=str(shards), teacher=(spec,), out=str(out), epochs=epochs, topk=2, batch_size=batch,
                      teacher_input_size=224, workers=1, threads=1, device="cpu", quiet=True, overwrite=True,
                      view_workers=n)
    res = cache_teacher(cfg, policy)
    if res.failed:
        raise SystemExit(f"cache-teacher failed: {res.failed}")
    # steady state: from the first batch reaching the teacher to the last leaving it (Ray, actor and producer
    # start and the pipeline's first fill excluded), as the GPU sees it
    return res.steady_records_per_s


def _tail(root: Path, epochs: int, pairs: int) -> dict:
    """Section 3 measured: views/s of 2 producer processes over a 3-block shard, cut vs whole blocks."""
    from distill.cache.producers import ShardReader, ViewLoader
    from distill.data import augment, views
    shard = sorted(_shards(root / "tail", 96, 1).glob("*.tar"))[0]
    spec = views.ViewSpec(augment.Policy(size=224, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mix_block=32))
    prod = ViewLoader(2, spec.views_of(), epochs, 224, 64)

    def once(cut: bool) -> float:
        reader = ShardReader(shard, spec=spec, epochs=epochs, cache_seed=0, size=224, num_classes=2,
                             exclude=frozenset())
        t0, n = time.perf_counter(), 0
        for p in prod.pieces(reader.blocks(), cut=cut):
            n += p.pixels.shape[0]
        return n / (time.perf_counter() - t0)

    try:
        once(True)                                            # warm: heaps
        runs = [(once(False), once(True)) for _ in range(pairs)]
    finally:
        prod.close()
    ratios = [c / w for w, c in runs]
    return {"images": 96, "blocks": 3, "epochs": epochs, "producers": 2, "pairs": pairs,
            "whole_views_s": round(sum(w for w, _ in runs) / pairs, 1),
            "cut_views_s": round(sum(c for _, c in runs) / pairs, 1),
            "cut_over_whole": round(sum(ratios) / pairs, 3), "cut_over_whole_runs": [round(r, 3) for r in ratios],
            "model": {f"{p}_producers": _modelled_use(22, 64, 90, p) for p in (7, 15)}}


def _modelled_use(blocks: int, block_len: int, epochs: int, producers: int, cut_cost: float = 1.5) -> dict:
    """Producer use (busy rendering views / producers x makespan) of equal producers taking ``tasks_of``'s
    tasks in order, whole blocks vs cut; a task costs its views + ``cut_cost`` views per image."""
    import heapq
    from distill.cache.producers import Block, tasks_of
    out = {}
    for cut in (False, True):
        bl = [Block(i, i * block_len, [0] * block_len, [], []) for i in range(blocks)]
        free = [0.0] * producers
        for b, lo, hi in tasks_of(bl, producers if cut else 1, epochs, 64):
            t = heapq.heappop(free)
            heapq.heappush(free, t + len(b.labels) * (hi - lo + cut_cost))
        out["cut" if cut else "whole"] = round(blocks * block_len * epochs / (producers * max(free)), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--images", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=0)
    a = ap.parse_args()
    images = a.images or (192 if a.quick else 512)
    epochs = a.epochs or (2 if a.quick else 8)
    batch = 64
    with tempfile.TemporaryDirectory(prefix="distill-producers-") as d:
        root = Path(d)
        sys.path.insert(0, str(root))                 # the stub modules (embedded Ray passes sys.path on)
        shards = _shards(root, images, 1)
        free = _stub(root, 0.0, "free")
        cap = {}
        for mode, n in (("thread", 0), ("processes", 1), ("processes", 2)):
            cap[mode, n] = _run(shards, root / f"cap-{mode}-{n}", free, epochs, batch, n)
            print(f"capacity  {mode:<9} {n}: {cap[mode, n]:8.1f} views/s", flush=True)
        stub_rate = 0.8 * cap["processes", 2]
        per_batch = batch / stub_rate
        busy = _stub(root, per_batch, "busy")
        eff = {}
        for mode, n in (("thread", 0), ("processes", 2)):
            got = _run(shards, root / f"eff-{mode}", busy, epochs, batch, n)
            eff[mode] = got / stub_rate
            print(f"stub GPU at {stub_rate:.0f} img/s ({per_batch * 1e3:.1f} ms/batch), {n} {mode}: "
                  f"{got:.1f} records/s = {eff[mode]:.3f} of the stub's rate", flush=True)
        tail = _tail(root, 4 if a.quick else 8, 1 if a.quick else 3)
        print(f"shard tail, 3 blocks on 2 producers: {tail['cut_views_s']:.1f} views/s cut, "
              f"{tail['whole_views_s']:.1f} whole blocks: {tail['cut_over_whole']:.3f}; "
              f"modelled ImageNet-21K shard: {tail['model']}", flush=True)
    out = {"images": images, "epochs": epochs, "batch": batch, "size": 224, "tail": tail,
           "capacity": {f"{m}_{n}": round(v, 1) for (m, n), v in cap.items()},
           "processes_2_over_1": round(cap["processes", 2] / cap["processes", 1], 3),
           "processes_1_over_thread": round(cap["processes", 1] / cap["thread", 0], 3),
           "stub_img_s": round(stub_rate, 1), "stub_efficiency_processes": round(eff["processes"], 3),
           "stub_efficiency_thread": round(eff["thread"], 3), "load": round(os.getloadavg()[0], 2),
           "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

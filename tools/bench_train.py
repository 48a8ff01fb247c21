"""Benchmark the student side: what replaying the cache and sparse soft targets cost.

(a) loader: images/s of ``DistillDataset`` replaying the cache (seeds + top-K read from Arrow, sparse
    targets collated) vs the same stream with hard labels. The hard-label stream uses the training
    seed = the cache seed, so both make exactly the same views: the difference is the cache alone.
(b) train step: forward + backward + AdamW with sparse targets densified on the device + soft
    cross-entropy vs the same step with ``F.cross_entropy`` on hard labels.

A and B are interleaved (whole passes for the loader, A/B then B/A; single steps for the train
step) and medians compared, so load from other processes on the machine hits both alike.

    python tools/bench_train.py [--shards shards/demo/train] [--cache DIR] [--model tinyvit-tiny]
        [--image-size 32] [--batch-size 64] [--classes 1000] [--topk 10] [--repeats 8] [--device cpu]

Without --cache a temporary one is built from the demo teacher (2 epochs, K=10).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distill.config import TrainConfig  # noqa: E402
from distill.train.losses import sparse_to_dense, soft_cross_entropy  # noqa: E402
from distill.models import create_model, param_groups  # noqa: E402
from distill.train import prepare_data  # noqa: E402
from distill.train.data import DistillDataset  # noqa: E402


def build_cache(shards: str, out: str) -> None:
    from distill.cache import cache_teacher
    from distill.config import CacheConfig
    import tomllib
    policy = tomllib.loads((REPO / "pipelines" / "demo.toml").read_text())["policy"]
    cache_teacher(CacheConfig(shards=shards, teacher=(str(REPO / "shards" / "demo" / "teacher.pt"),), out=out,
                              epochs=2, topk=10, teacher_input_size=32, quiet=True), policy)


def _pass_rate(ds: DistillDataset, epoch: int) -> float:
    ds.set_epoch(epoch)
    t = time.perf_counter()
    n = sum(len(b["label"]) for b in ds)
    return n / (time.perf_counter() - t)


def bench_loader(args) -> tuple[float, float]:
    """Whole passes over the shards, A and B alternating (and which goes first alternating too),
    so load from other processes hits both alike; median pass rate of each."""
    cfg = TrainConfig(shards=args.shards, cache=args.cache, out="-", image_size=args.image_size)
    data = prepare_data(cfg, None)
    seed = int(data.cache.manifest["cache_seed"])
    common = dict(spec=data.spec, image_size=args.image_size, batch_size=args.batch_size, seed=seed,
                  shuffle_buffer=1000, num_classes=data.num_classes, drop_last=False)
    cached = DistillDataset(data.refs, cache=data.cache, **common)
    hard = DistillDataset(data.refs, cache=None, **common)
    # same views: the hard-label seeds derive from (seed, epoch, key) exactly like the cache's
    cached.set_epoch(0)
    hard.set_epoch(0)
    a, b = next(iter(cached)), next(iter(hard))
    assert torch.equal(a["image"], b["image"]), "hard-label stream does not reproduce the cached views"
    ra, rb = [], []
    for r in range(args.repeats):
        e = r % data.cache.epochs
        if r % 2 == 0:
            ra.append(_pass_rate(cached, e))
            rb.append(_pass_rate(hard, e))
        else:
            rb.append(_pass_rate(hard, e))
            ra.append(_pass_rate(cached, e))
    return statistics.median(ra), statistics.median(rb)


def bench_workers(args, workers: int = 2) -> tuple[float, float]:
    """The trainer's own loader (``DistillLoader``, persistent workers, prefetching) over
    the cache-replay stream with ``workers`` worker processes vs none (the stream in this process):
    whole passes alternating, which goes first alternating too; median pass rate of each."""
    from distill.train.data import DistillLoader
    size = args.workers_image_size
    cfg = TrainConfig(shards=args.shards, cache=args.cache, out="-", image_size=size)
    data = prepare_data(cfg, None)
    common = dict(spec=data.spec, image_size=size, batch_size=args.batch_size,
                  seed=int(data.cache.manifest["cache_seed"]), shuffle_buffer=1000, num_classes=data.num_classes,
                  drop_last=False)
    streams = {w: DistillDataset(data.refs, cache=data.cache, **common) for w in (0, workers)}
    loaders = {w: DistillLoader(streams[w], w, persistent_workers=w > 0) for w in (0, workers)}

    def rate(w: int, epoch: int) -> float:
        streams[w].set_epoch(epoch)
        t = time.perf_counter()
        n = sum(len(b["label"]) for b in loaders[w])
        return n / (time.perf_counter() - t)

    rate(workers, 0)           # start the persistent workers (process start and imports are not the loader's rate)
    got = {0: [], workers: []}
    for r in range(args.repeats):
        e = r % data.cache.epochs
        for w in ((0, workers) if r % 2 == 0 else (workers, 0)):
            got[w].append(rate(w, e))
    return statistics.median(got[workers]), statistics.median(got[0])


def bench_public(args, workers: int = 2) -> tuple[float, float]:
    """``distill.DistillDataset`` in a plain ``torch.utils.data.DataLoader(ds, batch_size=None,
    num_workers=2, persistent_workers=True)`` (what a user's own loop has) vs train-student's loader
    (``DistillLoader`` as ``loop._stream`` builds it: persistent workers, 4 batches prefetched each), over
    the same cache replay at the workers' image size: whole passes alternating, which goes first
    alternating too; median pass rate of each."""
    import distill
    size = args.workers_image_size
    cfg = TrainConfig(shards=args.shards, cache=args.cache, out="-", image_size=size)
    data = prepare_data(cfg, None)

    def dataset():
        return distill.DistillDataset(data.refs, data.cache, spec=data.spec, image_size=size,
                                      batch_size=args.batch_size, seed=0, shuffle_buffer=1000,
                                      num_classes=data.num_classes, drop_last=False)
    plain_ds, ours_ds = dataset(), dataset()
    loaders = {"plain": (plain_ds, torch.utils.data.DataLoader(plain_ds, batch_size=None, num_workers=workers,
                                                               persistent_workers=True)),
               "ours": (ours_ds, distill.DistillLoader(ours_ds, workers, persistent_workers=True))}

    def rate(which: str, epoch: int) -> float:
        ds, dl = loaders[which]
        ds.set_epoch(epoch)
        t = time.perf_counter()
        n = sum(len(b["label"]) for b in dl)
        return n / (time.perf_counter() - t)

    rate("plain", 0), rate("ours", 0)           # start the persistent workers
    got = {"plain": [], "ours": []}
    for r in range(args.repeats):
        e = r % data.cache.epochs
        for w in (("plain", "ours") if r % 2 == 0 else ("ours", "plain")):
            got[w].append(rate(w, e))
    return statistics.median(got["plain"]), statistics.median(got["ours"])


def bench_step(args) -> tuple[float, float]:
    num_classes, k = args.classes, args.topk
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes, img_size=args.image_size).to(dev)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    bsz = args.batch_size
    x = torch.randn(bsz, 3, args.image_size, args.image_size, device=dev)
    y = torch.randint(0, num_classes, (bsz,), device=dev)
    idx = torch.stack([torch.randperm(num_classes)[:k] for _ in range(bsz)]).to(dev)
    prob = torch.rand(bsz, k).softmax(-1).mul(0.95).to(dev)
    cuda = dev.type == "cuda"

    def step(sparse: bool) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(x)
        if sparse:
            loss = soft_cross_entropy(logits, sparse_to_dense(idx, prob, num_classes, "uniform"))
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    def timed(sparse: bool) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(sparse)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(3):   # warm-up
        step(True), step(False)
    ta, tb = [], []
    for _ in range(args.repeats * args.steps):   # alternate single steps; median step time of each
        ta.append(timed(True))
        tb.append(timed(False))
    return bsz / statistics.median(ta), bsz / statistics.median(tb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train-student loader and step benchmarks (ratios in one run)")
    ap.add_argument("--shards", default=str(REPO / "shards" / "demo" / "train"))
    ap.add_argument("--cache", help="cache of --shards (default: build a temporary one with the demo teacher)")
    ap.add_argument("--model", default="tinyvit-tiny")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers-image-size", type=int, default=224,
                    help="student resolution of part (c): a student's real view cost (the demo's 32 px views are too "
                         "cheap for worker processes to pay for their transfer)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--classes", type=int, default=1000, help="classes of the step benchmark's head")
    ap.add_argument("--topk", type=int, default=10, help="K of the step benchmark's sparse targets")
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--steps", type=int, default=15, help="alternating step pairs per repeat")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_loader:
        with tempfile.TemporaryDirectory() as tmp:
            if not args.cache:
                args.cache = str(Path(tmp) / "cache")
                print(f"building a temporary cache of {args.shards} ...", flush=True)
                build_cache(args.shards, args.cache)
            la, lb = bench_loader(args)
            wa, wb = bench_workers(args, 2)
            pa, pb = bench_public(args, 2)
        print(f"(a) loader, {args.image_size}px, batch {args.batch_size}, median of {args.repeats} alternating passes:")
        print(f"    cache replay + sparse targets {la:8.1f} img/s")
        print(f"    hard labels (same views)      {lb:8.1f} img/s")
        print(f"    ratio {la / lb:.3f}  (target >= 0.95)")
        print(f"(c) workers: the trainer's DataLoader over the cache replay, {args.workers_image_size}px, batch {args.batch_size}, "
              f"median of {args.repeats} alternating passes:")
        print(f"    2 persistent worker processes {wa:8.1f} img/s")
        print(f"    0 workers (in the main process) {wb:8.1f} img/s")
        print(f"    ratio {wa / wb:.3f}")
        print(f"(d) public DistillDataset in a plain torch DataLoader vs train-student's DistillLoader, 2 persistent "
              f"workers each, {args.workers_image_size}px, batch {args.batch_size}, median of {args.repeats} alternating passes:")
        print(f"    plain DataLoader(ds, batch_size=None) {pa:8.1f} img/s")
        print(f"    train-student's DistillLoader       {pb:8.1f} img/s")
        print(f"    ratio {pa / pb:.3f}  (target >= 0.98)")
    sa, sb = bench_step(args)
    print(f"(b) train step, {args.model} at {args.image_size}px, {args.classes} classes, top-{args.topk}, "
          f"batch {args.batch_size}, {args.device}, median step of {args.repeats * args.steps} alternating steps:")
    print(f"    sparse targets (densify + soft CE) {sa:8.1f} img/s")
    print(f"    hard labels (cross-entropy)        {sb:8.1f} img/s")
    print(f"    ratio {sa / sb:.3f}  (target >= 0.97)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the integrity checks cost: bytes per record and the training loader's rate, each against the same
thing without the checks, measured in one run.

(a) bytes: a cache file at ImageNet-21K's shape (21,841 classes, K=10, E=90, 1,420 samples per shard,
    records of ``bench_teachers.synthetic_records``) written by the cache's own encoder and writer, with
    the per-sample digest column and the footer's CRC-32 table, against the same records without them
    (no digest column, no checksum metadata).
(b) loader: images/s of the real ``DistillDataset`` replaying a real cache (demo teacher, shards of
    500x375 JPEGs of ~70-110 KB, views at 224 px) with every check on (each record batch's CRC-32, each
    sample's digest of its image bytes and label) against the same stream with both turned off. Whole
    passes alternate (A/B, then B/A) and medians are compared, so load from other processes hits both.

    python tools/bench_integrity.py [--quick] [--repeats 8] [--images 96]

Prints the figures, then ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "tools")):
    if p not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, p)


def bytes_per_record(quick: bool) -> dict:
    import pyarrow as pa

    import bench_teachers
    from distill import format as F
    from distill.data.augment import derive_seed
    n, epochs = (710, 90) if quick else (1420, 90)
    labels, ids, probs, lp = bench_teachers.synthetic_records(n, epochs, k=10, candidates=48, seed=0)
    keys = [f"n00_{i:06d}" for i in range(n)]
    seeds = np.array([[derive_seed(0, e, k) for e in range(epochs)] for k in keys], np.uint32)
    digests = np.random.default_rng(0).integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    args = (keys, labels, seeds, ids, probs, lp)
    checked = len(F.ipc_bytes(F.encode_cache_shard(*args, num_classes=21841, shard="train-000000.tar", digests=digests)))
    plain = F.encode_cache_shard(*args, num_classes=21841, shard="train-000000.tar")
    sink = pa.BufferOutputStream()            # the same batches, written without the checksum metadata
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec(F.IPC_COMPRESSION, compression_level=F.IPC_LEVEL))
    with pa.ipc.new_file(sink, plain.schema, options=opts) as w:
        for e in range(epochs):
            for a in range(0, n, F.CACHE_CHUNK):
                w.write_table(plain.slice(e * n + a, min(F.CACHE_CHUNK, n - a)).combine_chunks())
    records = n * epochs
    bare = sink.getvalue().size
    return {"samples": n, "epochs": epochs, "records": records, "checked_bytes_per_record": round(checked / records, 3),
            "bare_bytes_per_record": round(bare / records, 3),
            "extra_bytes_per_record": round((checked - bare) / records, 3), "ratio": round(checked / bare, 4)}


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Photo-like 500x375 JPEGs: smooth colour fields plus texture, quality 90."""
    import io

    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500] / 100.0
    out = []
    for _ in range(n):
        f = rng.normal(size=(3, 3))
        base = np.stack([np.sin(xx * f[c, 0] + yy * f[c, 1] + f[c, 2]) for c in range(3)], -1) * 90 + 128
        img = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _build(tmp: Path, images: int) -> tuple[str, str]:
    from distill.cache import cache_teacher
    from distill.config import CacheConfig
    from distill.data.shards import Sample, write_shards
    samples = [Sample(f"img{i:05d}", b, "jpg", i % 10) for i, b in enumerate(_jpegs(images))]
    write_shards(samples, tmp / "shards", "train", max(1, images // 2), [str(c) for c in range(10)])
    policy = {"size": 224, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "mixup_alpha": 0.8,
              "cutmix_alpha": 1.0}
    cache_teacher(CacheConfig(shards=str(tmp / "shards"), teacher=(str(REPO / "shards/demo/teacher.pt"),),
                              out=str(tmp / "cache"), epochs=2, topk=5, teacher_input_size=32, quiet=True,
                              workers=1), policy)
    return str(tmp / "shards"), str(tmp / "cache")


def loader(tmp: Path, images: int, repeats: int) -> dict:
    from distill.cache.reader import Cache
    from distill.config import TrainConfig
    from distill.format import CacheFile
    from distill.train import prepare_data
    from distill.train.data import DistillDataset
    shards, cache = _build(tmp, images)
    data = prepare_data(TrainConfig(shards=shards, cache=cache, out="-", image_size=224), None)
    ds = DistillDataset(data.refs, cache=data.cache, spec=data.spec, image_size=224, batch_size=32,
                     seed=0, shuffle_buffer=256, num_classes=data.num_classes, drop_last=False)
    checksums, digests = CacheFile._checksums, Cache.digests
    sizes = [len(b) for b in _jpegs(8)]

    def rate(checks: bool, epoch: int) -> float:
        CacheFile._checksums = checksums if checks else (lambda self: None)
        Cache.digests = digests if checks else (lambda self, shard: None)
        ds.set_epoch(epoch)
        t = time.perf_counter()
        n = sum(len(b["label"]) for b in ds)
        return n / (time.perf_counter() - t)

    rate(True, 0)                            # first touch of the files and images: not in either figure
    got = {True: [], False: []}
    try:
        for r in range(repeats):
            for checks in ((True, False) if r % 2 == 0 else (False, True)):
                got[checks].append(rate(checks, r % 2))
    finally:
        CacheFile._checksums, Cache.digests = checksums, digests
    on, off = statistics.median(got[True]), statistics.median(got[False])
    return {"images": images, "image_kb": round(float(np.mean(sizes)) / 1e3, 1), "view_px": 224,
            "repeats": repeats, "checked_img_s": round(on, 1), "unchecked_img_s": round(off, 1),
            "ratio": round(on / off, 4), "passes_checked": [round(x, 1) for x in got[True]],
            "passes_unchecked": [round(x, 1) for x in got[False]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="cost of the cache integrity checks (ratios in one run)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--repeats", type=int, default=0, help="alternating loader passes (default 8, quick 2)")
    ap.add_argument("--images", type=int, default=0, help="images in the loader's shards (default 96, quick 32)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 8)
    images = args.images or (32 if args.quick else 96)
    b = bytes_per_record(args.quick)
    print(f"(a) bytes, ImageNet-21K shape ({b['samples']} samples x {b['epochs']} epochs, K=10, 21,841 classes):")
    print(f"    with digests + checksums {b['checked_bytes_per_record']:.3f} B/record, without "
          f"{b['bare_bytes_per_record']:.3f}: +{b['extra_bytes_per_record']:.3f} B/record, ratio {b['ratio']:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        lo = loader(Path(tmp), images, repeats)
    print(f"(b) loader, {lo['images']} JPEGs of ~{lo['image_kb']} KB, views at 224 px, median of {repeats} alternating passes:")
    print(f"    checks on  {lo['checked_img_s']:8.1f} img/s")
    print(f"    checks off {lo['unchecked_img_s']:8.1f} img/s")
    print(f"    ratio {lo['ratio']:.3f}  (goal >= 0.98)")
    print(json.dumps({"bytes": b, "loader": lo}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

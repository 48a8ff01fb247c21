"""Benchmark training from object storage: the same cache and shards in a real S3 API (moto's server on
127.0.0.1) and on local disk, measured in one run. Prints one JSON line.

(a) bytes: one epoch of ``DistillDataset`` over the s3:// cache (in this process, so every request is
    counted): bytes fetched from the store ÷ the epoch's share of the cache's bytes (goal <= 1.5), and
    GET requests per epoch; the first epoch (footers fetched) and a later one (footers kept).
(b) speed: train-student's loader (``DistillLoader``, 2 persistent workers) over s3:// cache + s3://
    shards vs the same files on local disk, whole epochs alternating, median img/s of each: ratio
    remote ÷ local (goal >= 0.9). Every request (GET, HEAD, list) waits ``--delay-ms`` first (default 30 ms: a cloud store's
    time to first byte within a region; loopback alone has none).

    python tools/bench_storage.py [--shards shards/demo/train] [--count 4] [--epochs 4] [--delay-ms 30]
        [--image-size 224] [--batch-size 64] [--repeats 4] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from distill import hooks, storage  # noqa: E402


def build(tmp: Path, shards: Path, count: int, epochs: int) -> tuple[Path, Path]:
    """The first ``count`` shards of ``shards`` with their index, and a cache of them (demo teacher, K=10)."""
    import shutil
    import tomllib

    from distill.cache import cache_teacher
    from distill.config import CacheConfig
    from distill.format import ShardIndex
    index = ShardIndex.read(shards)
    names = [s.name for s in index.shards[:count]]
    local = tmp / "train"
    local.mkdir()
    for n in names:
        shutil.copy2(shards / n, local / n)
    ShardIndex(classes=index.classes, shards=[s for s in index.shards if s.name in names]).write(local)
    policy = tomllib.loads((REPO / "pipelines" / "demo.toml").read_text())["policy"]
    cache_teacher(CacheConfig(shards=str(local), teacher=(str(REPO / "shards" / "demo" / "teacher.pt"),),
                              out=str(tmp / "cache"), epochs=epochs, topk=10, teacher_input_size=32, quiet=True,
                              workers=1, threads=1), policy)
    return local, tmp / "cache"


def upload(local: Path, url: str) -> None:
    for f in sorted(local.iterdir()):
        if f.is_file():
            storage.write_bytes(f"{url}/{f.name}", f.read_bytes())


def _dataset(shards, cache, image_size: int, batch_size: int):
    import distill
    return distill.DistillDataset(shards, cache, image_size=image_size, batch_size=batch_size, seed=0,
                                  shuffle_buffer=1000, drop_last=False, rank=0, world=1)


def bytes_per_epoch(shards: Path, cache_url: str, batch_size: int) -> dict:
    """(a): one process, no workers; epochs 0 and 1 of the remote cache over local shards."""
    import distill
    cache = distill.open_cache(cache_url)
    epoch_bytes = sum(e["file_bytes"] for e in cache.manifest["shards"]) / cache.epochs
    ds = _dataset(str(shards), cache, 32, batch_size)
    out = {}
    for e, label in ((1, "first"), (2, "later")):
        ds.set_epoch(e)
        before = storage.STATS.snapshot()
        n = sum(len(b["label"]) for b in ds)
        now = storage.STATS.snapshot()
        out[label] = {"images": n, "gets": now["gets"] - before["gets"], "bytes": now["bytes_in"] - before["bytes_in"],
                      "bytes_per_epoch_bytes": round((now["bytes_in"] - before["bytes_in"]) / epoch_bytes, 3)}
    out["epoch_bytes"] = round(epoch_bytes)
    return out


def speed(local: tuple[Path, Path], remote: tuple[str, str], args) -> dict:
    """(b): DistillLoader with 2 persistent workers, local vs remote, whole epochs alternating."""
    import distill
    loaders = {}
    for which, (s, c) in (("local", local), ("remote", remote)):
        ds = _dataset(str(s), str(c), args.image_size, args.batch_size)
        loaders[which] = (ds, distill.DistillLoader(ds, 2, persistent_workers=True))

    def rate(which: str, epoch: int) -> float:
        ds, dl = loaders[which]
        ds.set_epoch(epoch)
        t = time.perf_counter()
        n = sum(len(b["label"]) for b in dl)
        return n / (time.perf_counter() - t)

    rate("local", 0), rate("remote", 0)          # start the workers (and fetch the footers once)
    got = {"local": [], "remote": []}
    for r in range(args.repeats):
        for w in (("local", "remote") if r % 2 == 0 else ("remote", "local")):
            got[w].append(rate(w, 1 + r % (args.epochs - 1)))
    lo, re_ = statistics.median(got["local"]), statistics.median(got["remote"])
    return {"local_img_s": round(lo, 1), "remote_img_s": round(re_, 1), "remote_over_local": round(re_ / lo, 3)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=str(REPO / "shards" / "demo" / "train"))
    ap.add_argument("--count", type=int, default=4, help="shards used (the first ones)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs cached")
    ap.add_argument("--delay-ms", type=float, default=30.0, help="added wait before every request to the store")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="2 shards, 3 epochs, 64 px, 2 repeats (a smoke run)")
    return ap


def run(argv=(), quick: bool = False) -> dict:
    args = parser().parse_args(list(argv))
    if quick or args.quick:
        args.count, args.epochs, args.repeats, args.image_size = 2, 3, 2, 64
    from s3_server import make_bucket, s3_server
    with tempfile.TemporaryDirectory() as tmp, s3_server() as endpoint:
        shards, cache = build(Path(tmp), Path(args.shards), args.count, args.epochs)
        bucket = make_bucket(endpoint, "bench")
        upload(shards, f"{bucket}/train")
        from distill.cache.transfer import push
        push(cache, f"{bucket}/cache", quiet=True)
        res = {"benchmark": "storage", "shards": args.count, "epochs": args.epochs, "delay_ms": args.delay_ms,
               "image_size": args.image_size, "batch_size": args.batch_size,
               "bytes": bytes_per_epoch(shards, f"{bucket}/cache", args.batch_size)}
        os.environ[hooks.STORE_DELAY_ENV] = str(args.delay_ms)
        hooks.reload()
        try:
            res["speed"] = speed((shards, cache), (f"{bucket}/train", f"{bucket}/cache"), args)
        finally:
            os.environ.pop(hooks.STORE_DELAY_ENV, None)
            hooks.reload()
    return res


def main(argv=None) -> int:
    print(json.dumps(run(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

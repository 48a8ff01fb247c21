"""Benchmark the notebook reader on a large synthetic cache: ``open_cache`` and ``to_table(epochs=[0])``.

    python tools/bench_notebook.py [--dir /tmp/distill-bench-cache] [--shards 1000] [--samples 1000]
                                   [--epochs 1] [--topk 10] [--classes 21841] [--repeats 5]

Synthesises a cache like cache-teacher writes (one Arrow file per shard via
``distill.format.encode_cache_shard`` + ``ipc_bytes``, a manifest written last) with realistic
top-K lists: each sample draws its E views' top-K ids from ~28 classes of its own, probabilities are
sorted and sum below 1. The cache is reused when it already exists with the same shape.

Limits (issue 7): opening a 1,000-shard cache < 1 s; ``to_table(epochs=[0])`` over 1,000,000
records < 2 s on the 2-core development machine. Timings are the median of ``--repeats`` runs
(the first ``to_table`` also reported on its own: it includes the page cache warm-up).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill import format as F  # noqa: E402
from distill.files import atomic_write_bytes, atomic_write_json  # noqa: E402

OPEN_LIMIT_S, TABLE_LIMIT_S = 1.0, 2.0
UNIQUE = 16          # distinct synthetic shard contents; the others reuse them with their own keys


def _shard_table(i: int, n: int, e: int, k: int, c: int) -> pa.Table:
    rng = np.random.default_rng(i)
    pool = rng.integers(0, c, size=(n, 28))                         # ~28 distinct classes per sample
    pick = np.argsort(rng.random((n, e, 28)), axis=-1)[..., :k]      # K distinct of them per view
    ids = np.take_along_axis(np.broadcast_to(pool[:, None, :], (n, e, 28)), pick, -1)
    prob = np.sort(rng.dirichlet(np.full(k + 1, 0.3), size=(n, e))[..., :k], axis=-1)[..., ::-1]
    labels = pool[:, 0]
    seeds = rng.integers(0, 2 ** 32, size=(n, e), dtype=np.uint64).astype(np.uint32)
    lprob = np.where(ids[..., 0] == labels[:, None], prob[..., 0], 0.0)
    return F.encode_cache_shard([f"s{i:06d}/img{j:06d}" for j in range(n)], labels, seeds, ids, prob, lprob,
                                num_classes=c, prob_dtype="float16")


def _with_keys(table, keys):
    """A synthetic physical shard table with other sample keys (the same records under new names)."""
    import pyarrow as pa
    n, e = int(F.cache_meta(table)["samples"]), int(F.cache_meta(table)["epochs"])
    return table.set_column(0, "key", pa.array(list(keys) + [""] * (n * (e - 1)), pa.string()))


def _write(args) -> dict:
    out, i, base, n, e = args
    name = F.shard_name("train", i)
    t = _with_keys(base, [f"s{i:06d}/img{j:06d}" for j in range(n)])
    entry = {"name": name, "bytes": 0, "mtime_ns": 0, "sha256": "0" * 64, "file": F.cache_file_name(name),
             "samples": n, "records": n * e, "excluded": 0, "skipped": [], "errors": []}
    md = dict(t.schema.metadata)
    md.update({b"shard": name.encode(), b"entry": json.dumps(entry).encode()})
    data = F.ipc_bytes(t.replace_schema_metadata(md))
    atomic_write_bytes(Path(out) / entry["file"], data)
    return dict(entry, file_bytes=len(data), file_sha256=hashlib.sha256(data).hexdigest())


def _encode(args):
    return _shard_table(*args)


def build(out: Path, shards: int, n: int, e: int, k: int, c: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        bases = list(pool.map(_encode, [(i, n, e, k, c) for i in range(min(UNIQUE, shards))]))
        entries = list(pool.map(_write, [(str(out), i, bases[i % len(bases)], n, e) for i in range(shards)],
                                chunksize=16))
    classes = [f"n{i:08d}" for i in range(c)]
    identity = {"teacher": {"members": [{"spec": "synthetic", "kind": "none", "sha256": ""}], "input_size": 224,
                            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "temperature": 1.0},
                "policy": {"canonical": {}, "id": "synthetic", "version": 1},
                "topk": k, "epochs": e, "num_classes": c, "classes": classes,
                "exclude": {"count": 0, "keys_sha256": ""}}
    manifest = F.cache_manifest(identity, entries, source={"shards": "synthetic", "dir": str(out)},
                                bench={"shards": shards, "samples": n, "epochs": e, "topk": k, "classes": c})
    atomic_write_json(out / F.MANIFEST_NAME, manifest)
    size = sum(x["file_bytes"] for x in entries)
    print(f"built {shards} shards x {n} samples x {e} epochs (K={k}, {c} classes) in {time.perf_counter() - t0:.1f}s: "
          f"{size / 1e6:.1f} MB, {size / (n * e * shards):.1f} B/record")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/distill-bench-cache")
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--classes", type=int, default=21841)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    out = Path(a.dir)
    shape = {"shards": a.shards, "samples": a.samples, "epochs": a.epochs, "topk": a.topk, "classes": a.classes}
    try:
        m = json.loads((out / F.MANIFEST_NAME).read_text())
        have = m.get("bench") if m.get("version") == F.CACHE_VERSION else None   # a cache of another format: rebuilt
    except (OSError, ValueError):
        have = None
    if have != shape:
        build(out, a.shards, a.samples, a.epochs, a.topk, a.classes)

    import distill
    opens, tables, first = [], [], None
    for r in range(a.repeats):
        t0 = time.perf_counter()
        cache = distill.open_cache(out)
        opens.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        t = cache.to_table(epochs=[0])
        dt = time.perf_counter() - t0
        first = dt if first is None else first
        tables.append(dt)
        assert t.num_rows == a.shards * a.samples, t.num_rows
        del t
    o, tt = statistics.median(opens), statistics.median(tables)
    records = a.shards * a.samples
    print(f"open_cache({a.shards} shards):            median {o * 1e3:7.1f} ms  "
          f"({o / OPEN_LIMIT_S:.2f} of the {OPEN_LIMIT_S:g} s limit)")
    print(f"to_table(epochs=[0]) {records:,} records: median {tt * 1e3:7.1f} ms  "
          f"({tt / TABLE_LIMIT_S:.2f} of the {TABLE_LIMIT_S:g} s limit; first run {first * 1e3:.0f} ms, "
          f"{records / tt / 1e6:.2f} M records/s)")
    ok = o < OPEN_LIMIT_S and tt < TABLE_LIMIT_S
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

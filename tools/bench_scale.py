"""ImageNet-21K scale, measured with the real code on synthetic data, projected to 14.2M x 90 x K.

Prints ONE JSON line (and, with --write, the section for BENCHMARKS.md on stderr) with:

* ``bytes_per_record``: cache bytes per (sample, epoch) record, 21,841 classes, K=10, E=90, records of
  ``bench_teachers.synthetic_records`` (views overlap like a real teacher's) in shards of 1,420
  samples (14.2M over 10,000 shards), written with the cache's own encoder;
* ``epoch_read_amplification``: bytes decompressed to read one cached epoch the way train-student
  does (``train.data.TRAIN_READ_COLUMNS``, plus the per-sample digests it checks each image against) / bytes of that epoch's logical records (key, seed,
  topk_idx, topk_prob, label, label_prob as ``Cache.to_table`` returns them); also the bytes read from
  disk (counted through the file) / the file's bytes per epoch;
* ``driver_rss_mb_per_1m_samples``: growth of the driver's peak RSS per 1M samples (slope between two
  sizes, the largest over the stages) at 1/1000 and 1/100 of ImageNet-21K (14,200 and 142,000
  samples; --quick: 14,200 and 42,600), shards of 1,420 samples: cache-teacher (2 epochs: E only
  changes the bytes of the one shard result in flight) and filter-labels run for real (Ray workers are
  other processes) on tiny-JPEG shards; verify, open_cache + a record of the last shard, and the
  duplicate-key check of cache-teacher's finish run on synthetic E=90 caches;
* ``classes_per_batch_ratio`` / ``same_class_pair_ratio_to_chance``: a 200-class image-folder tree in
  class order, written by make-shards (shuffles by default), read by the real DistillDataset with mixing
  (batch 64, 2 ranks' splits, 3 epochs): distinct classes per batch / a perfectly shuffled batch's,
  and the rate of same-class mix partners / chance.

Every stage of the driver RSS runs in its own child process (``--child``), so one stage's memory does
not hide another's.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

FULL = 14_200_000
TEACHER = REPO / "shards" / "demo" / "teacher.pt"      # 10 classes, 32 px


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak so far (VmHWM), MB. (Not ru_maxrss: Linux keeps
    that across exec, so a child would report its parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------- inputs

def tiny_shards(out: Path, n: int, per_shard: int = 1420, classes: int = 10) -> Path:
    """Real webdataset shards of n tiny JPEGs (distinct keys, a few distinct images) with index.json."""
    from PIL import Image

    from distill.data.shards import Sample, write_shards
    if (out / "index.json").exists():
        return out
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
        imgs.append(buf.getvalue())
    samples = (Sample(f"s{i:08d}", imgs[i % 8], "jpg", int(i % classes)) for i in range(n))
    write_shards(samples, out, "train", per_shard, classes=[str(c) for c in range(classes)])
    return out


def synthetic_cache(out: Path, n: int, per_shard: int = 1420) -> Path:
    import bench_notebook
    if not (out / "manifest.json").exists():
        with contextlib.redirect_stdout(sys.stderr):        # stdout carries the one JSON line
            bench_notebook.build(out, max(1, n // per_shard), per_shard, 90, 10, 21841)
    return out


# ----------------------------------------------------------------------------- child: one stage, its RSS growth

def child(spec: dict) -> dict:
    stage, base = spec["stage"], 0.0
    import distill  # noqa: F401  (imports before the baseline)
    from distill.cache import stage as cstage
    from distill.cache import verify as cverify
    from distill.config import CacheConfig, FilterConfig
    import torch  # noqa: F401
    import ray  # noqa: F401
    base = _rss_mb()
    if stage == "cache-teacher":
        cstage.cache_teacher(CacheConfig(shards=spec["shards"], teacher=(str(TEACHER),), out=spec["out"], epochs=2,
                                         topk=5, teacher_input_size=32, batch_size=256, quiet=True, workers=1,
                                         threads=1, overwrite=True), {"size": 32})
    elif stage == "filter-labels":
        from distill.filter.stage import filter_labels
        filter_labels(FilterConfig(shards=spec["shards"], scorer=(str(TEACHER),), out=spec["out"], topk=5,
                                   scorer_input_size=32, batch_size=256, quiet=True, workers=1, threads=1,
                                   overwrite=True))
    elif stage == "verify":
        res = cverify.verify_cache(spec["cache"])
        assert res.ok, res.summary()
    elif stage == "open-record":
        c = distill.open_cache(spec["cache"])
        last = c.shard_names[-1]
        c.record(c.keys(last)[-1], 89)
    elif stage == "duplicates":
        c = distill.open_cache(spec["cache"])
        assert cstage._duplicate_keys(c.path, c.manifest["shards"]) == []
    peak = _rss_mb("VmHWM")
    parts = {f: round(_rss_mb(f), 1) for f in ("RssAnon", "RssFile", "RssShmem")}   # where the resident memory is, at the end
    return {"stage": stage, "base_mb": round(base, 1), "peak_mb": round(peak, 1), "growth_mb": round(peak - base, 1),
            "end": parts}


def run_child(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    if r.returncode != 0:
        raise RuntimeError(f"{spec['stage']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def driver_rss(tmp: Path, quick: bool) -> dict:
    sizes = (14_200, 42_600) if quick else (14_200, 142_000)   # 1/1000 and 1/100 of ImageNet-21K (full)
    real = syn = sizes
    out = {}
    for stage in ("cache-teacher", "filter-labels"):
        g = []
        for n in real:
            sh = tiny_shards(tmp / f"tiny-{n}", n)
            g.append(run_child({"stage": stage, "shards": str(sh), "out": str(tmp / f"{stage}-{n}")})["growth_mb"])
        out[stage] = {"samples": list(real), "growth_mb": g, "mb_per_1m": round((g[1] - g[0]) / (real[1] - real[0]) * 1e6, 1)}
    for stage in ("verify", "open-record", "duplicates"):
        g = []
        for n in syn:
            g.append(run_child({"stage": stage, "cache": str(synthetic_cache(tmp / f"syn-{n}", n))})["growth_mb"])
        out[stage] = {"samples": list(syn), "growth_mb": g, "mb_per_1m": round((g[1] - g[0]) / (syn[1] - syn[0]) * 1e6, 1)}
    return out


# ----------------------------------------------------------------------------- bytes per record, epoch reads

def storage_and_reads(tmp: Path, quick: bool) -> dict:
    import pyarrow as pa

    import bench_teachers
    from distill import format as F
    from distill.cache.reader import open_cache
    from distill.data.augment import derive_seed
    from distill.files import CountingFile, atomic_write_json
    from distill.train.data import TRAIN_READ_COLUMNS
    res = {}
    for k, cands in ((10, 48), (100, 480)):
        n, shards = (1420, 1) if quick or k == 100 else (1420, 3)
        d = tmp / f"bpr-k{k}"
        d.mkdir()
        entries, nbytes = [], 0
        for s in range(shards):
            labels, ids, probs, lp = bench_teachers.synthetic_records(n, 90, k=k, candidates=cands, seed=s)
            keys = [f"n{s:02d}_{i:06d}" for i in range(n)]
            seeds = np.array([[derive_seed(0, e, key) for e in range(90)] for key in keys], np.uint32)
            digests = np.random.default_rng(s).integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
            data = F.ipc_bytes(F.encode_cache_shard(keys, labels, seeds, ids, probs, lp, num_classes=21841, digests=digests,
                                                    shard=f"train-{s:06d}.tar"))
            (d / f"train-{s:06d}.arrow").write_bytes(data)
            nbytes += len(data)
            import hashlib
            entries.append({"name": f"train-{s:06d}.tar", "file": f"train-{s:06d}.arrow", "samples": n,
                            "records": n * 90, "file_bytes": len(data), "file_sha256": hashlib.sha256(data).hexdigest()})
        res[f"k{k}"] = {"bytes_per_record": round(nbytes / (n * 90 * shards), 2), "samples": n * shards}
        if k != 10:
            continue
        atomic_write_json(d / "manifest.json", F.cache_manifest({"epochs": 90, "topk": k, "num_classes": 21841}, entries))
        cache = open_cache(d)
        dec, disk = [0], [0]
        real_fetch = F.CacheFile.fetch

        def counting(self, e, cols, a, b):
            t = real_fetch(self, e, cols, a, b)
            dec[0] += t.nbytes
            return t
        F.CacheFile.fetch = counting
        for e_ in entries:            # one epoch as train-student reads it, counting bytes read from disk too
            raw = CountingFile(d / e_["file"])
            with F.CacheFile(d / e_["file"], source=pa.PythonFile(raw, mode="r")) as cf:
                cf.read(epochs=[37], columns=TRAIN_READ_COLUMNS)
                cf.digests()          # each sample's digest, checked as its image is read
            disk[0] += raw.bytes
        F.CacheFile.fetch = real_fetch
        logical = cache.to_table(epochs=[37], columns=["key", "seed", "topk_idx", "topk_prob", "label", "label_prob"])
        res["read"] = {"epoch": 37, "columns": list(TRAIN_READ_COLUMNS), "decompressed_bytes": dec[0],
                       "logical_bytes": logical.nbytes, "disk_bytes": disk[0], "file_bytes_per_epoch": nbytes / 90,
                       "amplification": round(dec[0] / logical.nbytes, 3),
                       "disk_amplification": round(disk[0] / (nbytes / 90), 3),
                       "disk_bytes_per_sample_epoch": round(disk[0] / (n * shards), 2)}
    return res


# ----------------------------------------------------------------------------- mixed batches

def mixing(tmp: Path, quick: bool) -> dict:
    from PIL import Image

    from distill.data import augment, views
    from distill.data.shards import make_shards, resolve_shards
    from batch_mix import classes_per_batch_ratio, same_class_pair_ratio
    from distill.train.data import DistillDataset
    from distill.train.order import shard_refs
    classes, per, epochs = 200, (8 if quick else 16), 3
    src = tmp / "folders"
    rng = np.random.default_rng(0)
    for c in range(classes):
        (src / f"c{c:03d}").mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(src / f"c{c:03d}" / f"c{c:03d}_{i}.jpg")
    make_shards(src, tmp / "mixed", shard_size=100)
    paths, index = resolve_shards(tmp / "mixed")
    spec = views.ViewSpec(augment.load_policy(None, {"size": 32, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 1.0}))
    counts = [per] * classes
    batches, pairs = [], []
    for rank in range(2):            # two readers (DDP ranks), each with its own split and shuffle buffer
        ds = DistillDataset(shard_refs(paths, [s.samples for s in index.shards]), spec=spec, image_size=32,
                         batch_size=64, seed=0, shuffle_buffer=1000, num_classes=classes, rank=rank, world=2)
        for epoch in range(epochs):      # each epoch draws other partners (seeds differ per epoch)
            ds.set_epoch(epoch)
            for b in ds:
                labels = b["label"].tolist()
                batches.append(labels)
                pairs += [(a, p) for a, p, lam in zip(labels, b["label2"].tolist(), b["lam"].tolist()) if lam < 1.0]
    return {"classes": classes, "samples": classes * per, "epochs": epochs, "batches": len(batches),
            "classes_per_batch_ratio": round(classes_per_batch_ratio(batches, counts), 3),
            "same_class_pair_ratio_to_chance": round(same_class_pair_ratio(pairs, counts), 3), "mixed_pairs": len(pairs)}


# ----------------------------------------------------------------------------- projection

def project(res: dict) -> dict:
    out = {}
    for k in ("k10", "k100"):
        out[f"cache_gb_{k}"] = round(res["storage"][k]["bytes_per_record"] * FULL * 90 / 1e9, 1)
    slope = res["driver_rss_mb_per_1m_samples"]
    out["driver_gb_at_14_2m"] = round(slope * FULL / 1e6 / 1e3, 2)
    per = res["storage"]["read"]["disk_bytes_per_sample_epoch"]
    out["epoch_read_gb_total"] = round(per * FULL / 1e9, 2)
    out["epoch_read_gb_per_gpu_8"] = round(per * FULL / 8 / 1e9, 2)
    out["epoch_read_gb_per_gpu_64"] = round(per * FULL / 64 / 1e9, 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CI)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distill-scale-") as tmp:
        tmp = Path(tmp)
        storage = storage_and_reads(tmp, a.quick)
        mix = mixing(tmp, a.quick)
        rss = driver_rss(tmp, a.quick)
    slope = max(v["mb_per_1m"] for v in rss.values())
    res = {"driver_rss_mb_per_1m_samples": slope,
           "epoch_read_amplification": storage["read"]["amplification"],
           "bytes_per_record": storage["k10"]["bytes_per_record"],
           "classes_per_batch_ratio": mix["classes_per_batch_ratio"],
           "same_class_pair_ratio_to_chance": mix["same_class_pair_ratio_to_chance"],
           "quick": a.quick, "storage": storage, "mixing": mix, "driver_rss": rss}
    res["projection_14_2m_x_90"] = project(res)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

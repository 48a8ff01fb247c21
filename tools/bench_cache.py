"""cache-teacher benchmarks: efficiency against the bare teacher, bytes per record, worker scaling.

    python tools/bench_cache.py [--quick] [--only efficiency,storage,scaling]

1. efficiency: steady-state records/s of cache-teacher (one worker, all cores; shard task time, so
   Ray start-up and model loading are excluded) divided by the bare teacher's forward images/s on
   ready tensors (same device, batch size and threads), with a ResNet-18-shaped teacher (1.8 GMACs
   per 224x224 image) on ImageNet-sized JPEGs (500x375, quality 90).
2. storage: bytes per record at K=10 counting every file in CACHE_DIR, for (a) the demo teacher on
   the demo shards and (b) a synthetic 21,841-class teacher whose views overlap like a real one's
   (about 28 distinct top-10 classes over 90 views of an image), at 90 epochs.
3. scaling: records/s with 1 and 2 Ray workers of one torch thread each, and growth with samples,
   epochs and K (same teacher as 1, smaller input to keep it short).
Each figure is a ratio measured in one run; absolute rates are for orientation only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_teachers  # noqa: E402
from bench_augment import make_jpegs  # noqa: E402
from distill.cache import cache_teacher  # noqa: E402
from distill.config import CacheConfig  # noqa: E402
from distill.data.shards import Sample, write_shards  # noqa: E402

POLICY = {"size": 224, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}


def make_shard_dir(root: Path, n: int, per_shard: int, num_classes: int = 1000, size=(500, 375)) -> Path:
    (root / "jpeg").mkdir(parents=True, exist_ok=True)
    imgs = make_jpegs(root / "jpeg", min(n, 256), *size)
    samples = (Sample(f"img_{i:07d}", imgs[i % len(imgs)], "jpg", i % num_classes) for i in range(n))
    write_shards(samples, root / "shards", "train", per_shard, [f"c{i}" for i in range(num_classes)])
    return root / "shards"


def bare_forward(model, batch: int, size: int, threads: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        for _ in range(5):          # TorchScript's profiling executor optimises over the first calls
            model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - t0)


def run_cache(shards: Path, out: Path, teacher: str, policy_table: dict = POLICY, **kw):
    base = dict(shards=str(shards), teacher=(teacher,), out=str(out), epochs=2, topk=10, quiet=True, overwrite=True)
    base.update(kw)
    return cache_teacher(CacheConfig(**base), policy_table)


def _whole_command(shards: Path, out: Path, script: Path, epochs: int, batch: int, threads: int) -> float:
    """Wall seconds of the ``distill cache-teacher`` command in a fresh process: interpreter and imports,
    its own embedded Ray, the worker's start, model load, every shard, the manifest."""
    import subprocess
    cmd = [sys.executable, "-m", "distill.cli", "cache-teacher", "--shards", str(shards), "--teacher", str(script),
           "--out", str(out), "--epochs", str(epochs), "--topk", "10", "--batch-size", str(batch),
           "--teacher-input-size", "224", "--workers", "1", "--threads", str(threads), "--quiet", "--overwrite",
           "--policy", str(out.parent / "policy.toml")]
    (out.parent / "policy.toml").write_text("[policy]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in POLICY.items()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in sys.path if p]))
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"cache-teacher command failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return wall


def _efficiency_of(tmp: Path, name: str, model, *, images: int, shards: int, epochs: int, batch: int, secs: float,
                   whole: bool, repeats: int) -> dict:
    """One teacher: steady-state records/s of the shard tasks (and, with ``whole``, of the whole command)
    over the bare forward's img/s. This machine's speed drifts by +-10% over minutes, so the runs
    alternate with the baseline (bare, cache, bare, cache, bare): each run is divided by the mean of the
    bare rates measured just before and just after it, and the ratio is the mean over ``repeats`` runs."""
    import copy
    from distill.models.catalog import count_gflops
    from distill.memory import keep_heap
    keep_heap()      # the bare forward gets the worker's allocator settings: the ratio is the pipeline's overhead alone
    cores = os.cpu_count() or 1
    slug = "".join(c if c.isalnum() else "-" for c in name.split(" (")[0]).lower()
    script = tmp / f"{slug}.pt"
    torch.jit.script(model).save(str(script))
    gmacs = count_gflops(copy.deepcopy(model), 224)
    shard_dir = make_shard_dir(tmp / f"eff-{slug}", images, -(-images // shards))

    def bare() -> float:
        return bare_forward(torch.jit.load(str(script)).eval(), batch, 224, cores, secs)

    bares, runs = [bare()], []
    for r in range(repeats):
        res = run_cache(shard_dir, tmp / f"eff-{slug}-cache{r}", str(script), epochs=epochs, batch_size=batch,
                        workers=1, threads=cores, teacher_input_size=224)
        wall = (_whole_command(shard_dir, tmp / f"eff-{slug}-cmd{r}", script, epochs, batch, cores)
                if whole else None)
        bares.append(bare())
        runs.append((res, wall, (bares[-2] + bares[-1]) / 2))
    steady = [res.steady_records_per_s / b for res, _, b in runs]
    row = {"teacher": name, "gmacs_per_image": round(gmacs, 2), "threads": cores, "batch": batch, "images": images,
           "shards": shards, "epochs": epochs, "records": runs[0][0].records, "repeats": repeats,
           "cache_records_per_s": round(float(np.mean([res.steady_records_per_s for res, _, _ in runs])), 2),
           "bare_images_per_s": round(float(np.mean(bares)), 2), "bare_runs": [round(b, 2) for b in bares],
           "ratio": round(float(np.mean(steady)), 3), "ratio_runs": [round(x, 3) for x in steady],
           "teacher_share_of_worker_time": round(float(np.mean([res.teacher_share for res, _, _ in runs])), 3)}
    if whole:
        cmd = [res.records / wall / b for res, wall, b in runs]
        row.update(command_wall_s=round(float(np.mean([w for _, w, _ in runs])), 1),
                   command_records_per_s=round(float(np.mean([res.records / w for res, w, _ in runs])), 2),
                   command_ratio=round(float(np.mean(cmd)), 3), command_ratio_runs=[round(x, 3) for x in cmd])
    return row


def efficiency(tmp: Path, quick: bool) -> dict:
    """ResNet-18-like (1.8 GMACs, 4 runs: one setup spreads by +-10% on this machine) and ViT-S/16-like
    (4.6 GMACs, 2 runs) TorchScript teachers; the ViT also as the whole command (1,200 records: 300 images in 2 shards x 4 epochs, batch 32; quick: far fewer)."""
    secs = 5 if quick else 12
    resnet = _efficiency_of(tmp, "ResNet-18-like (TorchScript)", bench_teachers.resnet18_like(),
                            images=32 if quick else 96, shards=1, epochs=2 if quick else 8,
                            batch=16 if quick else 32, secs=secs, whole=False, repeats=1 if quick else 4)
    torch.manual_seed(0)
    vit = _efficiency_of(tmp, "ViT-S/16-like (TorchScript)", bench_teachers.ViTLike(dim=384, depth=12, heads=6).eval(),
                         images=32 if quick else 300, shards=2, epochs=1 if quick else 4, batch=16 if quick else 32,
                         secs=secs, whole=True, repeats=1 if quick else 2)
    return {**resnet, "teachers": [resnet, vit]}


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def storage(tmp: Path, quick: bool) -> dict:
    out = {}
    demo = REPO / "shards" / "demo" / "train"
    res = run_cache(demo, tmp / "demo-cache", str(REPO / "shards/demo/teacher.pt"), epochs=8, topk=10,
                    teacher_input_size=32, batch_size=128, policy_table={"size": 32, "scale": [0.35, 1.0], "hflip": 0.0,
                                                                       "auto_augment": "rand-n1-m5-mstd0.5-inc1", "re_prob": 0.0})
    out["demo"] = {"classes": 10, "epochs": 8, "records": res.records, "bytes": _dir_bytes(tmp / "demo-cache"),
                   "bytes_per_record": round(_dir_bytes(tmp / "demo-cache") / res.records, 2)}
    # (b) synthetic 21,841-class teacher: records from bench_teachers.synthetic_records, written with
    # the cache's own encoder and writer, one file per 1,000-sample shard plus its manifest entry
    from distill.format import encode_cache_shard, ipc_bytes
    from distill.files import atomic_write_bytes, atomic_write_json
    from distill.data.augment import derive_seed
    n, epochs, shards_n = (200, 90, 1) if quick else (1000, 90, 2)
    d = tmp / "syn-cache"
    d.mkdir()
    entries, distinct = [], []
    for s in range(shards_n):
        labels, ids, probs, lp = bench_teachers.synthetic_records(n, epochs, seed=s)
        keys = [f"n{s:02d}_{i:06d}" for i in range(n)]
        seeds = np.array([[derive_seed(0, e, k) for e in range(epochs)] for k in keys], np.uint32)
        digests = np.random.default_rng(s).integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
        table = encode_cache_shard(keys, labels, seeds, ids, probs, lp, num_classes=21841, shard=f"train-{s:06d}.tar",
                                   digests=digests)
        atomic_write_bytes(d / f"train-{s:06d}.arrow", ipc_bytes(table))
        entries.append({"name": f"train-{s:06d}.tar", "bytes": 10 ** 9, "sha256": "0" * 64, "file": f"train-{s:06d}.arrow",
                        "samples": n, "records": n * epochs, "excluded": 0, "skipped": [], "errors": [],
                        "file_bytes": 0, "file_sha256": "0" * 64})
        distinct += [len(np.unique(ids[i])) for i in range(n)]
    atomic_write_json(d / "manifest.json", {"classes": [f"n{i:08d}" for i in range(21841)], "shards": entries})
    records = shards_n * n * epochs
    files = _dir_bytes(d) - (d / "manifest.json").stat().st_size
    out["synthetic_21k"] = {"classes": 21841, "epochs": epochs, "records": records,
                            "bytes_per_record_shard_files": round(files / records, 2),
                            "bytes_per_record_with_manifest": round(_dir_bytes(d) / records, 2),
                            "manifest_note": "the manifest lists 21,841 class names once per cache (~0.3 MB)",
                            "distinct_top10_classes_per_image": round(float(np.mean(distinct)), 1),
                            "tinyvit_format_bytes_per_record": 44}
    return out


def scaling(tmp: Path, quick: bool) -> dict:
    """Worker scaling and growth, ResNet-18-like teacher, torch limited to one intra-op thread per worker.

    workers: the same 8 equal shards (4 in quick mode) with 1 and with 2 Ray workers, in interleaved
    pairs (3 in full mode: 1-2, 2-1, 1-2), each run started when the machine is quiet (other load
    < 5% of the cores, waiting up to 3 minutes). The aggregate rate is records / makespan of the shard
    tasks (first task start to last task end), so Ray start-up and model loading are out but
    everything while the workers run is in. Each run also reports the CPU the workers got (process
    CPU seconds / task seconds, producer thread included): on a shared machine it shows whether a run
    was starved. Full: 224 px input (the teacher dominates a worker's time, as with any real teacher);
    quick: 112 px, one pair.
    growth: one worker, one thread, 112 px; samples, epochs and K each at x1, x4, x16 (K 10, 40, 100)
    around a base of S samples x 2 epochs x K=10, one shard each. Time = shard task time (excludes Ray
    start and model load), bytes = every file in CACHE_DIR. An affine fit y = a + b*x per series:
    linear means R^2 close to 1 (the intercept a is the fixed per-run cost)."""
    from distill.cache.writer import CacheWorker

    class TimedWorker(CacheWorker):   # + the process CPU time of each shard task
        def run(self, task: dict) -> dict:
            c0 = time.process_time()
            r = CacheWorker.run(self, task)
            r["cpu_s"] = time.process_time() - c0
            return r

    def timed_run(shards: Path, out: Path, teacher: str, **kw):
        """run_cache with TimedWorker, recording each shard task's (start, end, cpu_s, wall_s) on the
        driver's clock (perf_counter is the system-wide monotonic clock on Linux; start = arrival - wall)."""
        import distill.engine as engine
        spans, orig = [], engine.run_pool

        def run_pool(worker_cls, *a, on_result=None, **k):
            def record(o):
                if o.result is not None:
                    t = time.perf_counter()
                    spans.append((t - o.result["wall_s"], t, o.result.get("cpu_s", 0.0), o.result["wall_s"]))
                if on_result is not None:
                    on_result(o)
            return orig(TimedWorker if worker_cls is CacheWorker else worker_cls, *a, on_result=record, **k)

        engine.run_pool = run_pool
        try:
            res = run_cache(shards, out, teacher, **kw)
        finally:
            engine.run_pool = orig
        return res, spans

    def busy(seconds: float = 3.0) -> float:
        """Fraction of all cores busy over the next few seconds (/proc/stat)."""
        def snap():
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return sum(v), v[3] + v[4]
        try:
            t0, i0 = snap()
            time.sleep(seconds)
            t1, i1 = snap()
            return 1 - (i1 - i0) / max(t1 - t0, 1)
        except OSError:
            return float("nan")

    def wait_quiet(limit_s: float) -> float:
        t0, b = time.time(), busy()
        while b > 0.05 and time.time() - t0 < limit_s:
            time.sleep(10)
            b = busy()
        return round(b, 3)

    def affine_fit(xs, ys) -> dict:
        """Least-squares y = a + b*x: slope, intercept, R^2 and the worst relative residual."""
        x, y = np.asarray(xs, float), np.asarray(ys, float)
        b, a = np.polyfit(x, y, 1)
        pred = a + b * x
        ss = float(((y - y.mean()) ** 2).sum())
        r2 = 1 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0
        return {"slope": float(b), "intercept": float(a), "r2": round(r2, 4),
                "max_rel_residual": round(float(np.max(np.abs(y - pred) / np.maximum(np.abs(y), 1e-12))), 4),
                # growth over the measured range relative to the mean: ~0 means flat (R^2 says nothing then)
                "rel_change_over_range": round(float(b * (x.max() - x.min()) / y.mean()), 4)}

    model = bench_teachers.resnet18_like()
    script = tmp / "r18.pt"
    torch.jit.script(model).save(str(script))
    out: dict = {"threads_per_worker": 1, "load_avg_before": [round(v, 2) for v in os.getloadavg()]}

    # ---- 1 vs 2 one-thread workers, interleaved pairs
    size = 112 if quick else 224
    per, n_shards, epochs = (8, 4, 2) if quick else (16, 8, 4)
    orders = [(1, 2)] if quick else [(1, 2), (2, 1), (1, 2)]
    sd = make_shard_dir(tmp / "sw", per * n_shards, per)
    kw = dict(teacher_input_size=size, batch_size=16, threads=1, policy_table=dict(POLICY, size=size))
    runs, pairs = [], []
    for i, order in enumerate(orders):
        pair = {}
        for w in order:
            quiet = wait_quiet(0 if quick else 180)
            r, spans = timed_run(sd, tmp / f"sw-{i}-{w}", str(script), workers=w, epochs=epochs, **kw)
            makespan = max(s[1] for s in spans) - min(s[0] for s in spans)
            row = {"pair": i, "workers": w, "records": r.records, "shards": len(spans), "busy_before": quiet,
                   "makespan_s": round(makespan, 2), "records_per_s": round(r.records / makespan, 2),
                   "cpu_per_worker": round(sum(s[2] for s in spans) / sum(s[3] for s in spans), 2),
                   "wall_s_incl_ray_start": round(r.wall_s, 2), "records_per_s_incl_ray_start": round(r.records / r.wall_s, 2)}
            runs.append(row)
            pair[w] = row
        pairs.append({"speedup": round(pair[2]["records_per_s"] / pair[1]["records_per_s"], 3),
                      "speedup_incl_ray_start": round(pair[2]["records_per_s_incl_ray_start"]
                                                      / pair[1]["records_per_s_incl_ray_start"], 3)})
    out["workers"] = {"input_size": size, "epochs": epochs, "shards": n_shards, "samples_per_shard": per,
                      "runs": runs, "pair_speedups": [p_["speedup"] for p_ in pairs],
                      "speedup": round(float(np.median([p_["speedup"] for p_ in pairs])), 3),
                      "speedup_incl_ray_start": round(float(np.median([p_["speedup_incl_ray_start"] for p_ in pairs])), 3),
                      "load_avg_after": [round(v, 2) for v in os.getloadavg()]}

    # ---- growth with samples, epochs and K (one worker, one thread, 112 px)
    s0 = 8 if quick else 32
    mults = (1, 4) if quick else (1, 4, 16)
    gkw = dict(teacher_input_size=112, batch_size=16, threads=1, policy_table=dict(POLICY, size=112), workers=1)
    dirs = {m: make_shard_dir(tmp / f"gs{m}", s0 * m, s0 * m) for m in mults}

    def one(name: str, shard_dir: Path, **k) -> dict:
        d = tmp / f"g-{name}"
        r = run_cache(shard_dir, d, str(script), **dict(gkw, **k))
        return {"records": r.records, "task_s": round(r.worker_s, 3), "bytes": _dir_bytes(d),
                "arrow_bytes": sum(f.stat().st_size for f in d.glob("*.arrow"))}

    base = one("base", dirs[1], epochs=2, topk=10)
    series = {"samples": {1: base}, "epochs": {1: base}, "K": {1: base}}
    ks = {1: 10, 4: 40, 16: 100}
    for m in mults[1:]:
        series["samples"][m] = one(f"s{m}", dirs[m], epochs=2, topk=10)
        series["epochs"][m] = one(f"e{m}", dirs[1], epochs=2 * m, topk=10)
        series["K"][m] = one(f"k{m}", dirs[1], epochs=2, topk=ks[m])
    growth = {"base": {"samples": s0, "epochs": 2, "K": 10}}
    for name, pts in series.items():
        ms = sorted(pts)
        xs = [ks[m] if name == "K" else m for m in ms]
        g = {"points": {f"x{m}" + (f" (K={ks[m]})" if name == "K" else ""): pts[m] for m in ms},
             "time_ratio": {f"x{m}": round(pts[m]["task_s"] / pts[1]["task_s"], 3) for m in ms[1:]},
             "bytes_ratio": {f"x{m}": round(pts[m]["bytes"] / pts[1]["bytes"], 3) for m in ms[1:]}}
        if len(ms) >= 3:
            g["time_fit"] = affine_fit(xs, [pts[m]["task_s"] for m in ms])
            g["bytes_fit"] = affine_fit(xs, [pts[m]["bytes"] for m in ms])
        growth[name] = g
    out["growth"] = growth
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run, a few minutes)")
    ap.add_argument("--only", default="efficiency,storage,scaling")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    import ray
    from distill.engine import EMBEDDED_RAY_CONFIG
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
             _system_config=EMBEDDED_RAY_CONFIG)              # as distill's embedded Ray
    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as d:
        for part in a.only.split(","):
            t0 = time.perf_counter()
            results[part] = {"efficiency": efficiency, "storage": storage, "scaling": scaling}[part](Path(d), a.quick)
            print(f"== {part} ({time.perf_counter() - t0:.0f}s)\n{json.dumps(results[part], indent=1)}", flush=True)
    ray.shutdown()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run every distill benchmark and write BENCHMARKS.md.

    python tools/bench.py                 # full run: regenerates BENCHMARKS.md (tens of minutes on 2 cores)
    python tools/bench.py --quick         # smoke run (< 5 min on 2 cores); prints, writes nothing
    python tools/bench.py --quick --write --out /tmp/B.md --only augment,projection
    python tools/bench.py --only scale,notebook --update   # re-measure some parts, merged into BENCHMARKS.md

Parts (``--only`` takes a comma-separated subset):

  augment     tools/bench_augment.py    seeded augmentation vs plain Pillow, draft-mode speedup (one core)
  views       here                      per-core decode and view costs (the projection's CPU input)
  cache       tools/bench_cache.py      cache-teacher vs the bare teacher; bytes per record
  scaling     tools/bench_cache.py      1 vs 2 one-thread Ray workers (waits for a quiet machine in full
                                        mode); growth with samples, epochs, K
  storage_k   here                      synthetic 21,841-class cache at K=10 and K=100
  filter      tools/bench_filter.py     filter-labels decision pass at 14M samples: peak memory
  train       tools/bench_train.py      loader and train-step ratios (cache vs hard labels)
  notebook    tools/bench_notebook.py   open_cache / to_table read times
  scale       tools/bench_scale.py      ImageNet-21K scale: driver RSS per 1M samples, bytes read per epoch,
                                        bytes/record, class mix per batch, same-class mix partners
  cli         tools/bench_cli.py        start-up: `distill --help` wall time against a bare Python start
  producers   tools/bench_producers.py  views in the worker's thread vs view loader processes against a stub GPU
  gpu         tools/bench_gpu.py        the teacher pass and student steps on CUDA (--cpu-smoke without one)
  students    tools/bench_students.py   train-step img/s of each student family, as ratios to tinyvit-5m
  adapt       tools/bench_adapt.py      merged RepAdapter teacher: forward time ÷ the base's, max |Δ logit| vs unmerged
  integrity   tools/bench_integrity.py  what the integrity checks cost: bytes/record and loader img/s, checks on ÷ off
  faults      tools/faults.py           kill / corrupt / edit cases on the demo: survived, refused, silently wrong
  projection  here                      ImageNet-21K at 90 epochs, K=10 and K=100, from anchors + measurements

Stage scripts run as subprocesses; their JSON (``--json``) is used where they offer it, else their
printed lines are parsed. A script that is missing or fails is reported as "not run" / "failed" and
the rest goes on. Each figure is a ratio measured in one run against its baseline; absolute rates
are for orientation on this (shared) machine, whose load average is recorded with every part.
The projection is computed here from the anchors below and the measured numbers, never typed in.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = ("augment", "views", "cache", "scaling", "storage_k", "filter", "train", "notebook", "scale", "cli", "producers", "gpu",
         "students", "adapt", "integrity", "faults", "object_store", "projection")

# Reference numbers: measured by this project on one H100 (PyTorch 2.11, bf16 autocast, batch 256, random
# weights, speed only) or published by TinyViT (paper and reference implementation).
ANCHORS = {
    "teacher_img_s": 2260,            # CLIP ViT-L/14 forward, bf16, batch 256, 21,841 classes, one H100
    "student_img_s": 2653,            # TinyViT-21M train step (fwd+bwd+AdamW), one H100
    "student_online_img_s": 1234,     # the same + online ViT-L/14 teacher forward
    "student5m_img_s": 4040,          # TinyViT-5M train step
    "student5m_online_img_s": 1493,   # the same + online ViT-L/14
    "pillow_per_core_img_s": 315,     # Pillow decode + RandomResizedCrop + flip, 500x375 JPEG, one core
    "imagenet21k_images": 14_200_000,  # TinyViT's released cache: ~14.2M records per epoch
    "epochs": 90,
    "tinyvit_k100_published_gb": 481,  # TinyViT's released K=100, 90-epoch cache (values), "GB"
}
GOALS = {"efficiency": 0.90, "command": 0.85, "scaling": 1.7, "filter_mb": 2048, "loader": 0.95, "step": 0.97,
         "open_s": 1.0, "table_s": 2.0, "driver_mb_per_1m": 200, "read_amp": 1.5, "bytes_per_record": 27,
         "classes_per_batch": 0.9, "same_class_pairs": 2.0, "help_s": 0.5,
         "producers_2_over_1": 1.8, "stub_efficiency": 0.90, "integrity_loader": 0.98, "public": 0.98,
         "store_bytes": 1.5, "store_speed": 0.9}


# ----------------------------------------------------------------------------- environment

def machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for mod, name in (("torch", "torch"), ("ray", "ray"), ("pyarrow", "pyarrow"), ("PIL", "pillow")):
        try:
            versions[name] = __import__(mod).__version__
        except Exception:
            versions[name] = "not installed"
    return {"cores": os.cpu_count(), "cpu": cpu, "os": f"{platform.system()} {platform.release()}",
            "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ----------------------------------------------------------------------------- running the stage scripts

def run_script(name: str, args: list[str], timeout: float) -> dict:
    """Run tools/<name> with args; {"status", "stdout", "seconds", "load"} ("not run" if missing)."""
    path = HERE / name
    if not path.is_file():
        return {"status": "not run", "why": f"tools/{name} does not exist"}
    t0, before = time.perf_counter(), load()
    try:
        p = subprocess.run([sys.executable, str(path), *args], cwd=REPO, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "why": f"timed out after {timeout:.0f}s", "seconds": timeout}
    out = {"status": "ok" if p.returncode == 0 else "failed", "stdout": p.stdout, "args": args,
           "seconds": round(time.perf_counter() - t0, 1), "load": [before, load()]}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()
        out["why"] = f"exit {p.returncode}: " + (tail[-1] if tail else "")
    return out


def script_flags(name: str) -> str:
    """The script's source (to see which flags it offers today: its CLI may change)."""
    try:
        return (HERE / name).read_text()
    except OSError:
        return ""


def _args_if_offered(name: str, wanted: list[tuple[str, str | None]]) -> list[str]:
    src, out = script_flags(name), []
    for flag, value in wanted:
        if f'"{flag}"' in src:
            out += [flag] if value is None else [flag, value]
    return out


def part_augment(quick: bool, tmp: Path) -> dict:
    r = run_script("bench_augment.py", ["--quick"] if quick else [], 900 if quick else 3600)
    rows = []
    for line in r.get("stdout", "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 9 and cells[0].isdigit():
            num = lambda s: float(re.sub(r"[^0-9.+-]", "", s))  # noqa: E731
            rows.append({"size": int(cells[0]), "plain_img_s": num(cells[1]), "seeded_img_s": num(cells[2]),
                         "draft_img_s": num(cells[3]), "seeded_vs_plain_pct": num(cells[4]),
                         "decode_share_pct": num(cells[5]), "draft_speedup": num(cells[6]),
                         "draft_vs_plain": num(cells[7]), "views_using_draft_pct": num(cells[8])})
    r["rows"] = rows
    if r["status"] == "ok" and not rows:
        r.update(status="failed", why="no result table in the output")
    return r


def part_cache(quick: bool, tmp: Path, parts: str) -> dict:
    j = tmp / "bench_cache.json"
    r = run_script("bench_cache.py", (["--quick"] if quick else []) + ["--only", parts, "--json", str(j)],
                   1200 if quick else 5400)
    if j.is_file():
        r["json"] = json.loads(j.read_text())
    elif r["status"] == "ok":
        r.update(status="failed", why="no JSON written")
    return r


def part_scale(quick: bool, tmp: Path) -> dict:
    r = run_script("bench_scale.py", ["--quick"] if quick else [], 1200 if quick else 5400)
    lines = [x for x in r.get("stdout", "").splitlines() if x.startswith("{")]
    if lines:
        r["json"] = json.loads(lines[-1])
    elif r["status"] == "ok":
        r.update(status="failed", why="no JSON line printed")
    return r


def _json_part(name: str, args: list[str], timeout: float, status_from_json: bool = False) -> dict:
    r = run_script(name, args, timeout)
    lines = [x for x in r.get("stdout", "").splitlines() if x.startswith("{")]
    if lines:
        r["json"] = json.loads(lines[-1])
        if status_from_json:
            r["status"] = "ok"
    elif r["status"] == "ok":
        r.update(status="failed", why="no JSON line printed")
    return r


def part_cli(quick: bool, tmp: Path) -> dict:
    # the script exits 1 when the goal is missed; the numbers are still the result
    return _json_part("bench_cli.py", ["--repeats", "3" if quick else "5"], 300, status_from_json=True)


def part_producers(quick: bool, tmp: Path) -> dict:
    return _json_part("bench_producers.py", ["--quick"] if quick else [], 900 if quick else 2400)


def part_students(quick: bool, tmp: Path) -> dict:
    return _json_part("bench_students.py", ["--quick"] if quick else [], 600 if quick else 1800)


def part_adapt(quick: bool, tmp: Path) -> dict:
    return _json_part("bench_adapt.py", ["--quick"] if quick else [], 600 if quick else 1800)


def part_integrity(quick: bool, tmp: Path) -> dict:
    return _json_part("bench_integrity.py", ["--quick"] if quick else [], 900 if quick else 2400)


def part_faults(quick: bool, tmp: Path) -> dict:
    # exit 1 means a case came out silently wrong or crashed: the JSON line is the result either way
    return _json_part("faults.py", ["--quick"] if quick else [], 900 if quick else 2400, status_from_json=True)


def part_object_store(quick: bool, tmp: Path) -> dict:
    return _json_part("bench_storage.py", ["--quick"] if quick else [], 600 if quick else 1800)


def part_gpu(quick: bool, tmp: Path) -> dict:
    import importlib.util
    cuda = False
    if not quick and importlib.util.find_spec("torch"):
        import torch
        cuda = torch.cuda.is_available()
    return _json_part("bench_gpu.py", [] if cuda else ["--cpu-smoke"], 600 if not cuda else 3600)


def part_filter(quick: bool, tmp: Path) -> dict:
    """Every rule, each in its own process (peak RSS per rule); ``values`` holds the worst rule's figures."""
    r = _json_part("bench_filter.py", ["--rule", "all", "--json"] + (["--quick"] if quick else []),
                   900 if quick else 3600)
    j = r.get("json") or {}
    if j.get("rules"):
        worst = max(j["rules"].items(), key=lambda kv: kv[1]["peak_rss_mb"])
        r["values"] = {"samples": j["samples"], "topk": j["topk"], "peak_rss_mb": worst[1]["peak_rss_mb"],
                       "ratio_to_limit": worst[1]["peak_rss_mb"] / j["limit_mb"], "worst_rule": worst[0],
                       "dense_fp16_matrix_gb": j["dense_fp16_matrix_gb"], "decide_s": worst[1]["decide_s"],
                       "flagged_frac": worst[1]["flagged_frac"]}
    elif r["status"] == "ok":
        r.update(status="failed", why="no per-rule JSON in the output")
    if not quick:                # (minutes; the smoke run keeps to the memory figure)
        q = _json_part("bench_filter_quality.py", [], 900)
        r["quality"] = q.get("json") if q.get("status") == "ok" else {"status": q.get("status"), "why": q.get("why")}
    return r


def part_train(quick: bool, tmp: Path) -> dict:
    name = "bench_train.py"
    src = script_flags(name)
    if quick:
        args = ["--quick"] if '"--quick"' in src else _args_if_offered(name, [("--repeats", "2"), ("--steps", "3")])
    else:
        args = []
    if '"--json"' in src:
        args += ["--json", str(tmp / "train.json")]
    r = run_script(name, args, 900 if quick else 3600)
    if (tmp / "train.json").is_file():
        r["json"] = json.loads((tmp / "train.json").read_text())
    ratios, rates, section = {}, {}, None
    for line in r.get("stdout", "").splitlines():
        s = line.strip()
        m = re.match(r"^\((\w)\)\s*(.*)$", s)
        if m:
            text = m.group(2)
            section = ("public" if text.startswith("public") else "workers" if text.startswith("workers")
                       else "loader" if "loader" in text
                       else "step" if "step" in text else text)
            rates[section] = {"about": m.group(2).rstrip(":")}
            continue
        m = re.match(r"^ratio ([\d.]+)(?:\s*\(target >= ([\d.]+)\))?", s)
        if m and section:
            ratios[section] = {"ratio": float(m.group(1)), "target": float(m.group(2)) if m.group(2) else None}
            continue
        m = re.match(r"^(.*?)\s+([\d.,]+)\s*img/s", s)
        if m and section:
            rates[section][m.group(1).strip()] = float(m.group(2).replace(",", ""))
    r["ratios"], r["rates"] = ratios, rates
    if r["status"] == "ok" and not ratios:
        r.update(status="failed", why="no ratio lines in the output")
    return r


def part_notebook(quick: bool, tmp: Path) -> dict:
    name = "bench_notebook.py"
    src = script_flags(name)
    if quick:
        args = ["--quick"] if '"--quick"' in src else _args_if_offered(
            name, [("--shards", "100"), ("--repeats", "3"), ("--dir", str(tmp / "nb-cache"))])
    else:
        args = []
    r = run_script(name, args, 900 if quick else 3600)
    vals = {}
    for line in r.get("stdout", "").splitlines():
        m = re.match(r"^open_cache\((\d+) shards\):\s+median\s+([\d.]+) ms", line.strip())
        if m:
            vals.update(shards=int(m.group(1)), open_ms=float(m.group(2)))
        m = re.match(r"^to_table\(.*?\) ([\d,]+) records: median\s+([\d.]+) ms.*?first run ([\d.]+) ms", line.strip())
        if m:
            vals.update(records=int(m.group(1).replace(",", "")), table_ms=float(m.group(2)),
                        table_first_ms=float(m.group(3)))
    r["values"] = vals
    if r["status"] in ("ok", "failed") and "open_ms" not in vals:
        r.update(status="failed", why=r.get("why") or "no open_cache line in the output")
    elif r["status"] == "failed" and "open_ms" in vals:
        r["status"] = "ok"   # the script exits 1 when a limit is missed; the numbers are still the result
    return r


# ----------------------------------------------------------------------------- measured here

def part_views(quick: bool, tmp: Path) -> dict:
    """Per-core costs of the cache's CPU side at 224 px from 500x375 JPEGs (one thread): a full
    decode, and one view cut from an already decoded image (params decode + crop/resize + flip +
    RandAugment + to-tensor + erasing: the default policy), and the same view without RandAugment /
    erasing (the anchor's decode + RandomResizedCrop + flip)."""
    import torch
    sys.path[:0] = [str(REPO), str(HERE)]
    from bench_augment import make_jpegs
    from distill.data import augment as aug
    torch.set_num_threads(1)
    n, passes = (16, 3) if quick else (48, 7)
    (tmp / "views").mkdir(exist_ok=True)
    imgs = make_jpegs(tmp / "views", n)
    policies = {"full": aug.Policy(size=224), "crop_flip": aug.Policy(size=224, auto_augment=None, re_prob=0.0)}
    t = {"decode": [], "full": [], "crop_flip": []}
    for p in range(passes):            # interleaved passes, medians: noise hits all alike
        t0 = time.perf_counter()
        srcs = [aug.SourceImage(b) for b in imgs]
        for s in srcs:
            s.at(1)
        t["decode"].append((time.perf_counter() - t0) / n)
        for name, pol in policies.items():
            t0 = time.perf_counter()
            for e in range(4):
                for i, s in enumerate(srcs):
                    params = aug.decode(pol, aug.derive_seed(0, 4 * p + e, f"k{i}"), s.width, s.height)
                    aug.view(s, params, 224)
            t[name].append((time.perf_counter() - t0) / (4 * n))
    med = {k: statistics.median(v) for k, v in t.items()}
    E = ANCHORS["epochs"]
    return {"status": "ok", "images": n, "passes": passes, "load": load(),
            "decode_ms": round(med["decode"] * 1e3, 3), "view_ms": round(med["full"] * 1e3, 3),
            "crop_flip_view_ms": round(med["crop_flip"] * 1e3, 3),
            # decode + view every time (a student epoch, or no decode-once)
            "per_core_decode_and_view_img_s": round(1 / (med["decode"] + med["full"]), 1),
            # cache-teacher: one decode per image for all E epochs
            "per_core_cache_views_s": round(1 / (med["full"] + med["decode"] / E), 1),
            # the anchor's pipeline measured here, to compare this CPU with the anchor's
            "per_core_decode_crop_flip_img_s": round(1 / (med["decode"] + med["crop_flip"]), 1)}


def part_storage_k(quick: bool, tmp: Path) -> dict:
    """Bytes per record of a synthetic 21,841-class cache at 90 epochs, K=10 and K=100, written with
    the cache's own encoder. Overlap model (tools/bench_teachers.synthetic_records): each image has a
    pool of plausible classes whose per-view probabilities are perturbed; K=10 uses a pool of 48
    (about 28 distinct top-10 classes over 90 views, the overlap measured on a real teacher); K=100
    keeps the same pool-to-K ratio (480). The K=100 overlap is a model, not a measurement: pools of
    240 and 960 are measured too, to show how much the figure depends on it."""
    import numpy as np
    sys.path[:0] = [str(REPO), str(HERE)]
    import bench_teachers
    from distill.data.augment import derive_seed
    from distill.format import encode_cache_shard, ipc_bytes
    n, E, C = (60 if quick else 300), ANCHORS["epochs"], 21841
    out = {"status": "ok", "samples": n, "epochs": E, "classes": C}
    def measure(k: int, pool: int) -> dict:
        labels, ids, probs, lp = bench_teachers.synthetic_records(n, E, k=k, candidates=pool, seed=k + pool)
        keys = [f"n{i:08d}" for i in range(n)]
        seeds = np.array([[derive_seed(0, e, key) for e in range(E)] for key in keys], np.uint32)
        digests = np.random.default_rng(pool).integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
        table = encode_cache_shard(keys, labels, seeds, ids, probs, lp, num_classes=C, shard="train-000000.tar",
                                   digests=digests)
        return {"pool": pool, "bytes_per_record": round(len(ipc_bytes(table)) / (n * E), 2),
                "distinct_classes_per_image": round(float(np.mean([len(np.unique(ids[i])) for i in range(n)])), 1),
                "tinyvit_bytes_per_record": 4 * k + 4}

    out["K=10"] = measure(10, 48)
    out["K=100"] = measure(100, 480)
    # how much the K=100 figure depends on the overlap model: half and twice the pool
    out["K=100 sensitivity"] = [measure(100, pool) for pool in (240, 960)]
    return out


def projection(views: dict, storage: dict) -> dict:
    """ImageNet-21K, 90 epochs, one H100 per teacher/student: computed from ANCHORS and measurements."""
    A = ANCHORS
    N, E = A["imagenet21k_images"], A["epochs"]
    R = N * E
    gib = 2 ** 30
    out = {"status": "ok", "records": R}
    sizes = {}
    for k in (10, 100):
        s = storage.get(f"K={k}", {})
        ours = s.get("bytes_per_record")
        sizes[f"K={k}"] = {"distill_bytes_per_record": ours,
                    "distill_gb": round(R * ours / 1e9, 1) if ours else None,
                    "distill_gb_range": [round(R * x["bytes_per_record"] / 1e9, 1)
                                         for x in storage.get(f"K={k} sensitivity", [])],
                    "tinyvit_bytes_per_record": 4 * k + 4,
                    "tinyvit_gb": round(R * (4 * k + 4) / 1e9, 1), "tinyvit_gib": round(R * (4 * k + 4) / gib, 1)}
    out["cache_size"] = sizes
    teacher_h = R / A["teacher_img_s"] / 3600
    out["teacher_gpu_hours"] = round(teacher_h, 1)
    # CPU cores to keep one H100 running the teacher fed with views
    cores = {"anchor_decode_crop_flip_every_view": round(A["teacher_img_s"] / A["pillow_per_core_img_s"], 1),
             "student_feed_cores_anchor": round(A["student_img_s"] / A["pillow_per_core_img_s"], 1)}
    if views.get("status") == "ok":
        # this CPU vs the anchor's: the anchor's own pipeline (decode + crop + flip) measured here
        speed = views["per_core_decode_crop_flip_img_s"] / A["pillow_per_core_img_s"]
        cores["this_cpu_vs_anchor_cpu"] = round(speed, 3)
        for name, rate in (("decode_once_full_policy", views["per_core_cache_views_s"]),
                           ("decode_every_view_full_policy", views["per_core_decode_and_view_img_s"])):
            cores[f"{name}_views_s_this_cpu"] = rate
            cores[f"{name}_views_s_anchor_cpu"] = round(rate / speed, 1)
            cores[f"{name}_cores_this_cpu"] = round(A["teacher_img_s"] / rate, 1)
            cores[f"{name}_cores_anchor_cpu"] = round(A["teacher_img_s"] / (rate / speed), 1)
        cores["student_feed_cores_anchor_cpu"] = round(A["student_img_s"] / (views["per_core_decode_and_view_img_s"] / speed), 1)
        # one producer thread per GPU worker (distill.cache.ViewProducer) caps a worker at one core's views
        cores["one_producer_thread_share_of_teacher_rate"] = round(views["per_core_cache_views_s"] / speed / A["teacher_img_s"], 3)
    out["cores_per_gpu"] = cores
    # break-even: r runs with r * (online - offline) >= one-time cache cost (all in H100-hours)
    be = {}
    for name, off, on in (("TinyViT-21M", A["student_img_s"], A["student_online_img_s"]),
                          ("TinyViT-5M", A["student5m_img_s"], A["student5m_online_img_s"])):
        online_h, offline_h = R / on / 3600, R / off / 3600
        r = teacher_h / (online_h - offline_h)
        be[name] = {"online_h_per_run": round(online_h, 1), "offline_h_per_run": round(offline_h, 1),
                    "cache_h_once": round(teacher_h, 1), "break_even_runs": round(r, 3),
                    "first_cheaper_run": math.ceil(r),
                    "cumulative_h": {n: {"online": round(n * online_h), "offline": round(teacher_h + n * offline_h)}
                                     for n in (1, 2, 5, 10)}}
    out["break_even"] = be
    return out


# ----------------------------------------------------------------------------- BENCHMARKS.md

def _f(v, fmt="{:,.2f}", none="n/a"):
    return none if v is None else fmt.format(v)


def _run_line(env: dict, r: dict | None = None) -> str:
    v = env["versions"]
    s = (f"_{(r or {}).get('date') or env['date']}; {env['cores']} cores, {env['cpu']}, {env['os']}; Python {v['python']}, torch {v['torch']}, "
         f"ray {v['ray']}, pyarrow {v['pyarrow']}, Pillow {v['pillow']}")
    if r and r.get("load"):
        ld = r["load"]
        s += f"; load average {ld[0][0] if isinstance(ld[0], list) else ld[0]}"
    if r and r.get("seconds"):
        s += f"; {r['seconds']:.0f} s"
    return s + "._"


def _status(r: dict | None) -> str | None:
    if r is None:
        return "not run in this invocation"
    if r.get("status") != "ok":
        return f"{r.get('status', 'failed')}: {r.get('why', '')}"
    return None


def _ok(v, goal, higher=True) -> str:
    if v is None:
        return "n/a"
    return "meets" if (v >= goal if higher else v <= goal) else "**misses**"


def render(res: dict, env: dict, quick: bool) -> str:
    L = ["# Benchmarks", "",
         f"Generated by `python tools/bench.py{' --quick' if quick else ''}` — do not edit by hand.",
         f"Machine: {env['cores']} cores ({env['cpu']}), {env['os']}; Python {env['versions']['python']}, "
         f"torch {env['versions']['torch']}, ray {env['versions']['ray']}, pyarrow {env['versions']['pyarrow']}, "
         f"Pillow {env['versions']['pillow']}; {env['date']}.", "",
         "Every figure is a ratio measured in one run against its baseline (same machine, same moment); "
         "absolute rates are for orientation only. The machine is shared with other work: each section gives "
         "the load average when it ran.", ""]
    if quick:
        L += ["**Quick (smoke) run: small sizes, numbers are not representative.**", ""]

    # summary
    L += ["## Summary", "", "| figure | measured | goal | |", "|---|---:|---:|---|"]
    ce = res.get("cache", {}).get("json", {})
    for t in ce.get("efficiency", {}).get("teachers") or [ce.get("efficiency", {})]:
        eff, name = t.get("ratio"), (t.get("teacher") or "").replace(" (TorchScript)", "")
        L.append(f"| cache-teacher records/s ÷ bare teacher forward img/s, {name} (steady) | {_f(eff, '{:.3f}')} | ≥ {GOALS['efficiency']} | {_ok(eff, GOALS['efficiency'])} |")
        if t.get("command_ratio") is not None:
            c = t["command_ratio"]
            L.append(f"| whole `cache-teacher` command ÷ bare forward, {name}, {t['records']:,} records | {_f(c, '{:.3f}')} | ≥ {GOALS['command']} | {_ok(c, GOALS['command'])} |")
    sc = res.get("scaling", {}).get("json", {}).get("scaling", {}).get("workers", {})
    sp = sc.get("speedup")
    L.append(f"| cache-teacher, 2 one-thread workers ÷ 1 one-thread worker | {_f(sp, '{:.2f}×')} | ≥ {GOALS['scaling']}× | {_ok(sp, GOALS['scaling'])} |")
    st = ce.get("storage", {}).get("synthetic_21k", {})
    bpr = st.get("bytes_per_record_shard_files")
    L.append(f"| bytes/record, synthetic 21k classes, K=10, 90 epochs ÷ TinyViT's 44 B | {_f(bpr / 44 if bpr else None, '{:.2f}')} ({_f(bpr, '{:.1f}')} B) | < 1 | {_ok(bpr / 44 if bpr else None, 1.0, False)} |")
    fv = res.get("filter", {}).get("values", {})
    pk = fv.get("peak_rss_mb")
    L.append(f"| filter decision, {int(fv.get('samples', 0)):,} samples: peak RSS ÷ 2 GB | {_f(pk / GOALS['filter_mb'] if pk else None, '{:.3f}')} ({_f(pk, '{:,.0f}')} MB) | ≤ 1 | {_ok(pk, GOALS['filter_mb'], False)} |")
    tr = res.get("train", {}).get("ratios", {})
    for key, label in (("loader", "train loader, cache replay ÷ hard labels"), ("step", "train step, sparse soft targets ÷ hard labels")):
        v = tr.get(key, {}).get("ratio")
        L.append(f"| {label} | {_f(v, '{:.3f}')} | ≥ {GOALS[key]} | {_ok(v, GOALS[key])} |")
    v = tr.get("workers", {}).get("ratio")
    L.append(f"| train loader at 224 px, 2 DataLoader workers ÷ 0 (2 cores shared with the training process) | "
             f"{_f(v, '{:.3f}')} | none set | reported |")
    v = tr.get("public", {}).get("ratio")
    L.append(f"| `DistillDataset` in a plain DataLoader ÷ train-student's loader, 224 px, 2 workers each | "
             f"{_f(v, '{:.3f}')} | ≥ {GOALS['public']} | {_ok(v, GOALS['public'])} |")
    nb = res.get("notebook", {}).get("values", {})
    if nb:
        L.append(f"| open_cache({nb.get('shards', '?')} shards) ÷ 1 s | {_f(nb['open_ms'] / 1e3 if 'open_ms' in nb else None, '{:.3f}')} | ≤ 1 | {_ok(nb.get('open_ms', 0) / 1e3 if 'open_ms' in nb else None, 1.0, False)} |")
        L.append(f"| to_table(epochs=[0]), {nb.get('records', 0):,} records ÷ 2 s | {_f(nb['table_ms'] / 2e3 if 'table_ms' in nb else None, '{:.3f}')} | ≤ 1 | {_ok(nb.get('table_ms', 0) / 2e3 if 'table_ms' in nb else None, 1.0, False)} |")
    else:
        L.append("| notebook reads | n/a | | not run |")
    sj = res.get("scale", {}).get("json", {})
    for key, label, goal, higher in (
            ("driver_rss_mb_per_1m_samples", "driver peak RSS growth, MB per 1M samples (worst stage)", "driver_mb_per_1m", False),
            ("epoch_read_amplification", "bytes decompressed to train one epoch ÷ bytes of its records", "read_amp", False),
            ("bytes_per_record", "bytes/record, format 2 (synthetic 21k classes, K=10, 90 epochs)", "bytes_per_record", False),
            ("classes_per_batch_ratio", "distinct classes per batch ÷ a perfectly shuffled batch's", "classes_per_batch", True),
            ("same_class_pair_ratio_to_chance", "same-class mix partners ÷ chance", "same_class_pairs", False)):
        v = sj.get(key)
        L.append(f"| {label} | {_f(v, '{:.3f}' if key != 'driver_rss_mb_per_1m_samples' else '{:.0f}')} | "
                 f"{'≥' if higher else '≤'} {GOALS[goal]} | {_ok(v, GOALS[goal], higher)} |")
    pj = res.get("producers", {}).get("json", {})
    for key, label, goal in (("processes_2_over_1", "view producers: 2 processes ÷ 1 (views/s, stub GPU)", "producers_2_over_1"),
                             ("stub_efficiency_processes", "cache-teacher ÷ a stub GPU at 80% of 2 producers' capacity", "stub_efficiency")):
        v = pj.get(key)
        L.append(f"| {label} | {_f(v, '{:.3f}')} | ≥ {GOALS[goal]} | {_ok(v, GOALS[goal])} |")
    tv = (pj.get("tail") or {}).get("cut_over_whole")
    L.append(f"| shard tail, 3 blocks on 2 producer processes: last block shared out by epochs ÷ whole blocks (views/s) "
             f"| {_f(tv, '{:.3f}')} | none set | {'reported' if tv is not None else 'not run'} |")
    hs = res.get("cli", {}).get("json", {}).get("help_s")
    L.append(f"| `distill --help` wall time, median (s) | {_f(hs, '{:.3f}')} | < {GOALS['help_s']} | {_ok(hs, GOALS['help_s'], False)} |")
    aj = res.get("adapt", {}).get("json", {})
    ar = aj.get("ratio_merged_over_base")
    L.append(f"| merged RepAdapter teacher forward ÷ base forward | {_f(ar, '{:.3f}')} | ≤ 1.02 | {_ok(ar, 1.02, False)} |")
    ij = res.get("integrity", {}).get("json", {})
    v = (ij.get("loader") or {}).get("ratio")
    L.append(f"| train loader at 224 px, integrity checks on ÷ off | {_f(v, '{:.3f}')} | ≥ {GOALS['integrity_loader']} | "
             f"{_ok(v, GOALS['integrity_loader'])} |")
    v = (ij.get("bytes") or {}).get("checked_bytes_per_record")
    L.append(f"| bytes/record with digests + checksums (1,420 samples x 90 epochs, K=10, 21k classes) | {_f(v, '{:.2f}')} | "
             f"≤ {GOALS['bytes_per_record']} | {_ok(v, GOALS['bytes_per_record'], False)} |")
    fj = res.get("faults", {}).get("json", {})
    v = None if not fj else fj.get("silently_wrong", 0) + fj.get("crashed", 0)
    L.append(f"| fault cases silently wrong or crashed (of {fj.get('cases', '?')}) | {_f(v, '{:d}')} | 0 | {_ok(v, 0, False)} |")
    oj = res.get("object_store", {}).get("json", {})
    for when in ("first", "later"):
        v = (oj.get("bytes") or {}).get(when, {}).get("bytes_per_epoch_bytes")
        g = (oj.get("bytes") or {}).get(when, {}).get("gets")
        L.append(f"| s3:// cache, bytes fetched to train one epoch ÷ the epoch's bytes ({when} epoch; {_f(g, '{:d}')} GETs) | "
                 f"{_f(v, '{:.3f}')} | ≤ {GOALS['store_bytes']} | {_ok(v, GOALS['store_bytes'], False)} |")
    v = (oj.get("speed") or {}).get("remote_over_local")
    L.append(f"| train loader, s3:// cache + shards ÷ local disk, {oj.get('delay_ms', '?')} ms per request, "
             f"{oj.get('image_size', '?')} px, 2 workers | {_f(v, '{:.3f}')} | ≥ {GOALS['store_speed']} | "
             f"{_ok(v, GOALS['store_speed'])} |")
    L.append("")

    L += _sec_augment(res, env) + _sec_cache(res, env) + _sec_storage(res, env) + _sec_scaling(res, env)
    L += _sec_filter(res, env) + _sec_train(res, env) + _sec_notebook(res, env) + _sec_projection(res, env)
    L += _sec_scale(res, env) + _sec_cli(res, env) + _sec_producers(res, env) + _sec_gpu(res, env) + _sec_students(res, env) + _sec_adapt(res, env)
    L += _sec_integrity(res, env) + _sec_faults(res, env) + _sec_object_store(res, env)
    L += ["## Raw results", "", "<details><summary>JSON of this run (parsed outputs; full stdout omitted)</summary>", "",
          "```json", json.dumps(_strip(res), indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(L)


def _recorded(report: Path) -> dict:
    """The results JSON a report embeds (its Raw results section), to merge newly measured parts into."""
    text = report.read_text() if report.is_file() else ""
    if "```json" not in text:
        raise SystemExit(f"--update: {report} holds no results JSON to merge into")
    old = json.loads(text.split("## Raw results", 1)[1].split("```json", 1)[1].split("```", 1)[0])
    date = old.get("machine", {}).get("date")
    for v in old.values():              # parts of a report made before per-part dates: the report's date
        if isinstance(v, dict) and "status" in v:
            v.setdefault("date", date)
    return old


def _strip(res: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "stdout"} if isinstance(v, dict) else v for k, v in res.items()}


def _sec_augment(res, env):
    r = res.get("augment")
    L = ["## 1. Augmentation, per core", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    L += ["`tools/bench_augment.py`: one thread, 500×375 JPEGs (quality 90), every view decoded from the bytes. "
          "*plain* = Pillow + Python `random` (RandomResizedCrop, flip, timm RandAugment rand-m9-mstd0.5-inc1, "
          "to-tensor, RandomErasing 0.25); *seeded* = `distill.data.augment` (derive_seed → decode → view), draft off; "
          "*draft* = the same with JPEG draft mode (the default).", "",
          "| size | plain img/s | seeded img/s | seeded + draft img/s | seeded time vs plain | draft speedup (seeded ÷ draft time) | views using draft |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        L.append(f"| {x['size']} | {x['plain_img_s']:.0f} | {x['seeded_img_s']:.0f} | {x['draft_img_s']:.0f} | "
                 f"{x['seeded_vs_plain_pct']:+.1f}% | ×{x['draft_speedup']:.2f} | {x['views_using_draft_pct']:.0f}% |")
    v = res.get("views", {})
    if v.get("status") == "ok":
        L += ["", f"Decode once, cut many views (measured here, one thread, 224 px, {v['images']} images, median of {v['passes']} passes; "
              f"_load average {v['load'][0]}_): full decode {v['decode_ms']:.2f} ms/image; one view from a decoded image "
              f"{v['view_ms']:.2f} ms (default policy with RandAugment and erasing), {v['crop_flip_view_ms']:.2f} ms (crop + flip only). "
              f"Per core: **{v['per_core_cache_views_s']:.0f} views/s** when one decode serves 90 epochs (cache-teacher), "
              f"{v['per_core_decode_and_view_img_s']:.0f} img/s decoding every view (a student epoch), "
              f"{v['per_core_decode_crop_flip_img_s']:.0f} img/s for decode + crop + flip (the anchor's 315 img/s pipeline: "
              f"this core is ×{v['per_core_decode_crop_flip_img_s'] / ANCHORS['pillow_per_core_img_s']:.2f} the anchor machine's)."]
    return L + [""]


def _sec_cache(res, env):
    r = res.get("cache")
    L = ["## 2. cache-teacher efficiency", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    e = r["json"].get("efficiency")
    if not e:
        return L + ["not run in this invocation", ""]
    rows = e.get("teachers") or [e]
    L += ["`tools/bench_cache.py efficiency`: one worker with all cores' torch threads, 500x375 JPEGs, 224 px views "
          "(RandAugment + erasing). *Steady*: records/s of the shard tasks from the first teacher batch to the last "
          "(decode once; on the CPU views and the teacher take turns on the cores; top-K, Arrow encode; Ray start and "
          "model load excluded). *Command*: records ÷ the wall time of the whole `distill cache-teacher` command in a "
          "fresh process (imports, embedded Ray, worker start, model load, manifest; a CPU worker needs no warm-up forwards: its TorchScript teacher runs unoptimised, at the same speed). Both against the bare "
          "teacher forward on ready tensors (same threads and batch). This machine's speed drifts by ±10% over "
          "minutes, so runs alternate with the baseline (bare, cache, bare, ...): each run is divided by the mean of the "
          "bare rates just before and after it; the ratio is the mean over the runs (each run's in parentheses).", "",
          "| teacher | GMACs/image | batch | records | cache-teacher records/s (steady) | bare teacher img/s | steady ÷ bare | "
          "command records/s | command ÷ bare | teacher share of worker time |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in rows:
        L.append(f"| {t['teacher']} | {t['gmacs_per_image']} | {t['batch']} | {t['records']:,} | {t['cache_records_per_s']:.1f} | "
                 f"{t['bare_images_per_s']:.1f} | **{t['ratio']:.3f}**{_runs(t.get('ratio_runs'))} | "
                 f"{_f(t.get('command_records_per_s'), '{:.1f}')} | {_f(t.get('command_ratio'), '{:.3f}')}"
                 f"{_runs(t.get('command_ratio_runs'))} | {t['teacher_share_of_worker_time']:.0%} |")
    L += ["", f"Goals: steady ÷ bare ≥ {GOALS['efficiency']}, command ÷ bare ≥ {GOALS['command']} (ViT-S/16-like, 1,200 records)."]
    ratios = [r for t in rows for r in (t.get("ratio_runs") or [t["ratio"]]) + (t.get("command_ratio_runs") or [])]
    if any(r > 1 for r in ratios):
        spread = "; ".join(f"{t['teacher'].split(' (')[0]} {min(t['bare_runs']):.1f}-{max(t['bare_runs']):.1f} img/s"
                           for t in rows if t.get("bare_runs"))
        L.append("A ratio above 1 is the baseline's drift, not a pipeline faster than its own teacher: the bare rates of "
                 f"this one run spread {spread}.")
    L.append("")
    return L


def _runs(values) -> str:
    """' (a, b)': each run's ratio, when there was more than one."""
    return f" ({', '.join(f'{v:.3f}' for v in values)})" if values and len(values) > 1 else ""


def _sec_storage(res, env):
    r = res.get("cache")
    L = ["## 3. Storage: bytes per record", "", _run_line(env, r), ""]
    s = (r or {}).get("json", {}).get("storage")
    if _status(r) or not s:
        L += [_status(r) or "not run in this invocation", ""]
    else:
        d, y = s["demo"], s["synthetic_21k"]
        L += ["Every file of the cache counted (the shard files its manifest lists, `manifest.json` and `run.json`: "
              "what summaries and `distill inspect` count, never other files sharing CACHE_DIR) unless said "
              "otherwise; TinyViT's format stores 4K+4 bytes per record (K=10: 44 B) plus separate key files.", "",
              "| cache | records | bytes/record | ÷ TinyViT 44 B |", "|---|---:|---:|---:|",
              f"| demo teacher on the demo shards (10 classes, {d['epochs']} epochs, K=10) | {d['records']:,} | {d['bytes_per_record']:.1f} | {d['bytes_per_record'] / 44:.2f} |",
              f"| synthetic 21,841 classes, {y['epochs']} epochs, K=10 (shard files) | {y['records']:,} | {y['bytes_per_record_shard_files']:.1f} | {y['bytes_per_record_shard_files'] / 44:.2f} |",
              f"| the same with its manifest (21,841 class names once per cache) | | {y['bytes_per_record_with_manifest']:.1f} | |",
              "", f"Synthetic views overlap like a real teacher's: {y['distinct_top10_classes_per_image']} distinct top-10 classes "
              "per image over 90 views (measured on a real teacher: about 28).", ""]
    k = res.get("storage_k")
    if k and k.get("status") == "ok":
        k10, k100 = k["K=10"], k["K=100"]
        L += [f"K=10 vs K=100 (measured here with the cache's encoder, {k['samples']} synthetic samples × 90 epochs; "
              "each image has a pool of plausible classes (K=10: 48, which gives the ~28 distinct top-10 classes over "
              "90 views measured on a real teacher); the K=100 overlap is a model: a pool of 480, the same pool-to-K ratio, "
              "with half and twice that pool below it to show the sensitivity):", "",
              "| K | distinct classes per image (90 views) | distill B/record | TinyViT B/record | ratio |", "|---:|---:|---:|---:|---:|",
              f"| 10 | {k10['distinct_classes_per_image']} | {k10['bytes_per_record']:.1f} | 44 | {k10['bytes_per_record'] / 44:.2f} |",
              f"| 100 | {k100['distinct_classes_per_image']} | {k100['bytes_per_record']:.1f} | 404 | {k100['bytes_per_record'] / 404:.2f} |",
              *[f"| 100 (pool {x['pool']}) | {x['distinct_classes_per_image']} | {x['bytes_per_record']:.1f} | 404 | {x['bytes_per_record'] / 404:.2f} |"
                for x in k.get("K=100 sensitivity", [])], ""]
    return L


def _verdict(fit: dict | None) -> str:
    if not fit:
        return "two points only (quick run): no fit"
    change = fit.get("rel_change_over_range")
    if change is not None and abs(change) < 0.10 and fit["max_rel_residual"] < 0.05:
        return (f"flat, no growth (changes {change:+.1%} across the range, every point within "
                f"{fit['max_rel_residual']:.1%} of the fit)")
    lin = fit["r2"] >= 0.99
    return (f"{'linear' if lin else '**not linear**'} (affine fit R² = {fit['r2']:.4f}, "
            f"worst residual {fit['max_rel_residual']:.1%})")


def _sec_scaling(res, env):
    r = res.get("scaling")
    L = ["## 4. Scaling", "", _run_line(env, r), ""]
    s = (r or {}).get("json", {}).get("scaling")
    if _status(r) or not s:
        return L + [_status(r) or "not run in this invocation", ""]
    w = s["workers"]
    L += ["### Ray workers (torch limited to one intra-op thread per worker)", "",
          f"ResNet-18-like teacher at {w['input_size']} px, {w['shards']} equal shards × {w['samples_per_shard']} samples × "
          f"{w['epochs']} epochs (RandAugment policy), 1 and 2 workers in interleaved pairs, each run started when the "
          "machine was quiet (other load < 5% of the cores, waiting up to 3 minutes; *busy before* is what it was). "
          "Aggregate rate = records ÷ makespan of the shard tasks (first task start to last task end, on the shared "
          "monotonic clock): Ray start and model load are out, everything while the workers run is in. *CPU per worker* = "
          "process CPU seconds ÷ task seconds (view producers included): below ~1 the worker was starved by other load. "
          f"Load average before {s['load_avg_before'][0]}, after {w['load_avg_after'][0]}.", "",
          "| pair | workers | records | busy before | makespan s | records/s | CPU per worker | wall s incl. Ray start | records/s incl. Ray start |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in w["runs"]:
        L.append(f"| {x['pair'] + 1} | {x['workers']} | {x['records']} | {x['busy_before']:.0%} | {x['makespan_s']:.2f} | "
                 f"{x['records_per_s']:.1f} | {x['cpu_per_worker']:.2f} | {x['wall_s_incl_ray_start']:.1f} | "
                 f"{x['records_per_s_incl_ray_start']:.1f} |")
    L += ["", f"**2 workers ÷ 1 worker = {w['speedup']:.2f}×** (median of the pairs: "
          + ", ".join(f"{v:.2f}×" for v in w["pair_speedups"])
          + f"; goal ≥ {GOALS['scaling']}×: {_ok(w['speedup'], GOALS['scaling'])}); including Ray start and model loading: "
          f"{w['speedup_incl_ray_start']:.2f}×.", ""]
    g = s["growth"]
    b = g["base"]
    L += ["### Growth with samples, epochs and K", "",
          f"One worker, one thread, ResNet-18-like at 112 px; base = {b['samples']} samples × {b['epochs']} epochs × K={b['K']} "
          "in one shard, each series multiplies one of them by 4 and 16 (K: 10, 40, 100). Time = shard task time (Ray "
          "start and model load excluded); bytes = every file in CACHE_DIR (includes a fixed manifest with the 1,000 "
          "class names and the Arrow schema, hence the intercept). Linear = an affine fit y = a + b·x explains the points "
          "(R² ≥ 0.99); the slope b is the marginal cost.", "",
          "| series | point | records | time s | time ÷ base | bytes | bytes ÷ base |", "|---|---|---:|---:|---:|---:|---:|"]
    for name in ("samples", "epochs", "K"):
        ser = g[name]
        for label, p in ser["points"].items():
            m = label.split()[0]
            tr, br = ser["time_ratio"].get(m, 1.0), ser["bytes_ratio"].get(m, 1.0)
            L.append(f"| {name} | {label} | {p['records']:,} | {p['task_s']:.2f} | {tr:.2f} | {p['bytes']:,} | {br:.3f} |")
    L.append("")
    base_records = g["samples"]["points"]["x1"]["records"]
    for name in ("samples", "epochs", "K"):
        ser = g[name]
        tf, bf = ser.get("time_fit"), ser.get("bytes_fit")
        if name == "K":   # x = K; records fixed at the base
            t_slope = f"; {tf['slope'] * 1e3:.2f} ms per unit of K, fixed {tf['intercept']:.2f} s" if tf else ""
            b_slope = f"; {bf['slope'] / base_records:.2f} B per record per unit of K, fixed {bf['intercept']:,.0f} B" if bf else ""
        else:             # x = multiplier of the base's records
            t_slope = (f"; marginal {tf['slope'] / base_records * 1e3:.1f} ms per record, fixed {tf['intercept']:.2f} s"
                       if tf else "")
            b_slope = (f"; marginal {bf['slope'] / base_records:.1f} B per record, fixed {bf['intercept']:,.0f} B"
                       if bf else "")
        L.append(f"- **{name}**: time {_verdict(tf)}{t_slope}; bytes {_verdict(bf)}{b_slope}.")
    fs = {n: (g[n].get("time_fit"), g[n].get("bytes_fit")) for n in ("samples", "epochs")}
    if all(t and b_ for t, b_ in fs.values()):
        (ts, bs), (te, be) = fs["samples"], fs["epochs"]
        L += ["", f"Marginal cost per record: {ts['slope'] / base_records * 1e3:.1f} ms and {bs['slope'] / base_records:.1f} B "
              f"when samples grow, {te['slope'] / base_records * 1e3:.1f} ms and {be['slope'] / base_records:.1f} B when epochs "
              "grow: an extra epoch reuses the image's decode and its class dictionary (the classes its views share), "
              "an extra sample brings its own."]
    L.append("")
    return L


def _sec_filter(res, env):
    r = res.get("filter")
    L = ["## 5. filter-labels decision memory and quality", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    v, rules = r["values"], (r.get("json") or {}).get("rules", {})
    L += [f"`tools/bench_filter.py --rule all`: each rule's decision over {int(v['samples']):,} synthetic samples "
          f"(21,841 classes, top-{int(v['topk'])}, 10% wrong labels), streamed in chunks, in its own process; "
          f"the dense N×C fp16 matrix cleanlab needs would be {v['dense_fp16_matrix_gb']:,.1f} GB.", "",
          "| rule | peak RSS MB | ÷ 2 GB limit | time s (incl. generating data) | flagged | noise pairs |",
          "|---|---:|---:|---:|---:|---:|"]
    for name, x in rules.items():
        L.append(f"| `{name}` | {x['peak_rss_mb']:,.0f} | **{x['peak_rss_mb'] / 2048:.3f}** | {x['decide_s']:.1f} | "
                 f"{x['flagged_frac']:.1%} | {x['noise_pairs']:,} |")
    q = r.get("quality") or {}
    if "best_cleanlab_f1" in q:
        L += ["", "`tools/bench_filter_quality.py` (synthetic set with a known error matrix, 20% flips, asymmetric "
              "within groups of similar classes; cleanlab on the same dense probabilities): best distill pruning rule "
              f"`{q['best_distill_prune_rule_kC']}` F1 **{q['best_distill_prune_f1_kC']:.4f}** at K = C against cleanlab's "
              f"best (`{q['best_cleanlab_method']}`) {q['best_cleanlab_f1']:.4f}; at 1,000 classes F1 {q['f1_kC_1000cls']:.4f} "
              f"at K = C, {q['f1_k10_1000cls']:.4f} at K = 10, {q['f1_k5_1000cls']:.4f} at K = 5."]
    elif q:
        L += ["", f"quality benchmark: {q.get('status')}: {q.get('why') or 'cleanlab not installed'}"]
    return L + [""]


def _sec_train(res, env):
    r = res.get("train")
    L = ["## 6. train-student loader and step", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    L += ["`tools/bench_train.py`: (a) the loader replaying the cache (seeds + top-K from Arrow, sparse targets "
          "collated) vs the same views with hard labels; (b) a train step with sparse targets densified on the device + "
          "soft cross-entropy vs `F.cross_entropy` on hard labels. Interleaved repeats, medians.", "",
          "| part | setting | with the cache img/s | hard labels img/s | ratio | goal |", "|---|---|---:|---:|---:|---:|"]
    for key in ("loader", "step"):
        rt, ra = r["rates"].get(key, {}), r["ratios"].get(key, {})
        nums = [v for k, v in rt.items() if k != "about"]
        a, b = (nums + [None, None])[:2]
        L.append(f"| {key} | {rt.get('about', '')} | {_f(a, '{:,.1f}')} | {_f(b, '{:,.1f}')} | **{_f(ra.get('ratio'), '{:.3f}')}** | "
                 f"≥ {ra.get('target') or GOALS[key]} |")
    rt, ra = r["rates"].get("workers"), r["ratios"].get("workers")
    if rt and ra:
        nums = [v for k, v in rt.items() if k != "about"] + [None, None]
        L += ["", "(c) the trainer's own loader (`DistillLoader`: persistent workers, prefetch 4) over the "
              "cache replay with 2 worker processes vs 0 (the stream in the training process), alternating passes:", "",
              "| setting | 2 workers img/s | 0 workers img/s | 2 ÷ 0 | goal |", "|---|---:|---:|---:|---:|",
              f"| {rt.get('about', '').removeprefix('workers: ')} | {_f(nums[0], '{:,.1f}')} | {_f(nums[1], '{:,.1f}')} | "
              f"**{_f(ra.get('ratio'), '{:.3f}')}** | none set |", "",
              "On this 2-core machine the two workers share the cores with the training process, which receives "
              "every batch (float32 on a CPU device); `--loader-workers` defaults to cores − 1 = 1 here. On a GPU node "
              "the workers have cores of their own and ship uint8 (`--device-views`)."]
    rt, ra = r["rates"].get("public"), r["ratios"].get("public")
    if rt and ra:
        nums = [v for k, v in rt.items() if k != "about"] + [None, None]
        L += ["", "(d) the public `distill.DistillDataset` in a plain `torch.utils.data.DataLoader(ds, batch_size=None, "
              "num_workers=2, persistent_workers=True)`, as a user's own loop has it, vs train-student's loader "
              "(`DistillLoader`, prefetch 4) over the same cache replay, alternating passes:", "",
              "| setting | plain DataLoader img/s | train-student's loader img/s | ratio | goal |", "|---|---:|---:|---:|---:|",
              f"| {rt.get('about', '').removeprefix('public ')} | {_f(nums[0], '{:,.1f}')} | {_f(nums[1], '{:,.1f}')} | "
              f"**{_f(ra.get('ratio'), '{:.3f}')}** | ≥ {GOALS['public']} |"]
    return L + [""]


def _sec_notebook(res, env):
    r = res.get("notebook")
    L = ["## 7. Notebook reads", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    v = r["values"]
    L += ["`tools/bench_notebook.py`: a synthetic 21,841-class cache written with the cache's encoder; medians of repeated runs.", "",
          "| operation | median | limit | ÷ limit |", "|---|---:|---:|---:|",
          f"| `open_cache` ({v['shards']:,} shards) | {v['open_ms']:.1f} ms | 1 s | **{v['open_ms'] / 1e3:.3f}** |",
          f"| `to_table(epochs=[0])` ({v['records']:,} records) | {v['table_ms']:.1f} ms (first run {v['table_first_ms']:.0f} ms) | 2 s | **{v['table_ms'] / 2e3:.3f}** |", ""]
    return L


def _sec_cli(res, env):
    r = res.get("cli")
    L = ["## 10. Start-up: `distill --help`", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    j = r["json"]
    L += [f"`tools/bench_cli.py`: fresh processes, median of {j['repeats']}, interleaved with the baselines. "
          "The CLI imports neither torch, Ray, pyarrow nor numpy for `--help` (the stages load them when they run).", "",
          "| command | median | ÷ `python -c pass` |", "|---|---:|---:|",
          f"| `python -c pass` | {j['python_s']:.3f} s | 1 |",
          f"| `distill --help` | {j['help_s']:.3f} s | **{j['help_over_python']:.1f}** |",
          f"| `distill train-student --help` | {j['train_student_help_s']:.3f} s | {j['train_student_help_s'] / j['python_s']:.1f} |",
          f"| `python -c 'import torch'` (what `--help` no longer pays) | {j['import_torch_s']:.3f} s | {j['import_torch_s'] / j['python_s']:.1f} |", ""]
    return L


def _sec_integrity(res, env):
    r = res.get("integrity")
    L = ["## 15. What the integrity checks cost", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    b, lo = r["json"]["bytes"], r["json"]["loader"]
    return L + [
        "`tools/bench_integrity.py`. (a) A cache file at ImageNet-21K's shape (21,841 classes, K=10, "
        f"{b['epochs']} epochs, {b['samples']:,} samples, synthetic teacher records) written by the cache's own "
        "encoder and writer with the per-sample digest column and the footer's CRC-32 of every (batch, column), "
        "against the same records without either. (b) The real `DistillDataset` replaying a real cache (demo teacher; "
        f"{lo['images']} JPEGs of ~{lo['image_kb']} KB, views at {lo['view_px']} px, RandAugment, erasing, "
        "mixup/cutmix) with every check on (each record batch's CRC-32, each image's digest of its bytes and "
        "label) against the same stream with both off; whole passes alternate, medians compared.", "",
        "| | checks on | checks off | ratio |", "|---|---:|---:|---:|",
        f"| bytes/record | {b['checked_bytes_per_record']:.3f} | {b['bare_bytes_per_record']:.3f} | {b['ratio']:.4f} "
        f"(+{b['extra_bytes_per_record']:.3f} B) |",
        f"| loader img/s | {lo['checked_img_s']:,.1f} | {lo['unchecked_img_s']:,.1f} | **{lo['ratio']:.3f}** |", "",
        f"Passes (img/s), on: {lo['passes_checked']}; off: {lo['passes_unchecked']}.", ""]


def _sec_faults(res, env):
    r = res.get("faults")
    L = ["## 16. Reliability: kill, corrupt and edit cases", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    j = r["json"]
    L += ["`tools/faults.py`: the real CLI on a copy of the demo data (3 shards x 48 samples, demo teacher, 2 "
          "epochs): kills at each point of cache-teacher and train-student, bit flips in cache files, edited "
          "manifests, a shard changed in place, an incomplete shard, hostile file names, a crafted `.pt2` teacher, "
          "undecodable images with and without view producer processes. Outcomes: survived identical (the rerun "
          "or resume gives the undisturbed result byte for byte), refused cleanly (one short line, exit 2, or 1 "
          "where the command reports failed shards or problems, and nothing downstream accepted the data), "
          "silently wrong, crashed.", "",
          f"**{j['cases']} cases: {j['survived_identical']} survived identical, {j['refused_cleanly']} refused cleanly, "
          f"{j['silently_wrong']} silently wrong, {j['crashed']} crashed** ({j['wall_s']:.0f} s).", ""]
    if j.get("rows"):
        L += ["| case | what was done | outcome |", "|---|---|---|"]
        L += [f"| {x['name']} | {x['what']} | {x['outcome']} |" for x in j["rows"]]
        L.append("")
    return L


def _sec_producers(res, env):
    r = res.get("producers")
    L = ["## 11. View producers against a simulated GPU", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    j = r["json"]
    c = j["capacity"]
    L += [f"`tools/bench_producers.py`: the real cache-teacher over synthetic 500x375 JPEGs ({j['images']} images x "
          f"{j['epochs']} epochs, {j['size']} px views, RandAugment + erasing, batch {j['batch']}), one Ray worker; a stub "
          "teacher that sleeps per batch (releasing the GIL, `distill_off_cpu`) stands in for a GPU. Steady-state records/s "
          "(first teacher batch to last: Ray, actor and producer start and the pipeline's first fill excluded). On a CPU "
          "device producer processes also finish their views (normalise, erase, mix), so the worker only runs the "
          "teacher; embedded Ray runs its workers at normal priority (Ray's default nice 15 lost to its own daemons). "
          "Producer processes (a DataLoader's spawned workers) decode each image once, keep glibc's heap and send "
          "their pieces through shared memory. The "
          "steady window still holds the shard's drain (a producer without a block idles while the last blocks "
          "finish), which a real ImageNet-21K shard (~126,000 views) spreads over 30x as many views as this one.", "",
          "| views made by | views/s |", "|---|---:|",
          f"| the worker's thread (`--view-workers 0`) | {c['thread_0']:,.1f} |",
          f"| 1 process (`--view-workers 1`) | {c['processes_1']:,.1f} |",
          f"| 2 processes (`--view-workers 2`) | {c['processes_2']:,.1f} |",
          f"| 2 processes ÷ 1 | **{j['processes_2_over_1']:.3f}** |", "",
          f"With the stub at {j['stub_img_s']:,.1f} img/s (80% of 2 processes' capacity): cache-teacher reaches "
          f"**{j['stub_efficiency_processes']:.3f}** of the stub's rate with 2 processes, {j['stub_efficiency_thread']:.3f} "
          "with the views made in the worker's thread.", ""]
    t = j.get("tail")
    if t:
        m = t["model"]
        L += [f"**Shard tail.** Whole blocks end every shard in a drain: B blocks on P producers take ceil(B / P) rounds, "
              f"the last with B mod P producers busy. The producers' planner (`tasks_of`) sizes each round of P tasks "
              f"ceil(views left / P) in epochs, so the last blocks are shared out by epoch ranges on piece boundaries "
              f"(records unchanged; a cut costs one more decode and parameter pass of its block). Measured: 2 producer "
              f"processes over a shard of {t['blocks']} blocks ({t['images']} images x {t['epochs']} epochs), pieces "
              f"taken as they come: {t['cut_views_s']:,.1f} views/s with the cut, {t['whole_views_s']:,.1f} with whole "
              f"blocks: **{t['cut_over_whole']:.3f}** ({', '.join(f'{r:.3f}' for r in t['cut_over_whole_runs'])}; "
              f"interleaved pairs). Modelled for an ImageNet-21K shard (22 blocks of 64 x 90 epochs, equal producers, a "
              f"cut at 1.5 views per image): producer use {m['7_producers']['whole']:.3f} -> {m['7_producers']['cut']:.3f} "
              f"on 7 producers (a ViT-L/14 H100's), {m['15_producers']['whole']:.3f} -> {m['15_producers']['cut']:.3f} "
              f"on 15 (a ViT-B/16 H100's).", ""]
    return L


def _sec_gpu(res, env):
    r = res.get("gpu")
    L = ["## 12. GPU", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    j = r["json"]
    if j.get("smoke"):
        L += ["Not measured on a GPU: no CUDA device was available to this run. `tools/bench_gpu.py --cpu-smoke` ran its "
              "code paths at tiny shapes on the CPU (the numbers below are not GPU figures). On a CUDA machine: "
              "`python tools/bench_gpu.py` (goals: cache-teacher ÷ bare forward ≥ 0.95 for the ViT-L/14-shaped teacher, "
              "≥ 0.85 for ViT-B/16; TinyViT-21M offline ÷ online ≥ 2.0; bf16 vs fp32 top-1 agreement ≥ 99%).", ""]
    L += [f"Device: {j['device']}, {j['cpu_cores']} CPU cores; batch {j['batch']}, {j['images']} images x {j['epochs']} epochs.", "",
          "| teacher | bare forward img/s | cache-teacher records/s (tasks) | ÷ bare | whole command | CPU cores busy |",
          "|---|---:|---:|---:|---:|---:|"]
    for name in ("vit_l14", "vit_b16"):
        t = j.get(name) or {}
        L.append(f"| {name} | {_f(t.get('bare_img_s'), '{:,.1f}')} | {_f(t.get('records_per_s_tasks'), '{:,.1f}')} | "
                 f"{_f(t.get('ratio_tasks'), '{:.3f}')} | {_f(t.get('ratio_command'), '{:.3f}')} | {_f(t.get('cpu_cores_busy'), '{:.1f}')} |")
    L += ["", "| student | from the cache img/s | online distillation img/s | hard labels img/s | offline ÷ online |",
          "|---|---:|---:|---:|---:|"]
    for name, t in j.get("students", {}).items():
        L.append(f"| {name} | {t['offline']:,.1f} | {t['online']:,.1f} | {t['hard']:,.1f} | {t['offline_over_online']:.2f} |")
    b = j.get("bf16_vs_fp32", {})
    L += ["", f"bf16 vs fp32 stored top-K on {b.get('views')} views: top-1 agreement {_f(b.get('top1_agreement'), '{:.4f}')}, "
              f"top-5 overlap {_f(b.get('top5_overlap'), '{:.4f}')}.", ""]
    return L


def _sec_students(res, env):
    r = res.get("students")
    L = ["## 13. Students: train-step throughput", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    j = r["json"]
    L += [f"`tools/bench_students.py`: forward + soft cross-entropy + backward + AdamW on random {j['size']} px inputs, "
          f"batch {j['batch']}, {j['threads']} threads; models timed in {j['rounds']} interleaved rounds, median step. "
          "GFLOPs are multiply-accumulates at this size (what the papers report at 224).", "",
          f"| model | params | GFLOPs at {j['size']} | train img/s | ÷ {j['baseline']} |", "|---|---:|---:|---:|---:|"]
    for name, m in j["models"].items():
        L.append(f"| {name} | {m['params'] / 1e6:.2f}M | {m['gflops_at_size']:.2f} | {m['img_s']:,.1f} | "
                 f"**{m['ratio_to_baseline']:.2f}** |")
    return L + [""]


def _sec_adapt(res, env):
    r = res.get("adapt")
    L = ["## 14. adapt-teacher: merged RepAdapter teacher", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    j = r["json"]
    L += [f"`tools/bench_adapt.py`: {j['model']} at {j['size']} px, batch {j['batch']}, {j['threads']} thread(s), random "
          f"weights with seeded non-zero adapters (r 8, 2 groups) before every attention and MLP input linear; "
          f"{j['repeats']} interleaved rounds, median forward.", "",
          "| | parameters | eager forward ÷ base | teacher.pt2 forward ÷ base |", "|---|---:|---:|---:|"]
    for name in ("merged", "unmerged"):
        L.append(f"| {name} | {j['params'][name]:,} | **{j[f'ratio_{name}_over_base']:.3f}** | "
                 f"{_f(j.get(f'export_ratio_{name}_over_base'), '{:.3f}')} |")
    L += ["", f"Base: {j['params']['base']:,} parameters. Merged vs unmerged: max |Δ logit| "
              f"{j['max_abs_logit_diff']:.2e} (fp32; goal <= 1e-4); merged ÷ base goal <= 1.02.", ""]
    return L


def _sec_scale(res, env):
    r = res.get("scale", {})
    j = r.get("json")
    L = ["## 9. Scale: ImageNet-21K with the real code on synthetic data", "", _run_line(env, r), ""]
    if not j:
        return L + [f"not run ({r.get('why', 'part not selected')})", ""]
    st, rd, mx, rss, pj = j["storage"], j["storage"]["read"], j["mixing"], j["driver_rss"], j["projection_14_2m_x_90"]
    L += ["`tools/bench_scale.py`" + (" --quick" if j.get("quick") else "") + " prints one JSON line; the figures below are that line.", "",
          "**Driver memory.** Peak RSS growth of the driver process (Ray workers are other processes), each stage in "
          "a child process of its own, at two sizes; the slope is MB per 1M samples.", "",
          "| stage | samples | driver RSS growth (MB) | MB per 1M samples |", "|---|---:|---:|---:|"]
    for name, v in rss.items():
        L.append(f"| {name} | {' / '.join(f'{x:,}' for x in v['samples'])} | {' / '.join(f'{x:.1f}' for x in v['growth_mb'])} "
                 f"| {v['mb_per_1m']:.0f} |")
    L += ["", "Sizes: 1/1000 and 1/100 of ImageNet-21K (quick: smaller), shards of 1,420 samples (14.2M / 10,000). "
          "cache-teacher (2 epochs) and filter-labels run for real on tiny-JPEG shards with the demo teacher; verify, "
          "open_cache + a record of the last shard, and cache-teacher's duplicate-key check (all keys sorted as one Arrow "
          "array) on synthetic caches with E=90 written by the cache's encoder. "
          f"Projected driver RAM at 14.2M samples: {pj['driver_gb_at_14_2m']:.2f} GB (worst stage's slope).", "",
          "**Reading one epoch.** train-student reads cached epoch e's record batches (columns "
          f"{', '.join(rd['columns'])}) and the per-sample class dictionaries (epoch 0's batches); keys and labels come "
          "from the tar, which is checked against the cache by the seed of every row.", "",
          "| | bytes |", "|---|---:|",
          f"| decompressed to read epoch {rd['epoch']} | {rd['decompressed_bytes']:,} |",
          f"| that epoch's logical records (key, seed, topk_idx, topk_prob, label, label_prob) | {rd['logical_bytes']:,} |",
          f"| **ratio** | **{rd['amplification']:.3f}** |",
          f"| read from disk (counted through the file) | {rd['disk_bytes']:,} |",
          f"| the file's bytes per epoch (file / 90) | {rd['file_bytes_per_epoch']:,.0f} |",
          f"| ratio | {rd['disk_amplification']:.2f} (the dictionaries are read every epoch) |", "",
          f"Format 1 read all 90 epochs to use one: about 48x. Bytes per record: K=10 {st['k10']['bytes_per_record']:.2f}, "
          f"K=100 {st['k100']['bytes_per_record']:.2f} (synthetic overlap, shards of 1,420 samples = 14.2M / 10,000).", "",
          "**Class mix.** A 200-class image-folder tree in class order, written by make-shards (shuffled by default), "
          f"read by DistillDataset with Mixup/CutMix on 2 ranks for {mx.get('epochs', 1)} epoch(s): {mx['batches']} batches of 64, "
          f"{mx['mixed_pairs']} mixed pairs. "
          f"Distinct classes per batch ÷ a perfectly shuffled batch's: {mx['classes_per_batch_ratio']:.3f}; "
          f"same-class partners ÷ chance: {mx['same_class_pair_ratio_to_chance']:.2f}.", "",
          "**Projected to 14.2M images × 90 epochs.**", "",
          "| | K=10 | K=100 |", "|---|---:|---:|",
          f"| cache size | {pj['cache_gb_k10']:,.0f} GB | {pj['cache_gb_k100']:,.0f} GB |",
          f"| driver RAM (any stage) | {pj['driver_gb_at_14_2m']:.2f} GB | (same keys, same slope) |",
          f"| read per training epoch, all ranks (K=10 measured) | {pj['epoch_read_gb_total']:.1f} GB | |",
          f"| read per training epoch, per GPU at 8 GPUs | {pj['epoch_read_gb_per_gpu_8']:.2f} GB | |",
          f"| read per training epoch, per GPU at 64 GPUs | {pj['epoch_read_gb_per_gpu_64']:.3f} GB | |", ""]
    return L


def _sec_projection(res, env):
    p = res.get("projection")
    L = ["## 8. Projection: ImageNet-21K, 90 epochs", "", _run_line(env), ""]
    if not p:
        return L + ["not run in this invocation", ""]
    A = ANCHORS
    L += [f"Inputs — anchors (reference figures measured on one H100 or published by TinyViT; listed in `tools/bench.py` `ANCHORS`): ViT-L/14 bf16 forward {A['teacher_img_s']:,} img/s; TinyViT-21M train "
          f"step {A['student_img_s']:,} img/s, {A['student_online_img_s']:,} img/s with the online teacher (5M: "
          f"{A['student5m_img_s']:,} / {A['student5m_online_img_s']:,}); Pillow decode + crop + flip {A['pillow_per_core_img_s']} img/s per core. "
          f"Data: {A['imagenet21k_images'] / 1e6:.1f}M images × {A['epochs']} epochs = {p['records'] / 1e9:.3f}G records. "
          "Measured here: bytes per record (section 3) and per-core view costs (section 1). Computed by `tools/bench.py`.", "",
          "### Cache size", "", "| | K=10 | K=100 |", "|---|---:|---:|"]
    cs = p["cache_size"]
    L.append(f"| distill, measured B/record (synthetic overlap model) | {_f(cs['K=10']['distill_bytes_per_record'], '{:.1f}')} B | {_f(cs['K=100']['distill_bytes_per_record'], '{:.1f}')} B |")
    L.append(f"| **distill cache size** | **{_f(cs['K=10']['distill_gb'], '{:,.0f}')} GB** | **{_f(cs['K=100']['distill_gb'], '{:,.0f}')} GB** |")
    if cs['K=100'].get("distill_gb_range"):
        L.append("| distill, K=100 with half / twice the overlap model's class pool | | "
                 + " / ".join(f"{x:,.0f} GB" for x in cs['K=100']["distill_gb_range"]) + " |")
    L.append(f"| TinyViT format, 4K+4 B/record | {cs['K=10']['tinyvit_gb']:,.0f} GB ({cs['K=10']['tinyvit_gib']:,.0f} GiB) | "
             f"{cs['K=100']['tinyvit_gb']:,.0f} GB ({cs['K=100']['tinyvit_gib']:,.0f} GiB) |")
    L.append(f"| TinyViT's released cache (published) | | {A['tinyvit_k100_published_gb']} \"GB\" + 18 GB keys |")
    L += ["", f"The 4K+4 model reproduces TinyViT's published K=100 figure when their \"GB\" is GiB "
          f"({cs['K=100']['tinyvit_gib']:,.0f} GiB vs {A['tinyvit_k100_published_gb']}), which checks the record count.", "",
          "### Teacher GPU time", "",
          f"{p['records'] / 1e9:.3f}G records ÷ {A['teacher_img_s']:,} img/s = **{p['teacher_gpu_hours']:,.0f} H100-hours**, the same "
          "for K=10 and K=100 (top-K selection and the copy to the host add about 0.2%); "
          f"{p['teacher_gpu_hours'] / 8:,.0f} hours on 8 H100s.", "", "### CPU cores to keep one H100 fed", "",
          "| pipeline | views/s per anchor core | views/s per core here | cores per H100 (anchor CPU) |",
          "|---|---:|---:|---:|"]
    c = p["cores_per_gpu"]
    L.append(f"| anchor: Pillow decode + crop + flip for every view | {A['pillow_per_core_img_s']} | — | "
             f"{c['anchor_decode_crop_flip_every_view']} |")
    if "this_cpu_vs_anchor_cpu" in c:
        for name, label in (("decode_once_full_policy", "**cache-teacher**: decode once per image for 90 epochs, default policy (RandAugment, erasing)"),
                            ("decode_every_view_full_policy", "decode every view, default policy (a student epoch)")):
            L.append(f"| {label} | {c[name + '_views_s_anchor_cpu']:.0f} | {c[name + '_views_s_this_cpu']:.0f} | "
                     f"**{c[name + '_cores_anchor_cpu']}** ({c[name + '_cores_this_cpu']} of this CPU's cores) |")
        L += ["", f"Column 2 converts the rates measured here to the anchor machine's cores: this CPU runs the anchor's own "
              f"pipeline (decode + crop + flip) at ×{c['this_cpu_vs_anchor_cpu']:.2f} its 315 img/s. Feeding the student "
              f"(TinyViT-21M at {A['student_img_s']:,} img/s, one decode per view each epoch) takes "
              f"{c['student_feed_cores_anchor_cpu']} anchor cores with the default policy ({c['student_feed_cores_anchor']} "
              "with crop + flip only).", "",
              f"**Engine consequence:** one view-producer thread manages about {c['decode_once_full_policy_views_s_anchor_cpu']:.0f} "
              f"views/s on the anchor's CPU, {c['one_producer_thread_share_of_teacher_rate']:.0%} of what the H100 teacher can take, "
              f"so a GPU worker needs about {math.ceil(c['decode_once_full_policy_cores_anchor_cpu'])} producers. "
              "`cache-teacher --view-workers` sets them (default on GPU: the node's cores per GPU - 1, at most 16): "
              "the spawned processes of a DataLoader inside the worker, each decoding an image once for all its "
              "epoch views (section 11)."]
    L += ["", "### Break-even against online distillation", "",
          "Online: every student run pays student + teacher forward (1,234 img/s). Offline: the cache once (teacher "
          "forward, 2,260 img/s), then each run is the student alone (2,653 img/s). Break-even r: "
          "r × (online − offline per run) ≥ cache cost.", "",
          "| student | online H100-h/run | offline H100-h/run | cache H100-h (once) | break-even runs | cumulative H100-h after 1 / 2 / 5 / 10 runs (online vs offline) |",
          "|---|---:|---:|---:|---:|---|"]
    for name, b in p["break_even"].items():
        cum = " / ".join(f"{x['online']:,} vs {x['offline']:,}" for x in b["cumulative_h"].values())
        L.append(f"| {name} | {b['online_h_per_run']:,.0f} | {b['offline_h_per_run']:,.0f} | {b['cache_h_once']:,.0f} | "
                 f"**{b['break_even_runs']:.2f}** (cheaper from run {b['first_cheaper_run']}) | {cum} |")
    L += ["", "The break-even does not depend on K: K changes the cache size (above), not the GPU time.", ""]
    return L


# ----------------------------------------------------------------------------- main

def _sec_object_store(res, env):
    r = res.get("object_store")
    L = ["## 17. Training from object storage", "", _run_line(env, r), ""]
    if _status(r):
        return L + [_status(r), ""]
    j = r["json"]
    b, s = j["bytes"], j["speed"]
    return L + [
        "`tools/bench_storage.py`: a real S3 API (moto's server on 127.0.0.1) holding the same cache (demo teacher, "
        f"{j['epochs']} epochs, K=10) and shards ({j['shards']} demo shards) as a local directory. (a) One epoch of "
        "`DistillDataset` over the s3:// cache in the measuring process, every request counted: bytes fetched ÷ the "
        "epoch's share of the cache's bytes, and GET requests; the first epoch fetches each file's footer, a later "
        "one reuses them. (b) train-student's loader (2 persistent workers) over s3:// cache + s3:// shards against "
        f"the same files on local disk, whole epochs alternating, medians compared; every request (GET, HEAD, list) waits {j['delay_ms']:.0f} ms "
        "first (a cloud store's time to first byte; loopback has none).", "",
        "| | first epoch | later epoch |", "|---|---:|---:|",
        f"| GET requests | {b['first']['gets']} | {b['later']['gets']} |",
        f"| bytes fetched | {b['first']['bytes']:,} | {b['later']['bytes']:,} |",
        f"| ÷ the epoch's bytes ({b['epoch_bytes']:,}) | **{b['first']['bytes_per_epoch_bytes']:.3f}** | "
        f"**{b['later']['bytes_per_epoch_bytes']:.3f}** |", "",
        f"Loader at {j['image_size']} px, batch {j['batch_size']}: local {s['local_img_s']:,.1f} img/s, s3:// "
        f"{s['remote_img_s']:,.1f} img/s: **{s['remote_over_local']:.3f}**.", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run (< 5 min on 2 cores); "
                                                         "BENCHMARKS.md is written only with --write")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {','.join(PARTS)}")
    ap.add_argument("--write", action="store_true", help="write the report even in --quick mode")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="report path (default: BENCHMARKS.md)")
    ap.add_argument("--json", help="also write all parsed results here")
    ap.add_argument("--update", action="store_true", help="merge the parts measured now into the report at --out "
                                                          "(its other parts are kept from the run it records)")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: render the report from a --json file of an "
                                                        "earlier run (to change the report's text without re-measuring)")
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        Path(a.out).write_text(render(res, res["machine"], res.get("quick", False)))
        print(f"wrote {a.out} from {a.from_json}")
        return 0
    env = machine()
    res: dict = {"quick": a.quick, "machine": env, "anchors": ANCHORS}
    if a.update:
        res = dict(_recorded(Path(a.out)), quick=a.quick, machine=env, anchors=ANCHORS)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as d:
        tmp = Path(d)

        def go(name, fn):
            t0 = time.perf_counter()
            print(f"== {name} ...", flush=True)
            try:
                r = fn()
            except Exception as e:   # one broken part must not lose the others
                r = {"status": "failed", "why": f"{type(e).__name__}: {e}"}
            r.setdefault("seconds", round(time.perf_counter() - t0, 1))
            r["date"] = env["date"]
            res[name] = r
            print(f"   {r.get('status')} in {time.perf_counter() - t0:.0f}s" + (f" ({r['why']})" if r.get("why") else ""), flush=True)

        if "augment" in parts:
            go("augment", lambda: part_augment(a.quick, tmp))
        if "views" in parts or "projection" in parts:
            go("views", lambda: part_views(a.quick, tmp))
        cache_parts = [p for p in ("efficiency", "storage") if "cache" in parts]
        if cache_parts:
            go("cache", lambda: part_cache(a.quick, tmp, ",".join(cache_parts)))
        if "storage_k" in parts or "projection" in parts:
            go("storage_k", lambda: part_storage_k(a.quick, tmp))
        if "filter" in parts:
            go("filter", lambda: part_filter(a.quick, tmp))
        if "train" in parts:
            go("train", lambda: part_train(a.quick, tmp))
        if "notebook" in parts:
            go("notebook", lambda: part_notebook(a.quick, tmp))
        if "scale" in parts:
            go("scale", lambda: part_scale(a.quick, tmp))
        if "cli" in parts:
            go("cli", lambda: part_cli(a.quick, tmp))
        if "producers" in parts:
            go("producers", lambda: part_producers(a.quick, tmp))
        if "gpu" in parts:
            go("gpu", lambda: part_gpu(a.quick, tmp))
        if "students" in parts:
            go("students", lambda: part_students(a.quick, tmp))
        if "adapt" in parts:
            go("adapt", lambda: part_adapt(a.quick, tmp))
        if "integrity" in parts:
            go("integrity", lambda: part_integrity(a.quick, tmp))
        if "faults" in parts:
            go("faults", lambda: part_faults(a.quick, tmp))
        if "object_store" in parts:
            go("object_store", lambda: part_object_store(a.quick, tmp))
        if "scaling" in parts:   # last of the measured parts; it waits for a quiet machine itself (full mode)
            go("scaling", lambda: part_cache(a.quick, tmp, "scaling"))
        if "projection" in parts:
            go("projection", lambda: projection(res.get("views", {}), res.get("storage_k", {})))
    res["total_seconds"] = round(time.perf_counter() - t_all, 1)

    text = render(res, env, a.quick)
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    print("\n## Summary" + summary)
    if "projection" in res:
        p = res["projection"]
        print("projection:", json.dumps({"cache_gb": {k: v["distill_gb"] for k, v in p["cache_size"].items()},
                                         "teacher_gpu_hours": p["teacher_gpu_hours"], "cores_per_gpu": p["cores_per_gpu"],
                                         "break_even": {k: v["break_even_runs"] for k, v in p["break_even"].items()}}))
    print(f"total {res['total_seconds']:.0f}s")
    if a.json:
        Path(a.json).write_text(json.dumps(_strip(res), indent=1, default=str))
    partial = set(parts) != set(PARTS)
    if (not a.quick and not partial) or a.write or a.update:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    elif partial and not a.quick:
        print(f"not written (only {', '.join(parts)} ran): --update merges them into {a.out}, --write replaces it")
    failed = [k for k in PARTS if isinstance(res.get(k), dict) and res[k].get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

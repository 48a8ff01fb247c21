"""filter-labels decision pass at ImageNet-21K scale: time and peak memory for N synthetic samples.

    python tools/bench_filter.py [--samples 14000000] [--topk 10] [--quick] [--rule RULE | --rule all]

Chunks of top-K scores are generated on the fly (deterministic per chunk, 21,841 classes, 10% of
labels wrong), so memory is the decision's own: two streaming passes keeping label, label_prob and a
reason code per sample (9 bytes) plus one chunk. Peak RSS is read from the kernel (ru_maxrss) and
compared with the 2 GB limit and with the dense N x C float16 matrix cleanlab would need.
``--rule all`` measures every rule, each in its own process (peak RSS is per process), and ends
with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from distill.filter import rules as filtering  # noqa: E402

C = 21841
ALL_RULES = ["confident", "topk:5", "both", "noise-rate", "by-class", "both-prune"]


def chunk(i: int, n: int, k: int) -> dict:
    rng = np.random.default_rng(i)
    true = rng.integers(0, C, n)
    noisy = rng.random(n) < 0.1
    label = np.where(noisy, rng.integers(0, C, n), true).astype(np.int32)
    idx = rng.integers(0, C, (n, k))
    idx[:, 0] = true
    prob = np.sort(rng.dirichlet(np.full(k, 0.5), n).astype(np.float32) * 0.9, 1)[:, ::-1]
    hit = idx == label[:, None]
    label_prob = np.where(hit.any(1), np.where(hit, prob, 0).sum(1), 0.001).astype(np.float32)
    return {"label": label, "label_prob": label_prob, "topk_idx": idx.astype(np.uint16), "topk_prob": prob}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=14_000_000)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=500_000)
    ap.add_argument("--quick", action="store_true", help="1 million samples")
    ap.add_argument("--rule", default="confident", help="a --rule of filter-labels, or all (one process each)")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    a = ap.parse_args(argv)
    if a.rule == "all":
        return run_all(a)
    n = 1_000_000 if a.quick else a.samples
    sizes = [min(a.chunk, n - s) for s in range(0, n, a.chunk)]
    base = rss_mb()

    def chunks():
        for i, m in enumerate(sizes):
            yield chunk(i, m, a.topk)

    t0 = time.perf_counter()
    rule = filtering.Rule.parse(a.rule, a.topk)
    dec = filtering.decide(chunks, C, rule, max_drop_frac=0.5, min_per_class=1)
    total = time.perf_counter() - t0
    peak = rss_mb()
    res = {"samples": n, "topk": a.topk, "classes": C,
           "decide_s": round(total, 1),   # an upper bound: includes generating the synthetic chunks, twice
           "flagged_frac": round(float((~dec.keep).mean()), 4), "peak_rss_mb": round(peak), "start_rss_mb": round(base),
           "limit_mb": 2048, "ratio_to_limit": round(peak / 2048, 3),
           "dense_fp16_matrix_gb": round(n * C * 2 / 1e9, 1), "rule": a.rule,
           "noise_pairs": len(dec.joint.rows) if dec.joint is not None else 0}
    for k_, v in res.items():
        print(f"{k_}: {v}")
    if a.json:
        print(json.dumps(res))
    return res


def run_all(a) -> dict:
    """Every rule in a fresh process; one line per rule, then one JSON line."""
    per = {}
    for rule in ALL_RULES:
        cmd = [sys.executable, __file__, "--rule", rule, "--topk", str(a.topk), "--chunk", str(a.chunk),
               "--samples", str(a.samples), "--json"] + (["--quick"] if a.quick else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        per[rule] = {k: r[k] for k in ("decide_s", "peak_rss_mb", "flagged_frac", "noise_pairs")}
        print(f"rule {rule}: decide_s {r['decide_s']}, peak_rss_mb {r['peak_rss_mb']}, "
              f"flagged_frac {r['flagged_frac']}, noise_pairs {r['noise_pairs']}", flush=True)
    worst = max(v["peak_rss_mb"] for v in per.values())
    res = {"samples": r["samples"], "topk": a.topk, "classes": C, "limit_mb": 2048, "max_peak_rss_mb": worst,
           "all_under_limit": worst <= 2048, "dense_fp16_matrix_gb": r["dense_fp16_matrix_gb"], "rules": per}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()

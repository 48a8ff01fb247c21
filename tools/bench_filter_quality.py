"""filter-labels quality on synthetic label noise with a known error matrix: distill's rules on top-K
scores next to cleanlab's ``find_label_issues`` on the same dense probabilities.

    python tools/bench_filter_quality.py [--quick] [--no-cleanlab-1000]

The data: C classes in groups of 4 similar classes; 20% of labels flipped, 70% of flips to a similar
class and asymmetric (class i of a group goes to i+1 three times as often as the other way round), the
rest to any class. The scorer is out-of-sample: softmax of noisy logits that favour the true class by
a per-sample margin and that also lift the true class's group (so it confuses similar classes and is
sometimes wrong). distill's rules run through ``rules.decide`` -- the stage's decision pass -- on top-K
chunks like the scoring cache's, with no guards (max-drop-frac 1, min-per-class 0), so the algorithms
are compared as they are. Prints a table and one final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from distill.filter import rules  # noqa: E402

DISTILL_RULES = ["topk:1", "confident", "both:1", "noise-rate", "by-class", "both-prune"]
PRUNE_RULES = ["noise-rate", "by-class", "both-prune"]
CLEANLAB_METHODS = ["confident_learning", "prune_by_noise_rate", "prune_by_class", "both"]
GROUP = 4


def make_noisy(num_classes: int, n: int, seed: int = 0, flip: float = 0.2):
    """(given labels, true labels, dense float32 probabilities (n, C), the true error matrix)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, num_classes, n)
    group = true // GROUP
    flipped = rng.random(n) < flip
    similar = rng.random(n) < 0.7
    pos = true % GROUP
    up = rng.random(n) < 0.75                                 # i -> i+1 three times as often as i+1 -> i
    step = np.where(up, 1, GROUP - 1)
    near = group * GROUP + (pos + step) % GROUP
    far = (true + rng.integers(1, num_classes, n)) % num_classes
    given = np.where(flipped, np.where(similar, near, far), true)
    given = np.minimum(given, num_classes - 1)
    errors = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(errors, (given[given != true], true[given != true]), 1)
    # background logits are shifted by -log(C / 100) / 1.6 so that the mass spread over unrelated
    # classes is the same at 100 and at 1,000 classes (a scorer does not get worse with more classes)
    shift = np.float32(np.log(num_classes / 100) / 1.6)
    logits = rng.normal(0, 1.0, (n, num_classes)).astype(np.float32) - shift
    lift = rng.uniform(0.0, 2.0, n).astype(np.float32) + shift   # the whole true group looks alike
    for g in range(GROUP):
        cls = np.minimum(group * GROUP + g, num_classes - 1)
        logits[np.arange(n), cls] += lift
    logits[np.arange(n), true] += rng.gamma(4.0, 0.9, n).astype(np.float32)
    logits *= 1.6
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    return given, true, p.astype(np.float32), errors


def topk_chunks(given: np.ndarray, p: np.ndarray, k: int, size: int = 4096):
    """A callable yielding scoring-cache-like chunks: label, label_prob, top-K ids and probs."""
    def chunks():
        for s in range(0, len(given), size):
            pp, lab = p[s:s + size], given[s:s + size]
            if k >= p.shape[1]:
                idx = np.argsort(-pp, 1, kind="stable")
            else:
                part = np.argpartition(-pp, k, 1)[:, :k]
                idx = np.take_along_axis(part, np.argsort(-np.take_along_axis(pp, part, 1), 1, kind="stable"), 1)
            yield {"label": lab.astype(np.int32), "label_prob": pp[np.arange(len(lab)), lab],
                   "topk_idx": idx.astype(np.int32), "topk_prob": np.take_along_axis(pp, idx, 1)}
    return chunks


def scores(flag: np.ndarray, is_error: np.ndarray) -> dict:
    tp = int((flag & is_error).sum())
    prec = tp / max(int(flag.sum()), 1)
    rec = tp / max(int(is_error.sum()), 1)
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"flagged": int(flag.sum()), "precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4)}


def run_distill(given, p, is_error, k: int, rule: str, others_kept: int = 3) -> dict:
    c = p.shape[1]
    t0 = time.perf_counter()
    dec = rules.decide(topk_chunks(given, p, k), c, rules.Rule.parse(rule, k), 1.0, 0, others_kept=others_kept)
    return dict(scores(~dec.keep, is_error), seconds=round(time.perf_counter() - t0, 2))


def run_cleanlab(given, p, is_error, method: str) -> dict:
    from cleanlab.filter import find_label_issues
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flag = find_label_issues(given, p, filter_by=method, n_jobs=1)
    return dict(scores(flag, is_error), seconds=round(time.perf_counter() - t0, 2))


def suite(name: str, c: int, n: int, ks: list, with_cleanlab: bool, rows: list, seed: int = 0) -> dict:
    given, true, p, errors = make_noisy(c, n, seed)
    is_error = given != true
    res: dict = {"distill": {}, "cleanlab": {}}
    print(f"\n## {name}: {c} classes x {n} samples, {is_error.mean():.1%} wrong labels "
          f"(largest true error cell {errors.max()})", flush=True)
    for k in ks:
        kk = c if k == "C" else k
        for rule in DISTILL_RULES:
            r = run_distill(given, p, is_error, kk, rule)
            res["distill"][f"{rule}@K={k}"] = r
            rows.append((name, f"distill {rule}", f"K={k}", r))
        if k == "C":
            for rule in PRUNE_RULES:     # what keeping 3 other classes per sample costs
                r = run_distill(given, p, is_error, kk, rule, others_kept=c)
                res["distill"][f"{rule}@K=C,all-others"] = r
                rows.append((name, f"distill {rule} (all others)", "K=C", r))
    if with_cleanlab:
        for m in CLEANLAB_METHODS:
            r = run_cleanlab(given, p, is_error, m)
            res["cleanlab"][m] = r
            rows.append((name, f"cleanlab {m}", "dense", r))
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sets (a smoke run)")
    ap.add_argument("--no-cleanlab-1000", action="store_true", help="skip cleanlab on the 1,000-class set")
    a = ap.parse_args(argv)
    import importlib.util
    have_cl = importlib.util.find_spec("cleanlab") is not None
    small = (100, 4_000 if a.quick else 20_000)
    big = (1000, 8_000 if a.quick else 40_000)
    rows: list = []
    t0 = time.perf_counter()
    r100 = suite("100 classes", *small, ["C", 10, 5], have_cl, rows)
    r1000 = suite("1000 classes", *big, ["C", 10, 5], have_cl and not a.no_cleanlab_1000, rows, seed=1)
    print("\n| set | method | scores | flagged | precision | recall | F1 | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, method, k, r in rows:
        print(f"| {name} | {method} | {k} | {r['flagged']} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['f1']:.3f} | {r['seconds']} |")
    d100, d1000 = r100["distill"], r1000["distill"]
    best_rule = max(PRUNE_RULES, key=lambda x: d100[f"{x}@K=C"]["f1"])
    best_rule_1000 = max(PRUNE_RULES, key=lambda x: d1000[f"{x}@K=C"]["f1"])
    out = {"best_distill_prune_rule_kC": best_rule,
           "best_distill_prune_f1_kC": d100[f"{best_rule}@K=C"]["f1"],
           "best_distill_f1_kC": max(v["f1"] for key, v in d100.items() if key.endswith("@K=C")),
           "best_cleanlab_method": max(r100["cleanlab"], key=lambda m: r100["cleanlab"][m]["f1"]) if have_cl else None,
           "best_cleanlab_f1": max(v["f1"] for v in r100["cleanlab"].values()) if have_cl else None,
           "cleanlab_noise_rate_f1": r100["cleanlab"]["prune_by_noise_rate"]["f1"] if have_cl else None,
           "confident_f1_kC": d100["confident@K=C"]["f1"],
           "f1_k10_100cls": d100[f"{best_rule}@K=10"]["f1"], "f1_k5_100cls": d100[f"{best_rule}@K=5"]["f1"],
           "best_distill_prune_rule_1000cls": best_rule_1000,
           "f1_kC_1000cls": d1000[f"{best_rule_1000}@K=C"]["f1"],
           "f1_k10_1000cls": d1000[f"{best_rule_1000}@K=10"]["f1"],
           "f1_k5_1000cls": d1000[f"{best_rule_1000}@K=5"]["f1"],
           "best_cleanlab_f1_1000cls": (max(v["f1"] for v in r1000["cleanlab"].values())
                                        if r1000["cleanlab"] else None),
           "cleanlab_installed": have_cl, "wall_s": round(time.perf_counter() - t0, 1),
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    if have_cl:
        out["kC_gap_to_cleanlab"] = round(out["best_distill_prune_f1_kC"] - out["best_cleanlab_f1"], 4)
    out["k10_drop_1000cls"] = round(out["f1_kC_1000cls"] - out["f1_k10_1000cls"], 4)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

"""``filter_labels(cfg)``: score every sample with a scorer model on a deterministic centre view,
flag noisy labels from the top-K scores, write FILTER_DIR.

The scoring pass is cache-teacher's engine with one centre view per sample (so it runs on Ray,
embedded or a cluster, and resumes per shard); its cache lives in ``FILTER_DIR/scoring/``. The
decision pass (distill.filter.rules) streams over those files.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import rules
from ..cache.stage import cache_teacher
from ..config import CacheConfig, FilterConfig
from ..format import (CACHE_FORMAT, RUN_NAME, FILTER_FORMAT, FILTER_SCORES_NAME, FILTER_SCORING_DIR, FILTER_SUMMARY_NAME, FILTER_VERSION,
                      MANIFEST_NAME, read_ipc, skip_lines)
from ..files import UserError, atomic_write_json, check_out, claim_dir, sha256_file
from ..cache.reader import open_cache

SCORING_DIR = FILTER_SCORING_DIR


@dataclass
class FilterResult:
    out: Path
    samples: int
    dropped: int
    rule: str
    per_class: list[dict] = field(default_factory=list)
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    shards_written: int = 0
    skips: list[dict] = field(default_factory=list)   # every skipped sample: {"shard", "key", "reason"}

    def summary(self) -> str:
        frac = self.dropped / self.samples if self.samples else 0.0
        worst = sorted(self.per_class, key=lambda c: -c["dropped_frac"])[:3]
        lines = [f"filter: {self.out}",
                 f"  scored {self.samples} samples, rule {self.rule}: flagged {self.dropped} ({frac:.1%}), "
                 f"skipped {self.skipped}, wall {self.wall_s:.1f}s",
                 "  most dropped classes: " + ", ".join(f"{c['name']} {c['dropped_frac']:.0%}" for c in worst)]
        if self.failed:
            where = f"{self.out / SCORING_DIR / MANIFEST_NAME} once a rerun completes the scoring"
        else:
            where = f"{self.out / FILTER_SUMMARY_NAME}, \"skipped\", or: distill inspect {self.out} --skipped"
        lines += skip_lines(self.skips, where)
        if self.shards_written:
            lines.append(f"  wrote {self.shards_written} cleaned shard(s)")
        if self.failed:
            lines.append("  FAILED: " + "; ".join(self.failed))
        return "\n".join(lines)


def _scoring_chunks(cache) -> callable:
    def chunks():
        for name in cache.shard_names:
            t = cache.shard_table(name, epochs=[0], columns=["key", "label", "label_prob", "topk_idx", "topk_prob"])
            k = cache.topk
            yield {"key": t.column("key"), "shard": name,
                   "label": t.column("label").to_numpy(),
                   "label_prob": t.column("label_prob").to_numpy(),
                   "topk_idx": t.column("topk_idx").combine_chunks().values.to_numpy().reshape(-1, k),
                   "topk_prob": t.column("topk_prob").combine_chunks().values.to_numpy().reshape(-1, k).astype(np.float32)}
    return chunks


def filter_labels(cfg: FilterConfig) -> FilterResult:
    """Score, decide, write FILTER_DIR (scores.arrow, report, summary.json last). The directory is
    locked for the run; a finished earlier summary stays until the new scores replace it."""
    t0 = time.perf_counter()
    try:
        rule = rules.Rule.parse(cfg.rule, cfg.topk)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(cfg.out)
    inputs = (cfg.shards, *cfg.scorer, *cfg.scorer_checkpoint)
    check_out(out, "filter-labels", FILTER_MARKS, inputs=inputs)
    if cfg.write_shards:
        check_out(cfg.write_shards, "filter-labels", _clean_marks(out), inputs=(*inputs, out), flag="--write-shards")
    cc = CacheConfig(shards=cfg.shards, teacher=cfg.scorer, out=str(out / SCORING_DIR), epochs=1, topk=cfg.topk,
                     batch_size=cfg.batch_size, device=cfg.device, workers=cfg.workers, threads=cfg.threads,
                     ray_address=cfg.ray_address, overwrite=cfg.overwrite, teacher_checkpoint=cfg.scorer_checkpoint,
                     teacher_random_weights=cfg.scorer_random_weights, teacher_num_classes=cfg.scorer_num_classes, teacher_precision=cfg.scorer_precision,
                     teacher_input_size=cfg.scorer_input_size, teacher_mean=cfg.scorer_mean,
                     teacher_std=cfg.scorer_std, temperature=cfg.temperature, teacher_outputs=cfg.scorer_outputs,
                     prob_dtype="float32",
                     retries=cfg.retries, quiet=cfg.quiet)
    with claim_dir(out, "filter-labels", FILTER_MARKS, inputs=inputs):
        try:
            scored = cache_teacher(cc, center_crop=cfg.crop_pct)
        except UserError as e:       # the scoring pass speaks of the teacher: name the scorer's flags
            raise UserError(re.sub(r"--teacher\b", "--scorer", str(e))) from None
        if scored.failed:
            return FilterResult(out=out, samples=scored.samples, dropped=0, rule=cfg.rule, failed=scored.failed,
                                wall_s=time.perf_counter() - t0, skipped=scored.skipped, skips=scored.skips)
        cache = open_cache(out / SCORING_DIR)
        chunks = _scoring_chunks(cache)
        dec = rules.decide(chunks, cache.num_classes, rule, cfg.max_drop_frac, cfg.min_per_class)
        if (out / FILTER_SUMMARY_NAME).exists():
            (out / FILTER_SUMMARY_NAME).unlink()   # the old summary no longer describes the scores: rewritten last
        _write_scores(out, chunks, dec, rule)
        summary = dict(_summary(cfg, cache, dec), scores_sha256=sha256_file(out / FILTER_SCORES_NAME))
        written = _write_clean_shards(cfg, out, inputs, cache, set(_dropped_keys(out))) if cfg.write_shards else 0
        from .report import write_filter_report
        write_filter_report(out, summary, cache)
        atomic_write_json(out / FILTER_SUMMARY_NAME, summary)
    return FilterResult(out=out, samples=summary["samples"], dropped=summary["dropped"], rule=cfg.rule,
                        per_class=summary["per_class"], skipped=len(summary["skipped"]),
                        wall_s=time.perf_counter() - t0, shards_written=written, skips=summary["skipped"])


def _summary(cfg: FilterConfig, cache, dec: rules.Decision) -> dict:
    return {"format": FILTER_FORMAT, "version": FILTER_VERSION, "rule": cfg.rule, "topk": cfg.topk,
            "max_drop_frac": cfg.max_drop_frac, "min_per_class": cfg.min_per_class,
            "scorer": cache.teacher, "samples": int(len(dec.label)), "dropped": int((~dec.keep).sum()),
            "guard_kept": int((dec.code == rules.GUARD).sum()),
            "thresholds": [None if np.isnan(x) else round(float(x), 6) for x in dec.thresholds],
            "classes": cache.classes, "per_class": _per_class(dec, cache.classes),
            "noise_pairs": _noise_pairs(dec, cache.classes),
            "skipped": [dict(s, shard=e["name"]) for e in cache.manifest["shards"] for s in e["skipped"]],
            "shards": [e["name"] for e in cache.manifest["shards"]]}


def _write_scores(out: Path, chunks, dec: rules.Decision, rule: rules.Rule) -> None:
    """scores.arrow, written shard by shard as it is built (one record batch per shard; memory holds one)."""
    from ..files import atomic_writer
    from ..format import IPC_COMPRESSION, IPC_LEVEL
    reasons = np.array([rule.reason(c) for c in range(max(rules.REASONS) + 1)], dtype=object)
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec(IPC_COMPRESSION, compression_level=IPC_LEVEL))
    start, writer = 0, None
    with atomic_writer(out / FILTER_SCORES_NAME) as f:
        for c in chunks():
            n = len(c["label"])
            code, keep = dec.code[start:start + n], dec.keep[start:start + n]
            start += n
            k = c["topk_idx"].shape[1]
            t = pa.table({
                "key": c["key"], "shard": pa.array([c["shard"]] * n, pa.string()),
                "label": pa.array(c["label"].astype(np.int32)),
                "label_prob": pa.array(c["label_prob"].astype(np.float32)),
                "label_rank": pa.array(rules.label_rank(c["label"], c["topk_idx"])),
                "topk_idx": pa.FixedSizeListArray.from_arrays(pa.array(c["topk_idx"].reshape(-1)), k),
                "topk_prob": pa.FixedSizeListArray.from_arrays(pa.array(c["topk_prob"].reshape(-1)), k),
                "margin": pa.array(rules.margin(c["label"], c["label_prob"], c["topk_idx"], c["topk_prob"])),
                "keep": pa.array(keep), "reason": pa.array(reasons[code].tolist(), pa.string())})
            writer = writer or pa.ipc.new_file(f, t.schema, options=opts)
            for b in t.to_batches(max_chunksize=4096):
                writer.write_batch(b)
        if writer is None:
            raise UserError("no samples were scored (all skipped or excluded?)")
        writer.close()


def _dropped_keys(out: Path) -> list[str]:
    t = read_ipc(out / FILTER_SCORES_NAME, ["key", "keep"])
    keep = t.column("keep").to_numpy(zero_copy_only=False)
    return [k for k, kp in zip(t.column("key").to_pylist(), keep) if not kp]


def _noise_pairs(dec: rules.Decision, classes: list[str], n: int = 20) -> list[dict]:
    """The calibrated confident joint's largest off-diagonal entries: estimated errors per pair."""
    if dec.joint is None:
        return []
    return [{"given": g, "given_name": classes[g], "true": t, "true_name": classes[t], "count": c}
            for g, t, c in dec.joint.largest(n) if c > 0]


def _per_class(dec: rules.Decision, classes: list[str]) -> list[dict]:
    n = np.bincount(dec.label, minlength=len(classes))
    d = np.bincount(dec.label[~dec.keep], minlength=len(classes))
    return [{"label": i, "name": classes[i], "samples": int(n[i]), "dropped": int(d[i]),
             "dropped_frac": float(d[i] / n[i]) if n[i] else 0.0} for i in range(len(classes))]


# a filter directory: its summary, or the scoring pass's cache of an interrupted run
FILTER_MARKS = ((FILTER_SUMMARY_NAME, {"format": FILTER_FORMAT}),
                (f"{FILTER_SCORING_DIR}/{RUN_NAME}", {"format": CACHE_FORMAT}))
CLEAN_MARK = ".distill.filter.json"      # in --write-shards: which filter directory wrote these shards


def _clean_marks(out: Path) -> tuple:
    """--write-shards is this filter's own when it holds the cleaned shards this filter directory wrote."""
    return ((CLEAN_MARK, {"filter": str(out.resolve())}),)


def _write_clean_shards(cfg: FilterConfig, out: Path, inputs: tuple, cache, drop: set[str]) -> int:
    """The input shards without the flagged samples, in --write-shards (claimed: empty or this
    filter's earlier cleaned shards, which are replaced)."""
    from ..data import shards as shardio
    paths, index = shardio.resolve_shards(cfg.shards)
    classes = index.classes if index else cache.classes
    prefix = paths[0].name.rsplit("-", 1)[0] if "-" in paths[0].name else "clean"
    size = max(s.samples for s in index.shards) if index and index.shards else 1000
    with claim_dir(cfg.write_shards, "filter-labels", _clean_marks(out), inputs=(*inputs, out), flag="--write-shards") as dest:
        atomic_write_json(dest / CLEAN_MARK, {"filter": str(out.resolve())})
        for p in shardio.own_shard_files(dest, prefix, claimed=True):
            p.unlink()
        return _write_clean(paths, drop, dest, prefix, size, classes)


def _write_clean(paths, drop: set[str], dest: Path, prefix: str, size: int, classes: list[str]) -> int:
    from ..data import shards as shardio
    from ..format import Skip

    def samples():
        for p in paths:
            for item in shardio.iter_shard(p):
                if not isinstance(item, Skip) and item.key not in drop:
                    yield item

    idx = shardio.write_shards(samples(), dest, prefix, size, classes)
    return len(idx.shards)

"""``distill inspect PATH``: say what a shard, cache, filter or run directory holds."""
from __future__ import annotations

import json
from pathlib import Path

from .format import (FILTER_SUMMARY_NAME, MANIFEST_NAME, RUN_METRICS_NAME, RUN_NAME, RUN_SUMMARY_NAME, SHARD_INDEX_NAME,
                     ShardIndex, read_filter_summary)
from .files import UserError, read_json


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(path: str, n: int = 3) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"path not found: {p}")
    if p.is_file() and p.suffix == ".tar":
        return _describe_tar(p, n)
    if (p / SHARD_INDEX_NAME).exists():
        idx = ShardIndex.read(p)
        lines = [f"shards: {p} ({_size(p):,} bytes)", f"  {idx.num_samples} samples in {len(idx.shards)} shard(s), "
                 f"{idx.num_classes} classes: {', '.join(idx.classes[:8])}{' ...' if idx.num_classes > 8 else ''}",
                 f"  skipped at creation: {len(idx.skipped)}"]
        lines += [f"  {s.name}: {s.samples} samples, {s.bytes:,} bytes" for s in idx.shards[:n]]
        return "\n".join(lines)
    if (p / MANIFEST_NAME).exists():
        from .cache.reader import open_cache
        c = open_cache(p)
        m = c.manifest
        size = _size(p)
        t = c.to_table(epochs=[0], shards=c.shard_names[:1]).slice(0, n)
        teacher, agree = m["teacher"], m.get("teacher_agreement") or {}
        lines = [repr(c), f"  teacher: {', '.join(x['spec'] for x in teacher['members'])} (input {teacher['input_size']}, "
                 f"T={m['temperature']}, {teacher.get('precision', 'fp32')} on {teacher.get('device_type', 'cpu')}), "
                 f"policy {m['policy']['id']}" + (" (scoring: centre views)" if c.is_scoring else ""),
                 f"  teacher vs given labels: top-1 {agree.get('top1', float('nan')):.1%}, "
                 f"mean label probability {agree.get('mean_label_prob', float('nan')):.3f}",
                 f"  {size:,} bytes, {size / max(c.num_records, 1):.1f} B/record, prob {m['prob_dtype']}, "
                 f"skipped {m['totals']['skipped']}, excluded {m['totals']['excluded']}", "  first records:"]
        for r in t.to_pylist():
            top = ", ".join(f"{c.classes[i]} {p_:.3f}" for i, p_ in zip(r["topk_idx"][:3], r["topk_prob"][:3]))
            lines.append(f"    {r['key']} e{r['epoch']} label={c.classes[r['label']]} p={r['label_prob']:.3f} | {top}")
        return "\n".join(lines)
    if (p / RUN_NAME).exists():
        return f"incomplete cache: {p} (no manifest.json; rerun the same cache-teacher command to resume)"
    if (p / FILTER_SUMMARY_NAME).exists() and "format" in read_json(p / FILTER_SUMMARY_NAME, "summary"):
        s = read_filter_summary(p)
        lines = [f"filter: {p}", f"  rule {s['rule']}: dropped {s['dropped']} of {s['samples']} "
                 f"({s['dropped'] / max(s['samples'], 1):.1%}), guard kept {s['guard_kept']}"]
        worst = sorted(s["per_class"], key=lambda c: -c["dropped_frac"])[:n]
        lines += [f"  {c['name']}: dropped {c['dropped']}/{c['samples']}" for c in worst]
        return "\n".join(lines)
    if (p / RUN_METRICS_NAME).exists():
        rows = [json.loads(x) for x in (p / RUN_METRICS_NAME).read_text().splitlines() if x.strip()]
        lines = [f"run: {p}, {len(rows)} epoch(s)"]
        for r in rows[-n:]:
            lines.append("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
        if (p / RUN_SUMMARY_NAME).exists():
            lines.append("  summary: " + json.dumps(read_json(p / "summary.json", "run summary")))
        return "\n".join(lines)
    raise UserError(f"{p} is not a distill shard, cache, filter or run directory")


def _describe_tar(p: Path, n: int) -> str:
    from .format import Skip
    from .data.shards import iter_shard
    count, skips, first = 0, 0, []
    for item in iter_shard(p):
        if isinstance(item, Skip):
            skips += 1
        else:
            count += 1
            if len(first) < n:
                first.append(f"  {item.key}.{item.ext}: {len(item.data):,} bytes, label {item.label}")
    return "\n".join([f"shard: {p}: {count} samples, {skips} skipped"] + first)

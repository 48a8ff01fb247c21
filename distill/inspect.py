"""``distill inspect PATH``: say what a shard, cache, filter or run directory holds.

PATH may also be anything cache-teacher takes as ``--shards``: a folder of ``.tar`` shards without
``index.json``, a brace pattern, one tar. ``skipped_tsv(PATH)`` (``inspect PATH --skipped``) lists
every recorded skip.
"""
from __future__ import annotations

import json
from pathlib import Path

from .format import (cache_bytes, FILTER_SUMMARY_NAME, MANIFEST_NAME, RUN_METRICS_NAME, RUN_NAME, RUN_SUMMARY_NAME, SHARD_INDEX_NAME,
                     ShardIndex, Skip, read_filter_summary, skip_lines, skips_tsv)
from . import storage
from .files import UserError, read_json

# Shards without an index are counted by reading their tar headers and labels (image bytes are
# seeked over); past this many bytes of shards only the first ones are read.
SCAN_BYTES = 4 << 30


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _cache_skips(m: dict) -> list[dict]:
    return [{"shard": e["name"], **s} for e in m["shards"] for s in e.get("skipped", ())]


def _is_filter(p: Path) -> bool:
    return (p / FILTER_SUMMARY_NAME).exists() and "format" in read_json(p / FILTER_SUMMARY_NAME, "summary")


def _shard_spec(text: str, p: Path):
    """(paths, index) when TEXT names shards the way cache-teacher's --shards does, else None."""
    from .data.shards import resolve_shards
    if p.is_file() and p.suffix == ".tar" or "{" in text and not p.exists():
        return resolve_shards(text)
    if p.is_dir() and (p / SHARD_INDEX_NAME).exists() or p.is_dir() and any(
            f.suffix == ".tar" and f.is_file() for f in p.iterdir()):
        return resolve_shards(p)
    return None


def describe(path: str, n: int = 3) -> str:
    text = str(path)
    p = storage.path(text)
    if not p.exists() and "{" not in text:
        raise UserError(f"path not found: {p}")
    if p.is_file() and p.suffix == ".tar":
        return _describe_tar(p, n)
    if p.is_dir() and (p / SHARD_INDEX_NAME).exists():
        idx = ShardIndex.read(p)
        return _describe_index(text, p, idx.paths(p), idx, n)
    if p.is_dir() and (p / MANIFEST_NAME).exists():
        return _describe_cache(p, n)
    if p.is_dir() and (p / RUN_NAME).exists():
        from .cache.reader import unfinished
        return f"incomplete cache: {unfinished(p)}"
    if p.is_dir() and _is_filter(p):
        return _describe_filter(p, n)
    if p.is_dir() and (p / RUN_METRICS_NAME).exists():
        return _describe_run(p, n)
    spec = _shard_spec(text, p)
    if spec is None:
        raise UserError(f"{p} is not a distill shard (index.json or .tar files), cache, filter or run directory")
    paths, index = spec
    if index is not None:
        return _describe_index(text, p, paths, index, n)
    return _describe_bare(text, paths, n)


def skipped_tsv(path: str) -> str:
    """``inspect PATH --skipped``: every skipped sample recorded for PATH as TSV (header line
    ``shard\tkey\treason``): a cache's manifest, a filter's summary, a shard index's make-time skips,
    or, for shards without an index, what reading their tar headers finds."""
    text = str(path)
    p = storage.path(text)
    if not p.exists() and "{" not in text:
        raise UserError(f"path not found: {p}")
    if p.is_file() and p.suffix == ".tar":
        return skips_tsv(_scan([p], budget=None)["skips"])
    if p.is_dir() and (p / SHARD_INDEX_NAME).exists():
        return skips_tsv(ShardIndex.read(p).skipped)
    if p.is_dir() and (p / MANIFEST_NAME).exists():
        from .cache.reader import open_cache
        return skips_tsv(_cache_skips(open_cache(p).manifest))
    if p.is_dir() and (p / RUN_NAME).exists():
        raise UserError(f"{p} is an incomplete cache: its skips are listed in manifest.json once the same "
                        f"cache-teacher command completes it")
    if p.is_dir() and _is_filter(p):
        return skips_tsv(read_filter_summary(p)["skipped"])
    if p.is_dir() and (p / RUN_METRICS_NAME).exists():
        raise UserError(f"{p} is a run directory: it records no skipped samples (see its summary.json for validation)")
    spec = _shard_spec(text, p)
    if spec is None:
        raise UserError(f"{p} is not a distill shard (index.json or .tar files), cache, filter or run directory")
    paths, index = spec
    if index is not None:
        return skips_tsv(index.skipped)
    return skips_tsv(_scan(paths, budget=None)["skips"])


def _describe_cache(p: Path, n: int) -> str:
    from .cache.reader import open_cache
    c = open_cache(p)
    m = c.manifest
    size = (sum(e["file_bytes"] for e in m["shards"]) + storage.size(p / MANIFEST_NAME) if c.remote
            else cache_bytes(p, [e["file"] for e in m["shards"]]))
    t = c.to_table(epochs=[0], shards=c.shard_names[:1]).slice(0, n)
    teacher, agree = m["teacher"], m.get("teacher_agreement") or {}
    lines = [repr(c), f"  teacher: {', '.join(x['spec'] for x in teacher['members'])} (input {teacher['input_size']}, "
             f"T={m['temperature']}, {teacher.get('precision', 'fp32')} on {teacher.get('device_type', 'cpu')}), "
             f"policy {m['policy']['id']}" + (" (scoring: centre views)" if c.is_scoring else ""),
             f"  teacher vs given labels: top-1 {agree.get('top1', float('nan')):.1%}, "
             f"mean label probability {agree.get('mean_label_prob', float('nan')):.3f}",
             f"  {size:,} bytes, {size / max(c.num_records, 1):.1f} B/record, prob {m['prob_dtype']}, "
             f"skipped {m['totals']['skipped']}, excluded {m['totals']['excluded']}"]
    lines += skip_lines(_cache_skips(m), f"{p / MANIFEST_NAME}, \"skipped\" of each shard, or: distill inspect {p} --skipped")
    lines.append("  first records:")
    for r in t.to_pylist():
        top = ", ".join(f"{c.classes[i]} {p_:.3f}" for i, p_ in zip(r["topk_idx"][:3], r["topk_prob"][:3]))
        lines.append(f"    {r['key']} e{r['epoch']} label={c.classes[r['label']]} p={r['label_prob']:.3f} | {top}")
    return "\n".join(lines)


def _describe_filter(p: Path, n: int) -> str:
    s = read_filter_summary(p)
    lines = [f"filter: {p}", f"  rule {s['rule']}: dropped {s['dropped']} of {s['samples']} "
             f"({s['dropped'] / max(s['samples'], 1):.1%}), guard kept {s['guard_kept']}, skipped {len(s['skipped'])}"]
    lines += skip_lines(s["skipped"], f"{p / FILTER_SUMMARY_NAME}, \"skipped\", or: distill inspect {p} --skipped")
    worst = sorted(s["per_class"], key=lambda c: -c["dropped_frac"])[:n]
    lines += [f"  {c['name']}: dropped {c['dropped']}/{c['samples']}" for c in worst]
    return "\n".join(lines)


def _describe_run(p: Path, n: int) -> str:
    rows = [json.loads(x) for x in (p / RUN_METRICS_NAME).read_text().splitlines() if x.strip()]
    lines = [f"run: {p}, {len(rows)} epoch(s)"]
    for r in rows[-n:]:
        lines.append("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if (p / RUN_SUMMARY_NAME).exists():
        lines.append("  summary: " + json.dumps(read_json(p / "summary.json", "run summary")))
    return "\n".join(lines)


def _classes_text(classes: list[str]) -> str:
    return f"{len(classes)} classes: {', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''}"


def _describe_index(text: str, p: Path, paths: list[Path], idx: ShardIndex, n: int) -> str:
    folder = p if p.is_dir() else paths[0].parent
    size = _size(p) if p.is_dir() else sum(f.stat().st_size for f in paths)
    lines = [f"shards: {text} ({size:,} bytes; {folder / SHARD_INDEX_NAME})",
             f"  {idx.num_samples} samples in {len(idx.shards)} shard(s), {_classes_text(idx.classes)}",
             f"  skipped at creation: {len(idx.skipped)}"]
    missing = [f for f in paths if not f.is_file()]
    if missing:
        lines.append(f"  WARNING: {len(missing)} shard(s) listed in {SHARD_INDEX_NAME} do not exist, e.g. {missing[0]}")
    lines += skip_lines(idx.skipped, f"{folder / SHARD_INDEX_NAME}, \"skipped\", or: distill inspect {text} --skipped",
                        indent="    ")
    lines += [f"  {s.name}: {s.samples} samples, {s.bytes:,} bytes" for s in idx.shards[:n]]
    return "\n".join(lines)


def _scan(paths: list[Path], budget: int | None = SCAN_BYTES) -> dict:
    """Count samples, labels and skips of shards by reading their tar headers and label members,
    shard by shard until ``budget`` bytes have been read (at least one shard; None: all)."""
    from .data.shards import scan_shard
    done, nbytes, labels, skips, per = 0, 0, {}, [], []
    for path in paths:
        if budget is not None and done and nbytes + path.stat().st_size > budget:
            break
        count = 0
        for item in scan_shard(path):
            if isinstance(item, Skip):
                skips.append(item)
            else:
                count += 1
                labels[item.label] = labels.get(item.label, 0) + 1
        per.append((path, count))
        done += 1
        nbytes += path.stat().st_size
    return {"shards": done, "bytes": nbytes, "labels": labels, "skips": skips, "per_shard": per}


def _describe_bare(text: str, paths: list[Path], n: int) -> str:
    total = sum(p.stat().st_size for p in paths)
    lines = [f"shards: {text} (no {SHARD_INDEX_NAME}; {len(paths)} .tar file(s), {total:,} bytes)"]
    scan = _scan(paths)
    labels = scan["labels"]
    samples = sum(labels.values())
    found = f"{samples} samples, " + (f"{len(labels)} distinct labels ({min(labels)}..{max(labels)}), " if labels else "")
    if scan["shards"] == len(paths):
        how = f"all {len(paths)} shard(s)"
    else:
        how = (f"the first {scan['shards']} of {len(paths)} shards only ({scan['bytes']:,} of {total:,} bytes; "
               f"more than {SCAN_BYTES >> 30} GiB is not read)")
    lines.append(f"  {found}{len(scan['skips'])} skipped: counted from the tar headers and labels of {how}, "
                 f"image bytes not read")
    lines += skip_lines(scan["skips"], f"distill inspect {text} --skipped (reads every shard)", indent="    ")
    lines += [f"  {p.name}: {c} samples, {p.stat().st_size:,} bytes" for p, c in scan["per_shard"][:n]]
    lines.append("  without an index cache-teacher takes the classes from the teacher's output width "
                 "(names \"0\"..\"C-1\"); make-shards writes shards with an index")
    return "\n".join(lines)


def _describe_tar(p: Path, n: int) -> str:
    from .data.shards import iter_shard
    count, skips, first = 0, [], []
    for item in iter_shard(p):
        if isinstance(item, Skip):
            skips.append(item)
        else:
            count += 1
            if len(first) < n:
                first.append(f"  {item.key}.{item.ext}: {len(item.data):,} bytes, label {item.label}")
    lines = [f"shard: {p}: {count} samples, {len(skips)} skipped"]
    lines += skip_lines(skips, f"distill inspect {p} --skipped", indent="    ")
    return "\n".join(lines + first)

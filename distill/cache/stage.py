"""``cache_teacher(cfg)``: run the teacher once over every shard for E augmented epochs and store
top-K predictions per (sample, epoch) in one Arrow file per shard plus a manifest.

One Ray task per input shard (``writer.CacheWorker``). The driver writes each shard's file
atomically as it arrives; the manifest is written last, so its presence means the cache is complete.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import engine
from ..config import CacheConfig
from ..data import augment, shards as shardio
from ..format import CACHE_FORMAT, CACHE_VERSION, MANIFEST_NAME, RUN_NAME, cache_file_name, read_excluded_keys, read_ipc
from ..files import UserError, atomic_write_bytes, atomic_write_json, read_json, sha256_file
from ..progress import bar
from .writer import CacheWorker


# ----------------------------------------------------------------------------- the driver

@dataclass
class CacheResult:
    out: Path
    samples: int
    epochs: int
    records: int
    skipped: int
    excluded: int
    bytes: int
    bytes_per_record: float
    records_per_s: float
    teacher_share: float
    wall_s: float
    reused_shards: int
    failed: list[str]
    worker_s: float = 0.0          # summed time workers spent inside shard tasks (excludes Ray start, model load)
    steady_records_per_s: float = 0.0   # per worker, after its first batch reached the teacher

    def summary(self) -> str:
        lines = [f"cache: {self.out}",
                 f"  samples {self.samples}, epochs {self.epochs}, records {self.records}, "
                 f"skipped {self.skipped}, excluded {self.excluded}",
                 f"  {self.bytes:,} bytes, {self.bytes_per_record:.1f} B/record, "
                 f"{self.records_per_s:,.1f} records/s, teacher forward {self.teacher_share:.0%} of worker time, "
                 f"wall {self.wall_s:.1f}s" + (f", {self.reused_shards} shard(s) reused" if self.reused_shards else "")]
        if self.failed:
            lines.append("  FAILED: " + "; ".join(self.failed))
        return "\n".join(lines)


def _validate(cfg: CacheConfig) -> None:
    for name, low in (("epochs", 1), ("topk", 1), ("batch_size", 1), ("teacher_input_size", 1)):
        if getattr(cfg, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    if cfg.workers < 0 or cfg.threads < 0 or cfg.retries < 0:
        raise UserError("--workers, --threads and --retries must be >= 0")
    if len(cfg.teacher_mean) != 3 or len(cfg.teacher_std) != 3 or min(cfg.teacher_std) <= 0:
        raise UserError("--teacher-mean and --teacher-std take 3 comma-separated numbers (std > 0)")


def cache_teacher(cfg: CacheConfig, policy_table: dict | None = None, center_crop: float | None = None) -> CacheResult:
    """Build (or resume) a teacher cache. ``center_crop``: score one deterministic centre view per
    sample instead of augmented views (the filter-labels scoring pass)."""
    from .. import teachers
    t_wall = time.perf_counter()
    _validate(cfg)
    paths, index = shardio.resolve_shards(cfg.shards)
    policy = augment.load_policy(cfg.policy, policy_table)
    if center_crop is not None:
        if not 0 < center_crop <= 1:
            raise UserError(f"--crop-pct must be in (0, 1], got {center_crop}")
        policy = augment.Policy(size=cfg.teacher_input_size, auto_augment=None, hflip=0.0, re_prob=0.0)
    specs = teachers.make_specs(cfg.teacher, cfg.teacher_checkpoint)
    teacher_ident = teachers.identity(specs)
    exclude = read_excluded_keys(cfg.exclude) if cfg.exclude else set()
    classes = list(index.classes) if index else None
    out = Path(cfg.out)
    names = [p.name for p in paths]

    identity = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "teacher": {"members": teacher_ident, "input_size": cfg.teacher_input_size,
                    "mean": list(cfg.teacher_mean), "std": list(cfg.teacher_std), "temperature": cfg.temperature},
        "policy": {"canonical": policy.canonical(), "id": policy.id, "version": augment.POLICY_VERSION},
        "view": {"center_crop": center_crop} if center_crop else {"augment": True},
        "topk": cfg.topk, "temperature": cfg.temperature, "prob_dtype": cfg.prob_dtype,
        "epochs": cfg.epochs, "cache_seed": cfg.seed,
        "shard_set": names,
        "exclude": {"count": len(exclude), "keys_sha256": teachers.digest("\n".join(sorted(exclude)))},
    }
    run_id = teachers.digest(json.dumps(identity, sort_keys=True))
    _prepare_out(out, identity, cfg.overwrite)

    device = cfg.device
    with engine.RayContext(cfg.ray_address):
        res = engine.cluster_resources()
        use_gpu = device == "cuda" or device.startswith("cuda:") or (device == "auto" and res.get("GPU", 0) > 0)
        if use_gpu:
            workers = cfg.workers or max(1, int(res.get("GPU", 1)))
            per_gpu = int(res.get("CPU", 1)) // workers
            decode = cfg.decode_threads or max(1, min(16, per_gpu - 1))
            threads, num_cpus, num_gpus = cfg.threads or 0, min(decode, max(per_gpu, 1)), 1
            device = "cuda"
        else:
            cpus = int(res.get("CPU", os.cpu_count() or 1))
            workers = cfg.workers or 1
            threads = cfg.threads or max(1, cpus // workers)
            num_cpus, num_gpus = min(threads, cpus), 0
            decode = cfg.decode_threads or threads     # they take turns with the teacher (CpuGate)
            device = "cpu"
        init = dict(specs=specs, device=device, threads=threads, temperature=cfg.temperature,
                    policy=policy.canonical(), epochs=cfg.epochs, cache_seed=cfg.seed,
                    input_size=cfg.teacher_input_size, mean=cfg.teacher_mean, std=cfg.teacher_std,
                    batch_size=cfg.batch_size, topk=cfg.topk, num_classes=len(classes) if classes else 0,
                    prob_dtype=cfg.prob_dtype, exclude=exclude, center_crop=center_crop, decode_threads=decode)

        # a teacher whose width does not match the classes is refused before any work
        state = {"num_classes": len(classes) if classes else None}

        def probe(width: int) -> None:
            if state["num_classes"] is None:
                state["num_classes"] = width
            elif width != state["num_classes"]:
                raise UserError(f"teacher outputs {width} classes but the shard index lists {state['num_classes']}")
            if cfg.topk > width:
                raise UserError(f"--topk {cfg.topk} exceeds the teacher's {width} classes")

        if classes is None:
            # no index: learn the width from the teacher itself (probe on the driver, CPU)
            probe(teachers.Ensemble(specs, "cpu", cfg.temperature).output_width(cfg.teacher_input_size))
            classes = [str(i) for i in range(state["num_classes"])]
            init["num_classes"] = len(classes)
        identity.update(num_classes=len(classes), classes=classes)

        entries: dict[str, dict] = {}
        tasks = []
        for p, name in zip(paths, names):
            entry = _reuse(out, p, name, run_id)
            if entry is not None:
                entries[name] = entry
                continue
            st = p.stat()
            e = {"name": name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p),
                 "file": cache_file_name(name)}
            tasks.append({"path": str(p), "name": name, "entry": e, "run_id": run_id})
        reused = len(entries)
        total = sum(_count_hint(index, t["name"]) for t in tasks)
        pbar = bar(total * cfg.epochs if total else None, "cache-teacher", "rec", cfg.quiet)
        timing = {"teacher_s": 0.0, "wall_s": 0.0, "steady_records": 0, "steady_s": 0.0}

        def on_result(o: engine.ShardOutcome) -> None:
            if o.result is None:
                return
            r = o.result
            atomic_write_bytes(out / r["entry"]["file"], r["data"])
            entries[r["name"]] = r["entry"]
            timing["teacher_s"] += r["teacher_s"]
            for k in ("wall_s", "steady_records", "steady_s"):
                timing[k] += r[k]

        outcomes = engine.run_pool(CacheWorker, init, tasks, workers=workers, num_cpus=num_cpus, num_gpus=num_gpus,
                                   retries=cfg.retries, on_result=on_result,
                                   on_progress=pbar.update if pbar else None, probe=probe)
        if pbar:
            pbar.close()

    failed = [f"{o.task['name']}: {o.error}" for o in outcomes if o.error]
    for name in names:
        if name in entries and entries[name].get("errors"):
            failed.append(f"{name}: " + "; ".join(entries[name]["errors"]))
    dups = _duplicate_keys(out, [entries[n] for n in names if n in entries])
    if dups:
        failed.append("duplicate keys across shards: " + ", ".join(f"{k} ({', '.join(v)})" for k, v in dups[:10])
                      + (f" and {len(dups) - 10} more" if len(dups) > 10 else ""))
    complete = all(n in entries for n in names) and not dups
    shard_entries = []
    for name in names:
        if name in entries:
            e = dict(entries[name])
            f = out / e["file"]
            e["file_bytes"] = f.stat().st_size
            e["file_sha256"] = sha256_file(f)
            shard_entries.append(e)
    records = sum(e["records"] for e in shard_entries)
    if complete:
        manifest = dict(identity, run_id=run_id, exclude=dict(identity["exclude"], filter_dir=cfg.exclude),
                        source={"shards": str(cfg.shards), "dir": str(paths[0].parent.resolve())},
                        shards=shard_entries,
                        totals={"samples": sum(e["samples"] for e in shard_entries), "records": records,
                                "skipped": sum(len(e["skipped"]) for e in shard_entries),
                                "excluded": sum(e["excluded"] for e in shard_entries)})
        atomic_write_json(out / MANIFEST_NAME, manifest)
    nbytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    new_records = sum(o.result["entry"]["records"] for o in outcomes if o.result)
    wall = time.perf_counter() - t_wall
    return CacheResult(out=out, samples=sum(e["samples"] for e in shard_entries), epochs=cfg.epochs, records=records,
                       skipped=sum(len(e["skipped"]) for e in shard_entries),
                       excluded=sum(e["excluded"] for e in shard_entries), bytes=nbytes,
                       bytes_per_record=nbytes / records if records else float("nan"),
                       records_per_s=new_records / wall if new_records else 0.0,
                       teacher_share=timing["teacher_s"] / timing["wall_s"] if timing["wall_s"] else 0.0,
                       wall_s=wall, reused_shards=reused, failed=failed, worker_s=timing["wall_s"],
                       steady_records_per_s=timing["steady_records"] / timing["steady_s"] if timing["steady_s"] else 0.0)


def _count_hint(index, name: str) -> int:
    if index is None:
        return 0
    for s in index.shards:
        if s.name == name:
            return s.samples
    return 0


def _prepare_out(out: Path, identity: dict, overwrite: bool) -> None:
    """Create the cache dir; refuse to mix runs with different settings unless overwrite."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    run_file = out / RUN_NAME
    diff: list[str] = []
    if out.exists() and any(out.iterdir()):
        if run_file.exists():
            old = read_json(run_file, "cache run file")
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            if diff and not overwrite:
                raise UserError(f"{out} holds a cache built with different {', '.join(diff)}; "
                                f"use --overwrite to replace it or choose another --out")
        elif not overwrite:
            raise UserError(f"{out} is not empty and is not a distill cache; use --overwrite or another --out")
        if overwrite and (not run_file.exists() or diff):
            for f in out.iterdir():
                if f.is_file() and (f.suffix == ".arrow" or f.name in (MANIFEST_NAME, RUN_NAME) or f.name.endswith(".tmp")):
                    f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST_NAME).exists():
        (out / MANIFEST_NAME).unlink()     # rewritten at the end; its absence means "incomplete"
    atomic_write_json(run_file, identity)


def _reuse(out: Path, path: Path, name: str, run_id: str) -> dict | None:
    """The shard entry of an existing output file made by this same run from this same input, else None."""
    f = out / cache_file_name(name)
    if not f.exists():
        return None
    try:
        import pyarrow as pa
        with pa.memory_map(str(f)) as src:
            md = pa.ipc.open_file(src).schema.metadata or {}
        entry = json.loads(md[b"entry"])
        if md.get(b"run_id", b"").decode() != run_id:
            return None
    except Exception:
        return None   # unreadable or foreign: redo
    st = path.stat()
    if entry.get("bytes") != st.st_size:
        return None
    if entry.get("mtime_ns") != st.st_mtime_ns and entry.get("sha256") != sha256_file(path):
        return None
    return entry


def _duplicate_keys(out: Path, entries: list[dict]) -> list[tuple[str, list[str]]]:
    where: dict[str, list[str]] = {}
    for e in entries:
        for k in read_ipc(out / e["file"], columns=["key"]).column("key").to_pylist():
            where.setdefault(k, []).append(e["name"])
    return sorted((k, v) for k, v in where.items() if len(v) > 1)

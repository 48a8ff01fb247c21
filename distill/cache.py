"""``cache_teacher(cfg)``: run the teacher once over every shard for E augmented epochs and store
top-K predictions per (sample, epoch) in one Arrow file per shard plus a manifest.

Per shard (one Ray task): every image is decoded once (per JPEG draft scale) and all E epoch views
are cut from it; producer threads (``--decode-threads``) decode/augment into batches while the teacher runs on the
previous batch. The driver writes each shard's file atomically as it arrives; the manifest is
written last, so its presence means the cache is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import augment, engine, replay, shards as shardio
from .config import CacheConfig
from .format import (CACHE_FORMAT, CACHE_VERSION, MANIFEST_NAME, RUN_NAME, Skip, UserError,
                     atomic_write_bytes, atomic_write_json, cache_file_name, encode_cache_shard,
                     ipc_bytes, read_ipc, read_json, read_excluded_keys, sha256_file)
from .progress import bar


# ----------------------------------------------------------------------------- the worker (runs in a Ray actor)

class CpuGate:
    """On a CPU teacher, views and the teacher's forward take turns instead of overlapping.

    The teacher's intra-op threads already use every core of the worker; a producer thread running at
    the same time preempts one of them and the others wait at the next barrier, so overlap loses more
    than it gains. Producers hold the gate in shared mode around each view; the teacher holds it
    exclusively (and is preferred) for each forward. On GPU there is no gate: views overlap the GPU."""

    def __init__(self):
        self._cond = threading.Condition()
        self._producers = 0
        self._teacher = self._teacher_waiting = False

    @contextlib.contextmanager
    def producer(self):
        with self._cond:
            while self._teacher or self._teacher_waiting:
                self._cond.wait()
            self._producers += 1
        try:
            yield
        finally:
            with self._cond:
                self._producers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def teacher(self):
        with self._cond:
            self._teacher_waiting = True
            while self._producers:
                self._cond.wait()
            self._teacher, self._teacher_waiting = True, False
        try:
            yield
        finally:
            with self._cond:
                self._teacher = False
                self._cond.notify_all()


class ViewProducer:
    """Reads a shard and puts (batch tensor, labels, [(sample, epoch)]) on a queue, block by block.

    Samples are grouped in blocks of ``policy.mix_block`` valid samples (the unit of mix pairing);
    for each epoch the block's views are made (and mixed), so memory holds one block of decoded
    images and one batch of views per thread. ``threads`` decode/augment threads take whole blocks
    in turn (a GPU teacher needs several cores of views); each puts ``None`` on the queue when done.
    Records are keyed by (sample, epoch), so the order batches arrive in does not matter."""

    def __init__(self, path, *, policy, epochs, cache_seed, size, mean, std, batch_size, num_classes,
                 exclude, out_queue, samples: list, center_crop: float | None = None, threads: int = 1,
                 gate: CpuGate | None = None):
        self.threads = max(1, threads)
        self.gate = gate
        self.center_crop = center_crop
        self.path, self.policy, self.epochs, self.cache_seed = path, policy, epochs, cache_seed
        self.size, self.mean, self.std, self.batch_size = size, mean, std, batch_size
        self.num_classes, self.exclude, self.q = num_classes, exclude, out_queue
        self.samples = samples              # appended: (key, label, seeds) in output order
        self.skipped: list[Skip] = []
        self.excluded = 0
        self.error: str | None = None
        self.decode_s = 0.0

    def start(self) -> None:
        self._gen = self._blocks()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)]
        for t in self._workers:
            t.start()

    def join(self) -> None:
        for t in self._workers:
            t.join()

    def _next_block(self):
        with self._lock:
            return next(self._gen, None)

    def _work(self):
        import torch
        try:
            batch, meta = [], []

            def flush():
                if batch:
                    self.q.put((torch.stack(batch), [m[2] for m in meta], [(m[0], m[1]) for m in meta]))
                    batch.clear()
                    meta.clear()

            while (block := self._next_block()) is not None:
                t0 = time.perf_counter()
                srcs = [b[2] for b in block]
                for e in range(self.epochs):
                    views = replay.block_views(self.policy, srcs, [b[4][e] for b in block], [b[3][e] for b in block],
                                               self.size, self.mean, self.std,
                                               guard=self.gate.producer if self.gate else None)
                    for v, b in zip(views, block):
                        batch.append(v)
                        meta.append((b[0], e, b[1]))
                        if len(batch) == self.batch_size:
                            self.decode_s += time.perf_counter() - t0
                            flush()
                            t0 = time.perf_counter()
                self.decode_s += time.perf_counter() - t0
            flush()
        except BaseException as e:  # surfaced by the consumer
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.q.put(None)

    def _blocks(self):
        """Yield lists of valid samples: (index, label, SourceImage, seeds, params per epoch)."""
        block = []
        seen = set()
        for item in shardio.iter_shard(self.path):
            t0 = time.perf_counter()
            if isinstance(item, Skip):
                self.skipped.append(item)
                continue
            key = item.key
            if key in seen:
                self.skipped.append(Skip(key, "duplicate key inside the shard", item_shard(self.path)))
                continue
            seen.add(key)
            if key in self.exclude:
                self.excluded += 1
                continue
            reason = shardio.check_label(item.label, self.num_classes)
            if reason:
                self.skipped.append(Skip(key, reason, item_shard(self.path)))
                continue
            try:
                src = augment.SourceImage(item.data)
                seeds = [augment.derive_seed(self.cache_seed, e, key) for e in range(self.epochs)]
                if self.center_crop:
                    params = [augment.decode_center(src.width, src.height, self.center_crop)] * self.epochs
                else:
                    params = [augment.decode(self.policy, s, src.width, src.height) for s in seeds]
                src.at(min(augment.draft_factor(p, self.size) for p in params))   # the finest decode any epoch needs
            except Exception as e:
                self.skipped.append(Skip(key, f"cannot decode image: {type(e).__name__}: {e}", item_shard(self.path)))
                continue
            self.decode_s += time.perf_counter() - t0
            idx = len(self.samples)
            self.samples.append((key, item.label, seeds))
            block.append((idx, item.label, src, seeds, params))
            if len(block) == self.policy.mix_block:
                yield block
                block = []
        if block:
            yield block


def item_shard(path) -> str:
    return os.path.basename(str(path))


class CacheWorker:
    """One teacher replica. ``run`` processes one whole shard for all epochs."""

    def __init__(self, *, specs, device, threads, temperature, policy, epochs, cache_seed, input_size, mean, std,
                 batch_size, topk, num_classes, prob_dtype, exclude=(), center_crop=None, decode_threads=1,
                 progress=None):
        import torch
        from . import teachers
        if threads:
            torch.set_num_threads(threads)
        self.device = teachers.resolve_device(device)
        self.ens = teachers.Ensemble(specs, self.device, temperature)
        self.policy = augment.Policy.from_dict(policy)
        self.epochs, self.cache_seed, self.size = epochs, cache_seed, input_size
        self.mean, self.std, self.batch_size, self.topk = tuple(mean), tuple(std), batch_size, topk
        self.num_classes, self.prob_dtype, self.progress = num_classes, prob_dtype, progress
        self.exclude = frozenset(exclude)
        self.center_crop = center_crop
        self.decode_threads = decode_threads
        # warm up at the real batch shape: TorchScript's profiling executor (and cuDNN's autotuner)
        # spend their first calls optimising, which would otherwise land in the first shard
        x = torch.zeros(batch_size, 3, input_size, input_size)
        for _ in range(2):
            self.ens(x)

    def probe(self) -> int:
        return self.ens.output_width(self.size)

    def run(self, task: dict) -> dict:
        import torch
        from . import teachers
        engine.maybe_inject_fault()
        t_start = time.perf_counter()
        path = task["path"]
        q: queue.Queue = queue.Queue(maxsize=4)
        samples: list = []
        gate = CpuGate() if self.device.type == "cpu" else None
        prod = ViewProducer(path, policy=self.policy, epochs=self.epochs, cache_seed=self.cache_seed,
                            size=self.size, mean=self.mean, std=self.std, batch_size=self.batch_size,
                            num_classes=self.num_classes, exclude=self.exclude,
                            out_queue=q, samples=samples, center_crop=self.center_crop,
                            threads=self.decode_threads, gate=gate)
        prod.start()
        running = prod.threads
        ids, probs, lprobs = {}, {}, {}
        teacher_s = 0.0
        first_at, last_at, done = None, None, 0
        while running:
            item = q.get()
            if item is None:
                running -= 1
                continue
            x, labels, where = item
            t0 = time.perf_counter()
            if first_at is None:
                first_at = t0
            with gate.teacher() if gate else contextlib.nullcontext():
                p = self.ens(x)
                i, v, lp = teachers.topk(p, self.topk, torch.as_tensor(labels))
            teacher_s += time.perf_counter() - t0
            done += len(where)
            last_at = time.perf_counter()
            i, v, lp = i.numpy(), v.numpy(), lp.numpy()
            for r, (s, e) in enumerate(where):
                ids[s, e], probs[s, e], lprobs[s, e] = i[r], v[r], lp[r]
            if self.progress is not None:
                self.progress.add.remote(len(where))
        prod.join()
        if prod.error:
            raise RuntimeError(f"{os.path.basename(path)}: {prod.error}")
        n, E, K = len(samples), self.epochs, self.topk
        skipped = [s for s in prod.skipped if s.key != "*"]
        errors = [s.reason for s in prod.skipped if s.key == "*"]
        topk_idx = np.zeros((n, E, K), np.int64)
        topk_prob = np.zeros((n, E, K), np.float32)
        label_prob = np.zeros((n, E), np.float32)
        for (s, e), v in ids.items():
            topk_idx[s, e], topk_prob[s, e], label_prob[s, e] = v, probs[s, e], lprobs[s, e]
        table = encode_cache_shard([s[0] for s in samples], [s[1] for s in samples],
                                   np.array([s[2] for s in samples], dtype=np.uint32).reshape(n, E),
                                   topk_idx, topk_prob, label_prob, num_classes=self.num_classes,
                                   prob_dtype=self.prob_dtype, shard=task["name"])
        entry = dict(task["entry"], samples=n, records=n * E, excluded=prod.excluded,
                     skipped=[{"key": s.key, "reason": s.reason} for s in skipped], errors=errors)
        table = table.replace_schema_metadata({**table.schema.metadata, b"entry": json.dumps(entry).encode(),
                                               b"run_id": task["run_id"].encode()})
        return {"name": task["name"], "data": ipc_bytes(table), "entry": entry,
                "teacher_s": teacher_s, "decode_s": prod.decode_s, "wall_s": time.perf_counter() - t_start,
                # steady state: all records over the time from the first batch reaching the teacher to the last leaving it
                "steady_records": done, "steady_s": (last_at - first_at) if first_at else 0.0}


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
    from . import teachers
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


# ----------------------------------------------------------------------------- verify

@dataclass
class VerifyResult:
    problems: list[str]
    recomputed: int = 0
    top1_agreement: float = float("nan")
    max_abs_diff: float = float("nan")

    @property
    def ok(self) -> bool:
        return not self.problems and (self.recomputed == 0 or self.top1_agreement == 1.0)

    def summary(self) -> str:
        lines = ["files: " + ("ok" if not self.problems else f"{len(self.problems)} problem(s)")]
        lines += [f"  {p}" for p in self.problems]
        if self.recomputed:
            lines.append(f"recomputed {self.recomputed} records: top-1 agreement {self.top1_agreement:.2%}, "
                         f"max |prob difference| {self.max_abs_diff:.2e}")
        return "\n".join(lines)


def verify_cache(path, recompute: int = 0, teacher=(), teacher_checkpoint=(), seed: int = 0,
                 device: str = "cpu", shards_dir=None) -> VerifyResult:
    """Check files against the manifest; recompute ``recompute`` random records with the teacher."""
    import torch
    from . import teachers
    from .reader import open_cache, verify_files
    cache = open_cache(path, shards_dir)
    res = VerifyResult(problems=verify_files(cache))
    if recompute <= 0 or res.problems or cache.num_records == 0:
        return res
    members = cache.teacher["members"]
    if teacher:
        specs = teachers.make_specs(teacher, teacher_checkpoint)
    else:
        specs = [teachers.TeacherSpec(m["spec"], m.get("checkpoint")) for m in members]
    ens = teachers.Ensemble(specs, teachers.resolve_device(device), cache.teacher["temperature"])
    rng = np.random.default_rng(seed)
    keys = list(cache._where)
    agree, worst = 0, 0.0
    picks = [(keys[i], int(e)) for i, e in zip(rng.integers(0, len(keys), recompute), rng.integers(0, cache.epochs, recompute))]
    for key, epoch in picks:
        rec = cache.record(key, epoch)
        x = cache.view_tensor(key, epoch, "teacher")[None]
        p = ens(x)[0].cpu()
        stored_idx = torch.tensor(rec["topk_idx"])
        agree += int(int(p.argmax()) == int(stored_idx[0]))
        worst = max(worst, float((p[stored_idx] - torch.tensor(rec["topk_prob"], dtype=torch.float32)).abs().max()))
    res.recomputed, res.top1_agreement, res.max_abs_diff = len(picks), agree / len(picks), worst
    return res

"""``cache_teacher(cfg)``: run the teacher once over every shard for E augmented epochs and store
top-K predictions per (sample, epoch) in one Arrow file per shard plus a manifest.

One Ray task per input shard (``writer.CacheWorker``). The driver writes each shard's file
atomically as it arrives; the manifest is written last, so its presence means the cache is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import engine, recipes, storage
from ..config import CacheConfig, check_batch_memory, check_run_size
from ..data import augment, shards as shardio, views
from ..files import (UserError, atomic_write_bytes, atomic_write_json, claim_dir, digest, live_readers,
                     sha256_file)
from ..format import (AGREEMENT_KEY, ARROW_ENTRY_KEY, ARROW_RUN_ID_KEY, CACHE_FORMAT, CACHE_VERSION, MANIFEST_NAME,
                      REPLAY_ENV_KEY, RUN_NAME, CacheFile, cache_bytes, cache_file_name, CACHE_DONE_DIR, cache_manifest, check_manifest, read_excluded_keys,
                      skip_lines)
from ..progress import bar, note
from .verify import replay_env
from .writer import CacheWorker


# ----------------------------------------------------------------------------- the driver

class _Out:
    """cache-teacher's --out: a local directory (files written atomically, by rename) or a prefix in an
    object store (each object uploaded whole: a store shows all of it or none), the same few operations."""

    def __init__(self, location):
        self.remote = storage.is_remote(location)
        self.loc = storage.text(location).rstrip("/") if self.remote else Path(location)

    def at(self, *names: str):
        return storage.join(self.loc, *names) if self.remote else self.loc.joinpath(*names)

    def exists(self, *names: str) -> bool:
        return storage.exists(self.at(*names)) if self.remote else self.at(*names).is_file()

    def write(self, name: str, data: bytes) -> None:
        if self.remote:
            storage.write_bytes(self.at(name), data)
        else:
            atomic_write_bytes(self.at(name), data)

    def write_json(self, obj, *names: str) -> None:
        if self.remote:
            storage.write_bytes(self.at(*names), (json.dumps(obj, indent=2) + "\n").encode())
        else:
            self.at(*names).parent.mkdir(exist_ok=True)
            atomic_write_json(self.at(*names), obj)

    def read_json(self, what: str, *names: str):
        return storage.read_json(self.at(*names), what)

    def remove(self, name: str) -> None:
        if self.remote:
            storage.remove(self.at(name))
        else:
            self.at(name).unlink(missing_ok=True)

    def records(self) -> list[str]:
        """Names of the completion records (``CACHE_DONE_DIR``)."""
        if self.remote:
            return [n for n in storage.listdir(self.at(CACHE_DONE_DIR)) if n.endswith(".json")]
        done = self.at(CACHE_DONE_DIR)
        return sorted(f.name for f in done.glob("*.json")) if done.is_dir() else []

    def drop_records(self) -> None:
        if self.remote:
            for n in self.records():
                storage.remove(self.at(CACHE_DONE_DIR, n))
        else:
            shutil.rmtree(self.at(CACHE_DONE_DIR), ignore_errors=True)

    def claim(self, inputs: tuple):
        if self.remote:
            return storage.claim_prefix(self.loc, "cache-teacher", CACHE_MARKS)
        return claim_dir(self.loc, "cache-teacher", CACHE_MARKS, inputs=inputs)


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
    top1_agreement: float | None = None    # the teacher's top-1 equals the given label, over records
    mean_label_prob: float | None = None   # the teacher's mean probability of the given label
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # settings taken from the teacher (timm's default config)
    redone: list[str] = field(default_factory=list)     # shards whose earlier file was not proven: "name (why)"
    skips: list[dict] = field(default_factory=list)   # every skipped sample: {"shard", "key", "reason"}

    def _speed(self) -> str:
        if self.records_per_s == 0.0 and self.reused_shards and not self.failed:
            return f"all {self.reused_shards} shard(s) reused from an earlier run (nothing computed), wall {self.wall_s:.1f}s"
        return (f"{self.records_per_s:,.1f} records/s, teacher forward {self.teacher_share:.0%} of worker time, "
                f"wall {self.wall_s:.1f}s" + (f", {self.reused_shards} shard(s) reused" if self.reused_shards else ""))

    def skips_where(self) -> str:
        """Where the full list of skipped samples is (for the summary)."""
        if self.failed:
            return f"{self.out / MANIFEST_NAME} once a rerun completes the cache"
        return f"{storage.join(self.out, MANIFEST_NAME)}, \"skipped\" of each shard, or: distill inspect {self.out} --skipped"

    def summary(self) -> str:
        lines = [f"cache: {self.out}",
                 f"  samples {self.samples}, epochs {self.epochs}, records {self.records}, "
                 f"skipped {self.skipped}, excluded {self.excluded}",
                 f"  {self.bytes:,} bytes, {self.bytes_per_record:.1f} B/record, " + self._speed()]
        if self.top1_agreement is not None:
            lines.append(f"  teacher vs given labels: top-1 agrees on {self.top1_agreement:.1%} of records, "
                         f"mean label probability {self.mean_label_prob:.3f}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.redone:
            lines.append(f"  redone {len(self.redone)} shard(s) whose earlier file was not proven: "
                         + "; ".join(self.redone[:3]) + (f" and {len(self.redone) - 3} more" if len(self.redone) > 3 else ""))
        lines += skip_lines(self.skips, self.skips_where())
        lines += [f"  WARNING: {w}" for w in self.warnings]
        if self.failed:
            lines.append("  FAILED: " + "; ".join(self.failed))
        return "\n".join(lines)


def _validate(cfg: CacheConfig) -> None:
    """What the config's declared ranges (``config.check``) cannot say alone."""
    if cfg.recipe:
        recipes.get(cfg.recipe)                        # an unknown name is refused here
    if len(cfg.teacher_mean) not in (0, 3) or len(cfg.teacher_std) not in (0, 3):
        raise UserError("--teacher-mean and --teacher-std take 3 comma-separated numbers")


@dataclass
class Plan:
    """Everything a run is decided by, resolved (and refused) before anything is written under --out."""
    paths: list[Path]
    index: object
    spec: views.ViewSpec
    specs: list
    identity: dict
    exclude: set
    warnings: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.paths]

    @property
    def run_id(self) -> str:
        return digest(json.dumps(self.identity, sort_keys=True))


def _input_size(cfg: CacheConfig, specs, warnings: list[str]) -> int:
    """--teacher-input-size, else the size the teacher declares, else 224 with a warning."""
    from .. import teachers
    hint = teachers.input_size_hint(specs)
    if cfg.teacher_input_size:
        if hint and hint != cfg.teacher_input_size:
            warnings.append(f"--teacher-input-size {cfg.teacher_input_size} differs from the {hint} px the teacher "
                            f"declares: is that intended?")
        return cfg.teacher_input_size
    if hint:
        return hint
    warnings.append("--teacher-input-size not given and the teacher does not declare one: using 224; "
                    "give the size the teacher was trained at")
    return 224


def _normalisation(cfg: CacheConfig, specs, size: int, warnings: list[str], notes: list[str]):
    """(mean, std): --teacher-mean/--teacher-std, else timm's default config when every member is a
    timm model (said in a note, with the input size when that came from timm too), else ImageNet's."""
    from .. import teachers
    from ..config import IMAGENET_MEAN, IMAGENET_STD
    timm_cfg = teachers.timm_preprocessing(specs)
    source = "timm's default config"
    if timm_cfg is None and teachers.dir_preprocessing(specs):      # adapt-teacher directories declare theirs
        timm_cfg, source = teachers.dir_preprocessing(specs), "the teacher directory's teacher.json"
    mean, std = tuple(cfg.teacher_mean), tuple(cfg.teacher_std)
    took = []
    if timm_cfg and not cfg.teacher_input_size and size == timm_cfg["input_size"]:
        took.append(f"input {size}")
    if timm_cfg and not mean:
        mean = timm_cfg["mean"]
        took.append(f"mean {_fmt(mean)}")
    if timm_cfg and not std:
        std = timm_cfg["std"]
        took.append(f"std {_fmt(std)}")
    if took:
        notes.append(f"{', '.join(dict.fromkeys(s.spec for s in specs))}: {', '.join(took)} from {source} "
                     "(--teacher-input-size, --teacher-mean, --teacher-std set them)")
    if not timm_cfg and (not mean or not std) and any(s.kind == "timm" for s in specs):
        warnings.append("the teacher's members do not share one timm default config: using ImageNet's mean/std "
                        "where --teacher-mean/--teacher-std are not given")
    return mean or IMAGENET_MEAN, std or IMAGENET_STD


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _plan(cfg: CacheConfig, policy_table: dict | None, center_crop: float | None) -> Plan:
    """Resolve shards, views and the teacher (loaded once on the driver: its weights digest, output
    width and input size); refuse bad combinations (K vs classes, classes vs the index)."""
    from .. import teachers
    _validate(cfg)
    paths, index = shardio.resolve_shards(cfg.shards)
    check_run_size(cfg.epochs, index.num_samples if index else None, cfg.allow_long_run)
    # a timm teacher is created with --teacher-num-classes, else the shards' classes (else timm's default)
    num_classes = cfg.teacher_num_classes or (len(index.classes) if index else 0)
    specs = teachers.make_specs(cfg.teacher, cfg.teacher_checkpoint, random_weights=cfg.teacher_random_weights,
                                num_classes=num_classes)
    if cfg.teacher_num_classes and not any(s.kind == "timm" for s in specs):
        raise UserError("--teacher-num-classes applies to timm: teachers only (the others' heads are their own)")
    warnings: list[str] = []
    notes: list[str] = []
    size = _input_size(cfg, specs, warnings)
    check_batch_memory(cfg.batch_size, size, "--teacher-input-size")
    mean, std = _normalisation(cfg, specs, size, warnings, notes)
    spec = (views.ViewSpec.scoring(size, center_crop) if center_crop is not None
            else views.ViewSpec(augment.load_policy(cfg.policy, policy_table,
                                                    base=recipes.get(cfg.recipe).policy if cfg.recipe else None)))
    teachers.resolve_precision(cfg.teacher_precision, "cpu")          # a bad value is refused here
    ens = teachers.Ensemble(specs, "cpu", cfg.temperature, outputs=cfg.teacher_outputs)   # refuses bad outputs
    width, members = ens.output_width(size), ens.identity()
    del ens
    classes = list(index.classes) if index else [str(i) for i in range(width)]
    if width != len(classes):
        raise UserError(f"teacher outputs {width} classes but the shard index lists {len(classes)}: the teacher must "
                        f"predict the shards' {len(classes)} classes, in the index's order")
    if cfg.topk > width:
        raise UserError(f"--topk {cfg.topk} exceeds the teacher's {width} classes")
    exclude = read_excluded_keys(cfg.exclude) if cfg.exclude else set()
    if spec.mixing and index is not None and index.order is not None and not index.order.get("shuffled"):
        warnings.append("the shards were written without shuffling (make-shards --no-shuffle) and the policy mixes: "
                        "mix partners come from consecutive samples, of the same class when the input was "
                        "class-ordered; rewrite the shards with make-shards (shuffles by default)")
    identity = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "teacher": {"members": members, "input_size": size, "mean": list(mean),
                    "std": list(std), "temperature": cfg.temperature,
                    # only when not logits: a cache of a logits teacher keeps its run_id
                    **({"outputs": cfg.teacher_outputs} if cfg.teacher_outputs != "logits" else {})},
        **spec.views_of(),
        "topk": cfg.topk, "temperature": cfg.temperature, "prob_dtype": cfg.prob_dtype,
        "epochs": cfg.epochs, "cache_seed": cfg.seed, "shard_set": [p.name for p in paths],
        "exclude": {"count": len(exclude), "keys_sha256": digest("\n".join(sorted(exclude)))},
        "num_classes": len(classes), "classes": classes,
    }
    if cfg.recipe:
        identity["recipe"] = cfg.recipe
    return Plan(paths, index, spec, specs, identity, exclude, warnings, notes)


def _precision(cfg: CacheConfig, device: str) -> str:
    import torch

    from .. import teachers
    return teachers.resolve_precision(cfg.teacher_precision, torch.device(device))


@dataclass
class Placement:
    device: str
    workers: int
    threads: int
    num_cpus: float
    num_gpus: float
    view_workers: int = 0       # view loader processes per worker (0: views rendered in the worker's thread)


def _placement(cfg: CacheConfig, res: dict) -> Placement:
    """Workers and threads from the Ray cluster's resources: one worker per GPU, else CPU workers."""
    d = cfg.device
    if d == "cuda" or d.startswith("cuda:") or (d == "auto" and res.get("GPU", 0) > 0):
        workers = cfg.workers or max(1, int(res.get("GPU", 1)))
        per_gpu = int(res.get("CPU", 1)) // workers
        # view loader processes: the node's cores per GPU - 1 (one core drives the GPU and finishes views)
        procs = cfg.view_workers if cfg.view_workers >= 0 else max(0, min(16, per_gpu - 1))
        return Placement("cuda", workers, cfg.threads or 0, min(max(1, procs), max(per_gpu, 1)), 1, procs)
    cpus = int(res.get("CPU", os.cpu_count() or 1))
    workers = cfg.workers or 1
    threads = cfg.threads or max(1, cpus // workers)
    # views and the teacher take turns on the worker's cores (rendered in its thread), unless
    # --view-workers N asks for N view loader processes beside the teacher
    return Placement("cpu", workers, threads, min(threads, cpus), 0, max(0, cfg.view_workers))


def _tasks(out: _Out, plan: Plan) -> tuple[dict, list, list[str]]:
    """Finished shards to keep ({name: entry}), the tasks of the rest, and why files found were redone."""
    entries, tasks, redone = {}, [], []
    proofs = _proofs(out, plan.run_id)
    for p, name in zip(plan.paths, plan.names):
        entry, why = _reuse(out, p, name, plan.run_id, proofs.get(cache_file_name(name)))
        if entry is not None:
            entries[name] = entry
            continue
        if why:
            redone.append(f"{name} ({why})")
        st = p.stat()
        # the input's mtime goes to the manifest, not into the file: a file's bytes do not depend on where
        # its input lies (s3:// or a local copy of the same shard give the same file)
        e = {"name": name, "bytes": st.st_size, "sha256": _input_sha256(plan, p), "file": cache_file_name(name)}
        tasks.append({"path": storage.text(p), "name": name, "entry": e, "run_id": plan.run_id,
                      "mtime_ns": st.st_mtime_ns})
    return entries, tasks, redone


def _proofs(out: _Out, run_id: str) -> dict[str, dict]:
    """{file name: {file_bytes, file_sha256}} of the files this run (same identity) finished before: from
    the manifest of an earlier complete run, then the completion records (``CACHE_DONE_DIR``) written as each
    file was finished. A file is reused only when its bytes match these; nothing is hashed and trusted."""
    proofs: dict[str, dict] = {}
    try:
        m = out.read_json("cache manifest", MANIFEST_NAME)
        check_manifest(m, out.at(MANIFEST_NAME))
        if m["run_id"] == run_id:
            proofs.update((e["file"], e) for e in m["shards"] if e.get("complete", True))
    except UserError:
        pass                              # none, or not one to trust: its files are redone
    for name in out.records():
        try:
            d = out.read_json("completion record", CACHE_DONE_DIR, name)
            if d["run_id"] == run_id and name == d["file"] + ".json":
                proofs[d["file"]] = d
        except (UserError, KeyError, TypeError):
            continue
    return proofs


def _input_sha256(plan: Plan, path: Path) -> str:
    """An input tar's sha256: the shard index's when it records one for this size, else hashed."""
    for s in (plan.index.shards if plan.index else ()):
        if s.name == path.name and s.sha256 and s.bytes == path.stat().st_size:
            return s.sha256
    return storage.sha256(path)


def _run_tasks(cfg: CacheConfig, plan: Plan, place: Placement, tasks: list, entries: dict, out: _Out,
               label: str = "cache-teacher"):
    """Run the shard tasks on the pool; each finished shard's file is written (atomically) and dropped.
    The bar (named ``label``) counts records; as each shard finishes, its samples skipped or excluded
    leave the total, so a run that completes ends at 100%."""
    t = plan.identity["teacher"]
    init = dict(specs=plan.specs, expect=t["members"], device=place.device, precision=t["precision"],
                threads=place.threads, temperature=cfg.temperature, outputs=cfg.teacher_outputs,
                views_of={"policy": plan.identity["policy"], "view": plan.identity["view"]}, epochs=cfg.epochs,
                cache_seed=cfg.seed, input_size=t["input_size"], mean=tuple(t["mean"]), std=tuple(t["std"]),
                batch_size=cfg.batch_size, topk=cfg.topk, num_classes=plan.identity["num_classes"],
                prob_dtype=cfg.prob_dtype, exclude=plan.exclude, view_workers=place.view_workers,
                storage_options=storage.options())
    if not tasks:
        note(f"{label}: all {len(plan.names)} shard(s) reused from an earlier run: nothing to compute", cfg.quiet)
    hints = {t_["name"]: _count_hint(plan.index, t_["name"]) * cfg.epochs for t_ in tasks}
    total = sum(hints.values())
    pbar = bar(total if total else None, label, "rec", cfg.quiet or not tasks)
    timing = {"teacher_s": 0.0, "wall_s": 0.0, "steady_records": 0, "steady_s": 0.0, "new_records": 0}

    def on_result(o: engine.ShardOutcome) -> None:
        if o.result is None:
            return
        r = o.result
        out.write(r["entry"]["file"], r["data"])
        # the file's size and checksum from the bytes in hand: the driver never reads the file back; the
        # completion record lets a resumed run prove the file before it reuses it
        proof = {"file": r["entry"]["file"], "file_bytes": len(r["data"]),
                 "file_sha256": hashlib.sha256(r["data"]).hexdigest(), "run_id": plan.run_id,
                 "mtime_ns": o.task["mtime_ns"]}
        if out.remote:                           # what proves the object on rerun without reading it back
            proof["etag"] = storage.etag(out.at(proof["file"]))
        out.write_json(proof, CACHE_DONE_DIR, f"{proof['file']}.json")
        entries[r["name"]] = dict(r["entry"], mtime_ns=proof["mtime_ns"], file_bytes=proof["file_bytes"],
                                  file_sha256=proof["file_sha256"])
        timing["new_records"] += r["entry"]["records"]
        if pbar and pbar.total and hints.get(r["name"]):   # skipped / excluded samples leave the total
            pbar.total = max(pbar.n, pbar.total - max(0, hints[r["name"]] - r["entry"]["records"]))
            pbar.refresh()
        for k in ("teacher_s", "wall_s", "steady_records", "steady_s"):
            timing[k] += r[k]
        o.result = None                          # the driver keeps no shard's bytes

    def probe(width: int) -> None:               # a worker that loaded another teacher is refused before work
        if width != plan.identity["num_classes"]:
            raise UserError(f"a worker's teacher outputs {width} classes, the driver's {plan.identity['num_classes']}")

    outcomes = engine.run_pool(CacheWorker, init, tasks, workers=place.workers, num_cpus=place.num_cpus,
                               num_gpus=place.num_gpus, retries=cfg.retries, on_result=on_result,
                               on_progress=pbar.update if pbar else None, probe=probe,
                               log_path=None if out.remote else out.at(engine.ERRORS_LOG))
    failed = [o for o in outcomes if o.error]
    if pbar:
        if not failed:                           # every shard done: 100% (a retried shard's first try counted too;
            pbar.total = pbar.total or pbar.n    # without an index the total was unknown until now)
            pbar.n = pbar.total
        pbar.close()
    return [f"{o.task['name']}: {o.error}" for o in failed], timing


def cache_teacher(cfg: CacheConfig, policy_table: dict | None = None, center_crop: float | None = None) -> CacheResult:
    """Build (or resume) a teacher cache. ``center_crop``: score one deterministic centre view per
    sample instead of augmented views (the filter-labels scoring pass).

    Everything that can be refused is refused before --out is touched; the directory is then locked
    for this run; finished shards of an earlier run with the same identity are kept."""
    t_wall = time.perf_counter()
    out = _Out(cfg.out)
    # the directory first: checked and locked before anything slow (a second run is refused at once)
    with out.claim((cfg.shards, cfg.exclude, *cfg.teacher, *cfg.teacher_checkpoint)):
        plan = _plan(cfg, policy_table, center_crop)
        for n in plan.notes:
            note(f"note: {n}", cfg.quiet)
        for w in plan.warnings:
            note(f"warning: {w}", cfg.quiet)
        with engine.RayContext(cfg.ray_address):
            place = _placement(cfg, engine.cluster_resources())
            # device type and precision are part of what a cache is: a resume may not mix them
            plan.identity["teacher"].update(device_type=place.device, precision=_precision(cfg, place.device))
            _prepare_out(out, plan.identity, cfg.overwrite)
            entries, tasks, redone = _tasks(out, plan)
            for r in redone:
                note(f"redoing shard {r}", cfg.quiet)
            failed, timing = _run_tasks(cfg, plan, place, tasks, entries, out,
                                        "filter-labels: scoring" if center_crop is not None else "cache-teacher")
            res = _finish(cfg, plan, out, entries, failed)
    res.redone = redone
    res.reused_shards = len(plan.names) - len(tasks)
    res.wall_s = time.perf_counter() - t_wall
    res.records_per_s = timing["new_records"] / res.wall_s if timing["new_records"] else 0.0
    res.teacher_share = timing["teacher_s"] / timing["wall_s"] if timing["wall_s"] else 0.0
    res.worker_s = timing["wall_s"]
    res.steady_records_per_s = timing["steady_records"] / timing["steady_s"] if timing["steady_s"] else 0.0
    res.warnings = plan.warnings + res.warnings
    res.notes = plan.notes
    return res


def _finish(cfg: CacheConfig, plan: Plan, out: _Out, entries: dict, failed: list[str]) -> CacheResult:
    """Check the shards together (errors, duplicate keys), write the manifest when complete, and
    report the teacher's agreement with the given labels."""
    names = plan.names
    have = [entries[n] for n in names if n in entries]
    for e in have:
        if e.get("errors"):
            failed.append(f"{e['name']}: " + "; ".join(e["errors"]))
    dups = _duplicate_keys(out, have)
    if dups:
        failed.append("duplicate keys: " + ", ".join(f"{k} ({', '.join(v)})" for k, v in dups[:10])
                      + (f" and {len(dups) - 10} more" if len(dups) > 10 else ""))
    # a shard whose read hit an error holds the samples before it: incomplete, redone on rerun, and the
    # cache gets no manifest until every shard is complete
    shard_entries = [dict(e, complete=not e.get("errors")) for e in have]
    records = sum(e["records"] for e in shard_entries)
    agreement = _agreement(shard_entries)
    warnings = _agreement_warning(agreement, plan.identity["num_classes"], plan.identity["teacher"]["input_size"])
    for w in warnings:
        note(f"warning: {w}", cfg.quiet)
    manifest = cache_manifest(plan.identity, shard_entries,
                              exclude=dict(plan.identity["exclude"], filter_dir=cfg.exclude),
                              source={"shards": str(cfg.shards), "dir": storage.text(plan.paths[0].parent) if
                                      storage.is_remote(plan.paths[0]) else str(plan.paths[0].parent.resolve())},
                              **{AGREEMENT_KEY: agreement, REPLAY_ENV_KEY: replay_env()})
    totals = manifest["totals"]
    if len(have) == len(names) and not dups and not totals["incomplete_shards"]:
        out.write_json(manifest, MANIFEST_NAME)
        out.drop_records()                       # the manifest proves the files from now on
    nbytes = (sum(storage.size(out.at(n)) for n in [e["file"] for e in have] + [MANIFEST_NAME, RUN_NAME]
                  if out.exists(n)) if out.remote else cache_bytes(out.loc, [e["file"] for e in have]))
    return CacheResult(out=out.loc, samples=totals["samples"], epochs=cfg.epochs, records=records,
                       skipped=totals["skipped"], excluded=totals["excluded"], bytes=nbytes,
                       bytes_per_record=nbytes / records if records else float("nan"), records_per_s=0.0,
                       teacher_share=0.0, wall_s=0.0, reused_shards=0, failed=failed,
                       top1_agreement=agreement["top1"], mean_label_prob=agreement["mean_label_prob"],
                       warnings=warnings,
                       skips=[{"shard": e["name"], **s} for e in shard_entries for s in e["skipped"]])


def _agreement(entries: list[dict]) -> dict:
    n = sum(e.get("agreement", {}).get("records", 0) for e in entries)
    top1 = sum(e.get("agreement", {}).get("top1", 0) for e in entries)
    lp = sum(e.get("agreement", {}).get("label_prob_sum", 0.0) for e in entries)
    return {"records": n, "top1": round(top1 / n, 6) if n else None, "mean_label_prob": round(lp / n, 6) if n else None}


def _agreement_warning(a: dict, num_classes: int, size: int) -> list[str]:
    """One line when the teacher agrees with the labels at most twice as often as chance would."""
    chance = 1.0 / max(num_classes, 1)
    if a["top1"] is None or num_classes < 2 or a["top1"] > 2 * chance:
        return []
    return [f"the teacher's top-1 agrees with the given labels on {a['top1']:.1%} of records (chance {chance:.1%}, "
            f"mean label probability {a['mean_label_prob']:.3f}): a wrong --teacher-input-size ({size}) or "
            f"--teacher-mean/--teacher-std, or a teacher whose classes are not these labels?"]


def _count_hint(index, name: str) -> int:
    if index is None:
        return 0
    for s in index.shards:
        if s.name == name:
            return s.samples
    return 0


# a directory is a cache (this stage's own output, or convert-cache's) when it holds a cache's run file
CACHE_MARKS = ((RUN_NAME, {"format": CACHE_FORMAT}), (MANIFEST_NAME, {"format": CACHE_FORMAT}))


def _prepare_out(out: _Out, identity: dict, overwrite: bool) -> None:
    """Write the run file; a cache of other settings is refused, or with ``overwrite`` its own files
    deleted (``_own_files``: never another file). ``out`` is claimed (``claim_dir``): empty or a cache."""
    if out.exists(RUN_NAME):
        old = out.read_json("cache run file", RUN_NAME)
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff and not overwrite:
            raise UserError(f"{out.loc} holds a cache built with different {', '.join(diff)}; "
                            f"use --overwrite to replace it or choose another --out")
        if diff:
            readers = [] if out.remote else live_readers(out.loc)
            if readers:
                r = readers[0]
                raise UserError(f"{out.loc} is being read by distill {r.get('what')} (pid {r['pid']} on {r.get('host')}): "
                                f"--overwrite would delete files under it; wait for it to finish or use another --out")
            for name in _own_files(out):
                out.remove(name)
            out.drop_records()
    # a resume keeps the old manifest until the new one replaces it (atomically, at the end)
    out.write_json(identity, RUN_NAME)


def _own_files(out: _Out) -> list[str]:
    """The files an earlier cache-teacher run wrote in ``out``: run file, manifest, errors log, and the
    shard files its manifest or completion records name (plain names inside ``out``)."""
    names = {RUN_NAME, MANIFEST_NAME, engine.ERRORS_LOG}
    try:
        names |= {e["file"] for e in out.read_json("cache manifest", MANIFEST_NAME)["shards"]}
    except (UserError, OSError, ValueError, KeyError, TypeError):
        pass
    for record in out.records():
        try:
            names.add(out.read_json("completion record", CACHE_DONE_DIR, record)["file"])
        except (UserError, OSError, ValueError, KeyError, TypeError):
            pass
    return [n for n in sorted(names) if isinstance(n, str) and "/" not in n and out.exists(n)]


def _reuse(out: _Out, path, name: str, run_id: str, proof: dict | None) -> tuple[dict | None, str | None]:
    """(the shard entry of an existing output file made by this same run from this same input, None),
    or (None, why it is redone) — why is None when there is no file. In a store, an object is proven
    by its size and the entity tag recorded when it was uploaded (else read and hashed)."""
    f = out.at(cache_file_name(name))
    if not out.exists(cache_file_name(name)):
        return None, None
    if proof is None:
        return None, "no checksum was recorded for its file"
    if out.remote:
        same = storage.size(f) == proof["file_bytes"] and (
            storage.etag(f) == proof["etag"] if proof.get("etag") else storage.sha256(f) == proof["file_sha256"])
    else:
        same = f.stat().st_size == proof["file_bytes"] and sha256_file(f) == proof["file_sha256"]
    if not same:
        return None, "its file's bytes differ from the checksum recorded when it was written"
    try:
        with CacheFile(f) as cf:
            md = cf.schema.metadata or {}
        entry = json.loads(md[ARROW_ENTRY_KEY])
        if entry.get("name") != name or entry.get("file") != cache_file_name(name):
            return None, "its file names another shard"   # its names are never used as paths
        if md.get(ARROW_RUN_ID_KEY, b"").decode() != run_id:
            return None, "its file was written by another run"
    except Exception:  # noqa: BLE001 - any unreadable file is redone
        return None, "its file is unreadable"
    if entry.get("errors"):
        return None, "its read hit an error"       # maybe transient: redo it, never keep it
    st = path.stat()
    mtime = proof.get("mtime_ns", entry.get("mtime_ns"))      # (files before 2026-12-08 hold it in the footer)
    if entry.get("bytes") != st.st_size or (mtime != st.st_mtime_ns and entry.get("sha256") != storage.sha256(path)):
        return None, "its input shard changed"
    return dict(entry, mtime_ns=st.st_mtime_ns, file_bytes=proof["file_bytes"], file_sha256=proof["file_sha256"]), None


def _duplicate_keys(out, entries: list[dict]) -> list[tuple[str, list[str]]]:
    """Keys that occur twice: inside one shard (the worker recorded them) or across shards. The keys of
    all shards are sorted together as one Arrow string array: no Python object per key."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    where: dict[str, set[str]] = {}
    for e in entries:
        for k in e.get("duplicates", ()):
            where.setdefault(k, set()).add(e["name"])
    chunks, owner = [], []
    for i, e in enumerate(entries):
        with CacheFile(out.at(e["file"]) if isinstance(out, _Out) else Path(out) / e["file"]) as f:
            chunks.append(f.keys().cast(pa.large_string()))
        owner.append(np.full(len(chunks[-1]), i, np.int32))
    if chunks and sum(len(c) for c in chunks) > 1:
        keys = pa.chunked_array(chunks).combine_chunks()
        order = pc.sort_indices(keys)
        s = keys.take(order)
        same = np.flatnonzero(pc.equal(s.slice(1), s.slice(0, len(s) - 1)).to_numpy(zero_copy_only=False))
        order, owner_all = order.to_numpy(), np.concatenate(owner)
        for j in same.tolist():              # adjacent equal keys in sorted order: a duplicate
            names = {entries[owner_all[order[j]]]["name"], entries[owner_all[order[j + 1]]]["name"]}
            where.setdefault(s[j].as_py(), set()).update(names)
    return sorted((k, sorted(v)) for k, v in where.items())

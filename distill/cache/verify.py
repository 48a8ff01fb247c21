"""Checks of a finished cache, used by ``distill verify`` and by train-student before its first step:

* ``file_problems`` / ``check_files``: every shard file against the manifest (presence, size,
  sha256, row count; ``file_problems`` also finite probabilities);
* ``check_view_fingerprints``: a few recorded views per shard (manifest ``view_fingerprints``) are
  replayed here and must give the same uint8 pixels the teacher saw (same Pillow, libjpeg-turbo,
  augmentation code);
* ``verify_cache``: both, plus ``recompute`` random records with the teacher at the recorded
  precision (top-1 agreement and max |delta p|).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import FormatError, UserError
from ..format import FINGERPRINTS_KEY, REPLAY_ENV_KEY, CacheFile, Skip
from .reader import Cache, file_problem, open_cache

_THREADS = min(8, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- files

def _file_problem(cache: Cache, e: dict, rows: bool) -> str | None:
    try:
        f = cache.file_path(e["name"])
    except FormatError as err:       # a link leading outside: a problem of this part, like a damaged file
        return str(err)
    if cache.remote and not rows:        # before training: size and footer; each batch's CRC-32 as it is read
        try:
            cache.open_file(e["name"]).close()
        except FormatError as err:
            return str(err).removeprefix("cache file ").split(": the cache is damaged")[0]
        return None
    problem = file_problem(f, e, cache.manifest)
    if problem:
        return problem
    if rows:
        try:
            with CacheFile(f) as cf:
                n = cf.samples
                rows = cf.num_rows()
            if rows != n * cf.epochs:
                return f"{f}: {rows} rows, its metadata says {n} samples x {cf.epochs} epochs"
        except FormatError as err:
            return str(err)
        if n != e["samples"]:
            return f"{f}: {n} samples, manifest says {e['samples']}"
        try:
            return _nonfinite_problem(f)
        except FormatError as err:
            return str(err)
    return None


def _nonfinite_problem(f: Path) -> str | None:
    """A file whose stored probabilities hold NaN or infinity (a teacher's non-finite output, cached by an
    older distill), naming the first samples; read one epoch at a time."""
    bad, keys = 0, []
    with CacheFile(f) as cf:
        for epoch in range(cf.epochs):
            t = cf.read(epochs=[epoch], columns=["key", "topk_prob", "label_prob"])
            probs = t.column("topk_prob").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            rows = ~np.isfinite(probs.reshape(t.num_rows, -1)).all(axis=1)
            rows |= ~np.isfinite(t.column("label_prob").to_numpy(zero_copy_only=False))
            bad += int(rows.sum())
            keys += [k for k in np.asarray(t.column("key").to_pylist(), dtype=object)[rows][:3] if k not in keys]
    if not bad:
        return None
    return (f"{f}: {bad} record(s) hold NaN or infinite probabilities (samples {', '.join(keys[:3])}"
            f"{', ...' if bad > 3 else ''}): the teacher's outputs were not finite; rebuild the cache")


Part = tuple[int, int]                 # (rank, world): this process checks shards rank, rank + world, ...


def _gathered(problems: list[str], gather) -> list[str]:
    return gather(problems) if gather is not None else problems


def file_problems(cache: Cache, rows: bool = True, part: Part = (0, 1)) -> list[str]:
    """Problems found checking every file (of this ``part``) against the manifest (empty list: all
    good). Files are hashed in parallel threads (hashlib releases the GIL)."""
    entries = cache.manifest["shards"][part[0]::part[1]]
    with ThreadPoolExecutor(_THREADS) as pool:
        found = pool.map(lambda e: _file_problem(cache, e, rows), entries)
        return [p for p in found if p]


def check_files(cache: Cache, part: Part = (0, 1), gather=None) -> None:
    """Stop with one line naming the first damaged file (size, then checksum), before any use.
    Under DDP each rank hashes its ``part`` and ``gather`` (rank problems -> everyone's) lets every
    rank stop on any rank's finding."""
    problems = _gathered(file_problems(cache, rows=False, part=part), gather)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"cache file {problems[0]}{more}; the cache is damaged: run distill verify {cache.path}")
    cache.mark_checked(cache.shard_names)            # every rank found its part intact: none is hashed again


# ----------------------------------------------------------------------------- replay fingerprints

def replay_env() -> dict:
    """The versions that decide replayed pixels (recorded in the manifest, ``replay_env``)."""
    import PIL
    from PIL import features

    from .. import __version__
    from ..data import augment
    return {"pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"),
            "numpy": np.__version__, "policy_version": augment.POLICY_VERSION, "distill": __version__}


def _fingerprint_problems(cache: Cache, entry: dict, path: Path) -> list[str]:
    from ..data import augment, shards as shardio, views
    prints = entry.get(FINGERPRINTS_KEY) or []
    want = {p["key"] for p in prints}
    srcs = {}
    for item in shardio.iter_shard(path):
        if not isinstance(item, Skip) and item.key in want:
            srcs[item.key] = augment.SourceImage(item.data)
            if len(srcs) == len(want):
                break
    problems = []
    for p in prints:
        where = f"view of {p['key']} epoch {p['epoch']} in shard {entry['name']}"
        if p["key"] not in srcs:
            problems.append(f"{where}: sample not found in {path}")
        elif augment.derive_seed(cache.manifest["cache_seed"], p["epoch"], p["key"]) != p["seed"]:
            problems.append(f"{where}: seed derivation differs from the cache's")
        else:
            got = views.fingerprint(cache.view_spec, p["seed"], srcs[p["key"]], p["size"])
            if got != p["sha256"]:
                problems.append(f"{where}: replayed pixels differ from the teacher's (fingerprint {got} != {p['sha256']})")
    return problems


def fingerprint_problems(cache: Cache, paths: dict[str, Path] | None = None, part: Part = (0, 1)) -> list[str]:
    """Replay every recorded fingerprint view (of this ``part``'s shards); ``paths``: shard name ->
    tar (default: the cache's source)."""
    entries = [e for e in cache.manifest["shards"][part[0]::part[1]] if e.get(FINGERPRINTS_KEY)]
    paths = paths or {e["name"]: cache.shard_path(e["name"]) for e in entries}
    with ThreadPoolExecutor(_THREADS) as pool:
        found = pool.map(lambda e: _fingerprint_problems(cache, e, paths[e["name"]]), entries)
        return [p for ps in found for p in ps]


def _env_diff(cache: Cache) -> str:
    then, now = cache.manifest.get(REPLAY_ENV_KEY) or {}, replay_env()
    diff = [f"{k} {then.get(k)} -> {now[k]}" for k in now if then.get(k) != now[k]]
    return ("cache made with " + ", ".join(diff)) if diff else "same library versions"


def check_view_fingerprints(cache: Cache, paths: dict[str, Path] | None = None, allow: bool = False,
                            part: Part = (0, 1), gather=None) -> str | None:
    """Stop (UserError) when a recorded view replays differently here; with ``allow`` return a
    description of the drift instead (for the run's summary). None when every view matches."""
    problems = _gathered(fingerprint_problems(cache, paths, part), gather)
    if not problems:
        return None
    msg = f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") + f"; {_env_diff(cache)}"
    if not allow:
        raise UserError(f"replay drift: {msg}; train where the image libraries match the cache's, "
                        f"or pass --allow-replay-drift to go on anyway")
    return msg


# ----------------------------------------------------------------------------- verify

@dataclass
class VerifyResult:
    problems: list[str]
    recomputed: int = 0
    top1_agreement: float = float("nan")
    max_abs_diff: float = float("nan")
    precision: str = "fp32"

    @property
    def ok(self) -> bool:
        # no file or view problem, and the recomputed top-1 agrees on every record at fp32, or on at
        # least 98% at bf16/fp16 (another GPU or kernel may flip near-ties)
        need = 1.0 if self.precision == "fp32" else 0.98
        return not self.problems and (self.recomputed == 0 or self.top1_agreement >= need)

    def summary(self) -> str:
        lines = ["files and replayed views: " + ("ok" if not self.problems else f"{len(self.problems)} problem(s)")]
        lines += [f"  {p}" for p in self.problems]
        if self.recomputed:
            lines.append(f"recomputed {self.recomputed} records at {self.precision}: top-1 agreement "
                         f"{self.top1_agreement:.2%}, max |prob difference| {self.max_abs_diff:.2e}")
        return "\n".join(lines)


def verify_cache(path, recompute: int = 0, teacher=(), teacher_checkpoint=(), seed: int = 0,
                 device: str = "cpu", shards_dir=None, allow_replay_drift: bool = False) -> VerifyResult:
    """Check files and replayed views against the manifest; recompute ``recompute`` random records
    with the teacher at the precision the cache recorded."""
    cache = open_cache(path, shards_dir)
    res = VerifyResult(problems=file_problems(cache))
    if not res.problems:
        drift = fingerprint_problems(cache)
        if drift and not allow_replay_drift:
            res.problems += drift + [_env_diff(cache)]
    if recompute <= 0 or res.problems or cache.num_records == 0:
        return res
    return _recompute(cache, res, recompute, teacher, teacher_checkpoint, seed, device)


_FROM_MANIFEST = ("export", "directory", "timm")


def _manifest_spec(teachers, member: dict):
    """The spec of a teacher the manifest names, refused unless loading it runs no code the manifest chose
    (a downloaded cache): ``.pt2`` programs (loaded without running code), adapted-teacher directories (their
    .pt2) and timm names (an installed library's models, weights loaded weights-only) are taken from it, a
    TorchScript file or a module:callable is not."""
    spec = teachers.TeacherSpec(member["spec"], member.get("checkpoint"), bool(member.get("random_weights")),
                                int(member.get("num_classes", 0)))
    if spec.kind not in _FROM_MANIFEST:
        what = "TorchScript file" if spec.kind == "torchscript" else "module:callable"
        raise UserError(f"verify --recompute does not load the teacher the cache's manifest names, {what} "
                        f"{spec.spec!r} (that would run code the manifest chose); pass --teacher SPEC (a trusted "
                        "copy of the teacher) to recompute")
    return spec


def _recompute(cache: Cache, res: VerifyResult, n: int, teacher, teacher_checkpoint, seed: int, device: str):
    import torch

    from .. import teachers
    t = cache.teacher
    members = t["members"]
    if teacher:
        specs = teachers.make_specs(teacher, teacher_checkpoint, random_weights=False, num_classes=cache.num_classes)
        expect = members if len(specs) == len(members) else None   # the trusted copy must hold the cache's weights
    else:
        specs = [_manifest_spec(teachers, m) for m in members]
        expect = members
    precision = t.get("precision", "fp32")
    ens = teachers.Ensemble(specs, teachers.resolve_device(device), t["temperature"], precision=precision,
                            expect=expect, outputs=t.get("outputs", "logits"))
    rng = np.random.default_rng(seed)
    shards = cache.manifest["shards"]
    agree, worst = 0, 0.0
    picks = []
    for _ in range(n):      # a random record: shard weighted by its samples, then a row and an epoch
        e = shards[int(rng.choice(len(shards), p=np.array([s["samples"] for s in shards]) / cache.num_samples))]
        row = int(rng.integers(0, e["samples"]))
        key = cache.keys(e["name"])[row]
        picks.append((key, int(rng.integers(0, cache.epochs))))
    for key, epoch in picks:
        rec = cache.record(key, epoch)
        p = ens(cache.view_tensor(key, epoch, "teacher")[None])[0].cpu()
        stored_idx = torch.tensor(rec["topk_idx"])
        agree += int(int(p.argmax()) == int(stored_idx[0]))
        worst = max(worst, float((p[stored_idx] - torch.tensor(rec["topk_prob"], dtype=torch.float32)).abs().max()))
    res.recomputed, res.top1_agreement, res.max_abs_diff = len(picks), agree / len(picks), worst
    res.precision = precision
    return res

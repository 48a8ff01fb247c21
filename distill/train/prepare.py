"""Before any training: resolve shards, cache, policy and classes, and refuse what cannot work.

Every refusal of train-student (a cache built over other shards, other classes, a policy this
version cannot replay, bad options) is raised here as ``UserError``, before a model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import recipes, storage
from ..cache.reader import Cache, open_cache
from ..cache.verify import check_files, check_view_fingerprints
from ..config import TrainConfig, check_batch_memory, check_run_size
from ..data import augment, views
from ..data.shards import iter_shard, resolve_shards
from ..files import UserError
from ..format import FILTER_SCORES_NAME, FINGERPRINTS_KEY, read_excluded_keys, read_ipc
from ..models import MODELS
from ..progress import note
from .order import ShardRef, shard_refs


@dataclass
class Data:
    refs: list[ShardRef]         # training shards, each with the samples it gives per epoch (the DDP split)
    val_refs: list[ShardRef]
    spec: views.ViewSpec         # how views are made (the cache's, or the --policy of a cache-less run)
    num_classes: int
    cache: Cache | None          # targets (a cache run) and/or views (also a --hard-labels run given --cache)
    samples: int                 # training samples per epoch (after --exclude)
    excluded: int                # samples per epoch left out by --exclude
    exclude: frozenset
    identity: dict               # what a resumed run must share with its checkpoint
    source: str
    temperature: float | None = None            # the cache's softmax temperature T (None: no cache)
    notes: list = field(default_factory=list)   # what the run's summary must say (e.g. replay drift allowed)

    @property
    def policy(self) -> augment.Policy:
        return self.spec.policy


def validate(cfg: TrainConfig) -> None:
    """What the config's declared ranges (``config.check``) cannot say alone; the run's size against the
    data is checked in ``prepare_data``."""
    if cfg.model not in MODELS:
        raise UserError(f"unknown model {cfg.model!r}; valid: {', '.join(sorted(MODELS))}")
    if cfg.image_size % 32:
        raise UserError(f"--image-size must be a multiple of 32 (TinyViT), got {cfg.image_size}")
    check_batch_memory(cfg.batch_size, cfg.image_size, "--image-size")
    if not cfg.hard_labels and not cfg.cache:
        raise UserError("train-student needs --cache CACHE_DIR (or --hard-labels to train from the shards' labels)")


def _check_shard_set(cache: Cache, paths: list[Path], index) -> None:
    """Refuse a cache built over other shards (names, sizes or checksums differ), saying what differs
    and whether any shard matches (a wrong --shards or --cache, or shards changed since).

    Each sample's bytes are then checked against the cache's digest as training reads it
    (``Cache.check_sample``): that is the proof, and this is the early check of a wrong --shards, which
    takes the shard index's sha256 or an unchanged mtime as they are. A cache made before digests were
    recorded has no other proof: each shard's whole file is hashed here."""
    names = [p.name for p in paths]
    have = cache.shard_names
    only_cache, only_train = sorted(set(have) - set(names)), sorted(set(names) - set(have))
    if only_cache or only_train:
        common = len(set(have) & set(names))
        parts = []
        if only_train:
            parts.append(f"{len(only_train)} of the {len(names)} training shard(s) are not in the cache "
                         f"({_first(only_train)})")
        if only_cache:
            parts.append(f"{len(only_cache)} of the cache's {len(have)} shard(s) are not in --shards ({_first(only_cache)})")
        hint = ("no shard name matches: wrong --shards or --cache?" if not common
                else f"{common} shard name(s) match")
        raise UserError(f"the cache {cache.path} was built over a different shard set: {'; '.join(parts)}; {hint}")
    idx = {e.name: e for e in index.shards} if index is not None else {}
    differ: list[str] = []
    for p in paths:
        entry = cache._entry(p.name)
        size = p.stat().st_size
        if size != entry["bytes"]:
            differ.append(f"{p.name} has {size:,} bytes, the cache's {entry['bytes']:,}")
            continue
        ie = idx.get(p.name)
        if not cache.has_digests(p.name):
            digest = storage.sha256(p)
        elif ie is not None and ie.sha256:
            digest = ie.sha256
        elif p.stat().st_mtime_ns == entry.get("mtime_ns"):
            continue
        else:
            digest = storage.sha256(p)
        if digest != entry["sha256"]:
            differ.append(f"{p.name} has the same size but another checksum")
    if differ:
        where = paths[0].parent
        if len(differ) == len(paths):
            raise UserError(f"none of the {len(paths)} shard(s) in {where} is the one the cache {cache.path} was "
                            f"built from, though the names match ({_first(differ, 2)}): wrong --shards or --cache, "
                            f"or the shards were rewritten since cache-teacher ran (then rebuild the cache)")
        raise UserError(f"{len(differ)} of the {len(paths)} shard(s) in {where} changed since cache-teacher built "
                        f"{cache.path} ({_first(differ, 2)}); the other {len(paths) - len(differ)} match: "
                        f"rebuild the cache for the changed shards (rerun cache-teacher)")


def _first(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return f"{shown} and {len(items) - n} more" if len(items) > n else shown


def _scan_classes(paths: list[Path]) -> tuple[int, list[int]]:
    """(num_classes = max label + 1, labelled samples per shard) of shards without an index (reads them once)."""
    top, counts = -1, []
    for p in paths:
        n = 0
        for item in iter_shard(p):
            if getattr(item, "label", None) is not None:
                top, n = max(top, item.label), n + 1
        counts.append(n)
    if top < 0:
        raise UserError(f"no labelled samples in {paths[0].parent}")
    return top + 1, counts


def _open_cache(cfg: TrainConfig, paths: list[Path], index, part=(0, 1), gather=None) -> tuple[Cache, list[str]]:
    """The cache, checked before any step: built for a student (not a filter's scoring cache), over
    these shards and classes, its files intact (size and checksum), its views replaying here as
    they did for the teacher (fingerprints). Returns (cache, notes for the summary)."""
    cache = open_cache(cfg.cache, shards_dir=paths[0].parent)
    if cache.is_scoring:
        raise UserError(f"{cache.path} is a filter-labels scoring cache (one centre view per sample), not a "
                        f"cache-teacher cache of augmented views; train from a cache made by distill cache-teacher")
    _check_shard_set(cache, paths, index)
    if index is not None and index.num_classes != cache.num_classes:
        raise UserError(f"the cache has {cache.num_classes} classes but the shards' index lists {index.num_classes}")
    if index is not None and list(index.classes) != list(cache.classes):
        note("warning: class names of the cache and the shard index differ (same count): same dataset?", part[0] != 0)
    if cache.topk < 1:
        raise UserError("the cache stores no classes (topk 0)")
    cache.view_spec                                  # refuses a policy version this code cannot replay
    # one line naming the file, before any step; under DDP each rank checks 1/world of the files
    check_files(cache, part, gather)
    drift = check_view_fingerprints(cache, {p.name: p for p in paths}, cfg.allow_replay_drift, part, gather)
    notes = [f"--allow-replay-drift: {drift}"] if drift else []
    if not any(e.get(FINGERPRINTS_KEY) for e in cache.manifest["shards"]):
        notes.append("the cache records no view fingerprints (made by an older distill): replayed views "
                     "could not be checked against the teacher's")
        note(f"warning: {notes[-1]}", cfg.quiet or part[0] != 0)
    return cache, notes


def _excluded_here(exclude: frozenset, cfg: TrainConfig, names: list[str]) -> dict[str, int]:
    """How many --exclude keys lie in each of these shards (the scores table knows each key's shard)."""
    if not exclude:
        return {}
    t = read_ipc(storage.join(cfg.exclude, FILTER_SCORES_NAME), ["shard", "keep"])
    keep = t.column("keep").to_numpy(zero_copy_only=False)
    shard = np.asarray(t.column("shard").to_numpy(zero_copy_only=False))
    dropped = shard[~keep]
    found, n = np.unique(dropped[np.isin(dropped, names)], return_counts=True)
    return {str(k): int(c) for k, c in zip(found, n)}


def _cache_counts(cache: Cache, exclude: frozenset, paths: list[Path]) -> tuple[list[int], int]:
    """(samples per epoch of each shard: its cache rows less the --exclude keys, keys excluded in all)."""
    excl = pa.array(sorted(exclude), pa.string())
    rows, dropped = {}, {}
    for e in cache.manifest["shards"]:
        hit = pc.sum(pc.is_in(cache.keys(e["name"]).arrow, value_set=excl)).as_py() if exclude else 0
        rows[e["name"]], dropped[e["name"]] = int(e["samples"]), int(hit or 0)
    return [rows[p.name] - dropped[p.name] for p in paths], sum(dropped.values())


def _shard_counts(exclude: frozenset, cfg: TrainConfig, paths: list[Path], index) -> tuple[int, list[int], int]:
    """(num_classes, samples per epoch of each shard less the --exclude keys, keys excluded in all) of
    a cache-less run: counts from the shard index, else from reading the shards."""
    if index is not None:
        given = {e.name: e.samples for e in index.shards}
        num_classes, counts = index.num_classes, [given[p.name] for p in paths]
    else:
        num_classes, counts = _scan_classes(paths)
    dropped = _excluded_here(exclude, cfg, [p.name for p in paths])
    return num_classes, [max(0, n - dropped.get(p.name, 0)) for p, n in zip(paths, counts)], sum(dropped.values())


def prepare_data(cfg: TrainConfig, policy_table: dict | None, world: int = 1, rank: int = 0, gather=None) -> Data:
    """Resolve shards, cache and views; every refusal happens here, before any training.

    With ``--cache`` the views (and, unless ``--hard-labels``, the targets) come from the cache, so a
    ``--hard-labels`` baseline given the cache sees the same views, samples and steps per epoch.
    ``gather`` (DDP): a list of this rank's problems -> every rank's, so all ranks stop together."""
    cfg, _ = recipes.resolve_train(cfg)              # (already resolved by train_student: unchanged)
    paths, index = resolve_shards(cfg.shards)
    exclude = frozenset(read_excluded_keys(cfg.exclude)) if cfg.exclude else frozenset()
    source = "hard labels" if cfg.hard_labels else "cache"
    cache, notes = _open_cache(cfg, paths, index, (rank, world), gather) if cfg.cache else (None, [])
    if cache is not None:
        spec, num_classes = cache.view_spec, int(cache.num_classes)
        counts, excluded = _cache_counts(cache, exclude, paths)
        identity = {"source": source, "cache_run_id": cache.manifest.get("run_id"), "shards": cache.shard_names,
                    "policy_id": spec.policy.id, "num_classes": num_classes, "topk": cache.topk, "world": world}
    else:
        spec = views.ViewSpec(augment.load_policy(cfg.policy, policy_table, {"size": cfg.image_size},
                                                  base=dict(recipes.get(cfg.recipe).policy, size=cfg.image_size)))
        num_classes, counts, excluded = _shard_counts(exclude, cfg, paths, index)
        identity = {"source": source, "shards": [p.name for p in paths], "policy_id": spec.policy.id,
                    "num_classes": num_classes, "world": world}
    samples = sum(counts)
    check_run_size(cfg.epochs, samples, cfg.allow_long_run)
    val_refs: list[ShardRef] = []
    if cfg.val_shards:
        vpaths, vindex = resolve_shards(cfg.val_shards)
        if vindex is not None and vindex.num_classes != num_classes:
            raise UserError(f"validation shards have {vindex.num_classes} classes, training uses {num_classes}")
        val_refs = shard_refs(vpaths)
    return Data(refs=shard_refs(paths, counts), val_refs=val_refs, spec=spec, num_classes=num_classes, cache=cache,
                samples=max(0, samples), excluded=excluded, exclude=exclude, identity=identity, source=source,
                temperature=float(cache.manifest.get("temperature", 1.0)) if cache is not None else None, notes=notes)


def dataset_inputs(shards, cache, exclude, policy, image_size: int, num_classes: int | None,
                   spec: views.ViewSpec | None, part=(0, 1)) -> tuple[list[ShardRef], Cache | None, views.ViewSpec,
                                                                    int, frozenset]:
    """What ``DistillDataset`` reads, from what a user gives it: (shard refs, cache, view spec, classes,
    excluded keys). ``shards``: refs (train-student's, counted and checked by ``prepare_data``) or a
    ``--shards`` spec; ``cache``: a directory or a ``Cache``; ``exclude``: keys or a filter-labels
    directory; ``policy``: a policy file or table for a cache-less dataset. A cache given with a
    ``--shards`` spec gets train-student's checks (``_open_cache``: shard set, classes, files, view
    fingerprints; ``part`` = (rank, world): each rank checks its share of the files)."""
    if isinstance(exclude, (str, Path)):
        exclude = read_excluded_keys(exclude)
    exclude = frozenset(exclude or ())
    index = None
    if isinstance(shards, (list, tuple)) and shards and all(isinstance(r, ShardRef) for r in shards):
        refs = list(shards)
    else:
        paths, index = resolve_shards(shards)
        if not paths:
            raise UserError(f"no shards in {shards}")
        if cache is not None:
            where = str(cache.path) if isinstance(cache, Cache) else str(cache)
            cfg = TrainConfig(shards=str(shards), out="-", cache=where, quiet=True)
            cache, _ = _open_cache(cfg, paths, index, part)
        refs = shard_refs(paths)
    if isinstance(cache, (str, Path)):
        cache = open_cache(cache)
    if spec is None:
        if cache is not None:
            spec = cache.view_spec
        else:
            table = policy if isinstance(policy, dict) else None
            spec = views.ViewSpec(augment.load_policy(policy if isinstance(policy, (str, Path)) else None, table,
                                                      {"size": image_size}))
    if num_classes is None:
        if cache is not None:
            num_classes = int(cache.num_classes)
        elif index is not None:
            num_classes = int(index.num_classes)
        else:
            raise UserError("num_classes is needed for shards without an index.json and without a cache")
    return refs, cache, spec, int(num_classes), exclude

"""Read a finished cache: ``open_cache(dir)`` -> ``Cache``. Lazy: opening reads only the manifest;
tables are read per shard and per column on demand. No teacher code, no Ray.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa

from .format import (CACHE_FORMAT, CACHE_VERSION, MANIFEST_NAME, FormatError, UserError, decode_cache_shard,
                     read_ipc, read_json, sha256_file)


class Cache:
    def __init__(self, path: str | os.PathLike, shards_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"cache directory not found: {self.path}")
        m = read_json(self.path / MANIFEST_NAME, "cache manifest (is the cache complete?)")
        if m.get("format") != CACHE_FORMAT:
            raise FormatError(f"{self.path} is not a distill cache (format={m.get('format')!r})")
        if m.get("version") != CACHE_VERSION:
            raise FormatError(f"cache format version {m.get('version')} is not supported (expected {CACHE_VERSION})")
        self.manifest = m
        self._shards_dir = Path(shards_dir) if shards_dir else Path(m.get("source", {}).get("dir", "."))

    # ------------------------------------------------------------------ facts
    classes = property(lambda self: self.manifest["classes"])
    num_classes = property(lambda self: self.manifest["num_classes"])
    epochs = property(lambda self: self.manifest["epochs"])
    topk = property(lambda self: self.manifest["topk"])
    shard_names = property(lambda self: [s["name"] for s in self.manifest["shards"]])
    num_samples = property(lambda self: self.manifest["totals"]["samples"])
    num_records = property(lambda self: self.manifest["totals"]["records"])
    teacher = property(lambda self: self.manifest["teacher"])

    @cached_property
    def policy(self):
        from . import augment
        pol = self.manifest["policy"]
        if pol["version"] != augment.POLICY_VERSION:
            raise UserError(f"cache was built with augmentation policy version {pol['version']}, "
                            f"this distill replays version {augment.POLICY_VERSION}")
        p = augment.Policy.from_dict({k: v for k, v in pol["canonical"].items() if k != "version"})
        if p.id != pol["id"]:
            raise UserError(f"policy id mismatch: manifest {pol['id']}, recomputed {p.id}")
        return p

    def __repr__(self) -> str:
        return (f"Cache({str(self.path)!r}: {self.num_samples} samples x {self.epochs} epochs = {self.num_records} records, "
                f"top-{self.topk} of {self.num_classes} classes, {len(self.shard_names)} shards)")

    # ------------------------------------------------------------------ tables
    def _entry(self, shard: str) -> dict:
        for s in self.manifest["shards"]:
            if s["name"] == shard:
                return s
        raise UserError(f"no shard {shard!r} in this cache (have {self.shard_names[:5]}...)")

    def physical(self, shard: str, columns=None) -> pa.Table:
        return read_ipc(self.path / self._entry(shard)["file"], columns=columns)

    def shard_table(self, shard: str, epochs=None, columns=None) -> pa.Table:
        need = None
        if columns is not None:
            phys = {"key": ["key"], "label": ["label"], "seed": ["seed"], "topk_idx": ["classes", "local"],
                    "topk_prob": ["prob_planes"], "label_prob": ["label_prob_planes"], "shard": [], "epoch": []}
            need = sorted({c for col in columns for c in phys.get(col, [])}) or ["label"]
        return decode_cache_shard(self.physical(shard, need), epochs=epochs, columns=columns)

    def to_table(self, epochs=None, shards=None, columns=None) -> pa.Table:
        """The logical view (key, shard, epoch, seed, topk_idx, topk_prob, label, label_prob)."""
        names = self.shard_names if shards is None else [shards] if isinstance(shards, str) else list(shards)
        tables = [self.shard_table(n, epochs, columns) for n in names]
        return pa.concat_tables(tables) if tables else decode_cache_shard(pa.table({}), epochs, columns)

    def to_pandas(self, epochs=None, shards=None, columns=None):
        return self.to_table(epochs, shards, columns).to_pandas()

    # ------------------------------------------------------------------ single records
    @cached_property
    def _where(self) -> dict[str, tuple[str, int]]:
        where = {}
        for name in self.shard_names:
            for i, k in enumerate(self.physical(name, ["key"]).column("key").to_pylist()):
                where[k] = (name, i)
        return where

    def locate(self, key: str) -> tuple[str, int]:
        try:
            return self._where[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in this cache") from None

    def _check_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"epoch {epoch} out of range 0..{self.epochs - 1}")

    def record(self, key: str, epoch: int) -> dict:
        self._check_epoch(epoch)
        shard, row = self.locate(key)
        t = decode_cache_shard(self.physical(shard).slice(row, 1), epochs=[epoch])
        return {c: t.column(c)[0].as_py() for c in t.column_names}

    def soft_target(self, key: str, epoch: int, fill: str = "uniform") -> np.ndarray:
        r = self.record(key, epoch)
        return dense_target(np.array(r["topk_idx"]), np.array(r["topk_prob"], dtype=np.float32), self.num_classes, fill)

    # ------------------------------------------------------------------ replay
    def shard_path(self, shard: str) -> Path:
        p = self._shards_dir / shard
        if not p.exists():
            raise UserError(f"source shard {p} not found; pass shards_dir= to open_cache")
        return p

    def _block(self, key: str):
        """Positions of the mixing block that holds key: (shard, keys of the block, index in block)."""
        shard, row = self.locate(key)
        mb = self.policy.mix_block
        start = row // mb * mb
        keys = self.physical(shard, ["key"]).column("key").to_pylist()[start:start + mb]
        return shard, keys, row - start

    def _sources(self, shard: str, keys: list[str]) -> dict:
        from . import augment, shards as shardio
        from .format import Skip
        want, found = set(keys), {}
        for item in shardio.iter_shard(self.shard_path(shard)):
            if not isinstance(item, Skip) and item.key in want:
                found[item.key] = augment.SourceImage(item.data)
                if len(found) == len(want):
                    break
        return found

    def augmentation(self, key: str, epoch: int) -> dict:
        """The decoded augmentation parameters of (key, epoch), with the mix partner and lambda when mixed."""
        from . import augment, replay
        self._check_epoch(epoch)
        shard, keys, pos = self._block(key)
        seeds = self._seeds(shard, keys, epoch)
        src = self._sources(shard, [key])[key]
        params = dict(augment.decode(self.policy, seeds[pos], src.width, src.height))
        plan = replay.block_plan(self.policy, seeds)[pos]
        if plan is not None:
            params["mix"] = dict(plan, partner_key=keys[plan["partner"]])
        return params

    def _seeds(self, shard: str, keys: list[str], epoch: int) -> list[int]:
        _, row = self.locate(keys[0])
        seed = self.physical(shard, ["seed"]).slice(row, len(keys)).column("seed").combine_chunks()
        return seed.values.to_numpy().reshape(len(keys), self.epochs)[:, epoch].tolist()

    def view_tensor(self, key: str, epoch: int, side: str = "teacher", size: int | None = None, mean=None, std=None):
        """The normalised tensor of (key, epoch) as that side saw it (teacher: the manifest's preprocessing)."""
        from . import augment, replay
        self._check_epoch(epoch)
        shard, keys, pos = self._block(key)
        if side == "teacher":
            t = self.teacher
            size, mean, std = size or t["input_size"], mean or t["mean"], std or t["std"]
        else:
            size, mean, std = size or self.policy.size, mean or augment.IMAGENET_MEAN, std or augment.IMAGENET_STD
        seeds = self._seeds(shard, keys, epoch)
        plan = replay.block_plan(self.policy, seeds)[pos]
        need = [keys[pos]] + ([keys[plan["partner"]]] if plan else [])
        srcs = self._sources(shard, need)
        views = {}
        for k in need:
            i = keys.index(k)
            views[k] = augment.view(srcs[k], augment.decode(self.policy, seeds[i], srcs[k].width, srcs[k].height),
                                    size, mean, std)
        v = views[keys[pos]]
        return v if plan is None else augment.mix(v, views[need[1]], plan)


def dense_target(idx: np.ndarray, prob: np.ndarray, num_classes: int, fill: str = "uniform") -> np.ndarray:
    """Top-K (ids, probs) -> a dense distribution. ``uniform``: the mass outside the top-K is spread
    evenly over the other classes (TinyViT); ``renorm``: the top-K probabilities are rescaled to sum 1."""
    out = np.zeros(num_classes, dtype=np.float32)
    p = prob.astype(np.float32)
    if fill == "renorm":
        out[idx] = p / p.sum()
    elif fill == "uniform":
        rest = num_classes - len(idx)
        if rest > 0:
            out[:] = max(0.0, 1.0 - float(p.sum())) / rest
        out[idx] = p
    else:
        raise UserError(f"fill must be 'uniform' or 'renorm', got {fill!r}")
    return out


def open_cache(path: str | os.PathLike, shards_dir: str | os.PathLike | None = None) -> Cache:
    return Cache(path, shards_dir)


def verify_files(cache: Cache) -> list[str]:
    """Problems found checking every file against the manifest (empty list: all good)."""
    problems = []
    for e in cache.manifest["shards"]:
        f = cache.path / e["file"]
        if not f.exists():
            problems.append(f"{e['file']}: missing")
            continue
        if f.stat().st_size != e["file_bytes"]:
            problems.append(f"{e['file']}: size {f.stat().st_size} != manifest {e['file_bytes']}")
            continue
        if sha256_file(f) != e["file_sha256"]:
            problems.append(f"{e['file']}: checksum differs from the manifest")
            continue
        try:
            n = read_ipc(f, ["key"]).num_rows
        except FormatError as err:
            problems.append(str(err))
            continue
        if n != e["samples"]:
            problems.append(f"{e['file']}: {n} samples, manifest says {e['samples']}")
    return problems

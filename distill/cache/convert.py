"""``convert_cache(old, new)``: rewrite a cache of an older format version in the current one.

Version 1 (distill up to 0.1 at commit bd14fc3) stored one row per sample with all E epochs in the
row, so reading one epoch read them all. Version 2 (FORMAT.md 2.2) stores one record batch per
epoch. The records are the same: every (sample, epoch)'s seed, top-K ids and probabilities and label
probability are carried over bit for bit, and the run identity changes only in its format version.
The version-1 decoder lives here, frozen: nothing else reads version 1.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..files import FormatError, UserError, atomic_write_bytes, atomic_write_json, check_out, claim_dir, digest, inside, read_json, sha256_file
from ..format import (ARROW_ENTRY_KEY, ARROW_RUN_ID_KEY, CACHE_DIR, CACHE_FORMAT, CACHE_VERSION, MANIFEST_NAME, RUN_NAME,
                      cache_file_name, cache_file_path, check_cache_names, encode_cache_shard, ipc_bytes, read_ipc)
from ..progress import bar

# manifest keys that are not part of the run identity (run.json)
_NOT_IDENTITY = ("run_id", "source", "shards", "totals", "teacher_agreement", "replay_env")


def _v1_arrays(table: pa.Table) -> tuple[dict, dict]:
    """A version-1 shard table -> (its metadata, arrays keys/labels/seeds (N, E)/ids (N, E, K)/prob/label_prob)."""
    md = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    e_, k = int(md["epochs"]), int(md["topk"])
    n, dt = table.num_rows, np.dtype(md["prob_dtype"])

    def fixed(name: str, width: int) -> np.ndarray:
        col = table.column(name).combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).reshape(n, width)

    def unplane(name: str, m: int) -> np.ndarray:
        b = np.ascontiguousarray(fixed(name, dt.itemsize * m).reshape(n, dt.itemsize, m).transpose(0, 2, 1))
        return b.view(dt.newbyteorder("<")).reshape(n, m).astype(dt)

    cls = table.column("classes").combine_chunks()
    flat, offs = cls.values.to_numpy(zero_copy_only=False), cls.offsets.to_numpy()[:-1]
    local = fixed("local", e_ * k).reshape(n, e_, k).astype(np.int64)
    return md, {"keys": table.column("key").to_pylist(), "labels": table.column("label").to_numpy(),
                "seeds": fixed("seed", e_).astype(np.uint32),
                "ids": flat[offs[:, None, None] + local] if n else np.zeros((0, e_, k), np.int64),
                "prob": unplane("prob_planes", e_ * k).reshape(n, e_, k),
                "label_prob": unplane("label_prob_planes", e_).reshape(n, e_)}


def _identity(old: Path, manifest: dict) -> dict:
    run_file = old / RUN_NAME
    identity = read_json(run_file, "cache run file") if run_file.exists() else {
        k: v for k, v in manifest.items() if k not in _NOT_IDENTITY}
    identity = dict(identity, version=CACHE_VERSION)
    if isinstance(identity.get("exclude"), dict):
        identity["exclude"] = {k: v for k, v in identity["exclude"].items() if k != "filter_dir"}
    return identity


def _files(old: Path, new: Path, manifest: dict) -> list[tuple[dict, Path, Path]]:
    """(entry, its file in OLD, its file in NEW) per shard, every name checked before anything is
    written: OLD's names are plain file names inside OLD (FormatError otherwise), NEW's are made from
    the shard names (``<stem>.arrow``) and distinct."""
    source = old / MANIFEST_NAME
    check_cache_names(manifest, source)
    if not manifest.get("shards"):
        raise UserError(f"{source} lists no shards: nothing to convert")
    files = []
    for e in manifest["shards"]:
        dst = inside(new, cache_file_name(e["name"]), f"{new}: the converted file of shard {e['name']!r} is", CACHE_DIR)
        files.append((e, cache_file_path(old, e, source), dst))
    names = [dst.name for _, _, dst in files]
    if len(set(names)) != len(names):
        raise UserError(f"{source} lists shards whose converted files would share a name: not converted")
    return files


def convert_cache(old: str | Path, new: str | Path, quiet: bool = False) -> Path:
    """Write NEW, a copy of the cache OLD in the current format; OLD is not changed. Every file is
    written inside NEW, under a name checked before the first write (``_files``)."""
    old, new = Path(old), Path(new)
    manifest = read_json(old / MANIFEST_NAME, "cache manifest (is OLD a complete cache?)")
    if manifest.get("format") != CACHE_FORMAT:
        raise UserError(f"{old} is not a distill cache (format={manifest.get('format')!r})")
    if manifest.get("version") == CACHE_VERSION:
        raise UserError(f"{old} is already a cache of format version {CACHE_VERSION}: nothing to convert")
    if manifest.get("version") != 1:
        raise UserError(f"{old} has cache format version {manifest.get('version')}; this distill converts version 1")
    identity = _identity(old, manifest)
    # NEW: new, empty, or this same conversion's earlier (maybe interrupted) output, which is redone
    mine = ((RUN_NAME, identity),)
    check_out(new, "convert-cache", mine, inputs=(old,), flag="NEW")
    files = _files(old, new, manifest)
    for e, src, _ in files:              # every old file proven before anything is written
        if not src.is_file() or "file_sha256" in e and sha256_file(src) != e["file_sha256"]:
            raise FormatError(f"{src} is missing or its checksum differs from {old / MANIFEST_NAME}: OLD is "
                              f"damaged; nothing converted")
    run_id = digest(json.dumps(identity, sort_keys=True))
    with claim_dir(new, "convert-cache", mine, inputs=(old,), flag="NEW"):
        atomic_write_json(new / RUN_NAME, identity)
        entries = []
        pbar = bar(len(files), "convert-cache", "shard", quiet)
        for e, src, dst in files:
            entries.append(_convert_file(src, dst, dict(e, file=dst.name), run_id, manifest))
            if pbar:
                pbar.update(1)
        if pbar:
            pbar.close()
        atomic_write_json(new / MANIFEST_NAME, dict(manifest, version=CACHE_VERSION, run_id=run_id, shards=entries))
    return new


def _convert_file(src: Path, dst: Path, entry: dict, run_id: str, manifest: dict) -> dict:
    table = read_ipc(src)
    md, a = _v1_arrays(table)
    if md.get("version") != "1":
        raise UserError(f"{src} is not a version-1 cache file (version {md.get('version')})")
    have = (len(a["keys"]), int(md["epochs"]), int(md["topk"]))
    want = (entry.get("samples"), manifest.get("epochs"), manifest.get("topk"))
    if have != want:
        raise FormatError(f"{src} holds (samples, epochs, topk) = {have}, OLD's manifest says {want}: not converted")
    t = encode_cache_shard(a["keys"], a["labels"], a["seeds"], a["ids"], a["prob"], a["label_prob"],
                           num_classes=int(md["num_classes"]), prob_dtype=md["prob_dtype"], shard=md.get("shard", ""))
    meta = dict(t.schema.metadata)
    meta[ARROW_ENTRY_KEY] = table.schema.metadata.get(ARROW_ENTRY_KEY, json.dumps(entry).encode())
    meta[ARROW_RUN_ID_KEY] = run_id.encode()
    data = ipc_bytes(t.replace_schema_metadata(meta))
    atomic_write_bytes(dst, data)
    return dict(entry, file_bytes=len(data), file_sha256=hashlib.sha256(data).hexdigest())

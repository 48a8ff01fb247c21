"""``distill pull`` / ``distill push``: copy a cache between an object store (or any location
``storage`` reads) and a directory: whole, or only its first epochs and some of its shards; every byte
checked, resumable, the manifest written last.

A pull of the first E' of E epochs fetches, per shard file, its Arrow footer and the one contiguous
byte range that holds epochs 0..E'-1 (a cache file is epoch-major: FORMAT.md 2.2), checks every record
batch's CRC-32 and the footer against the manifest, and writes a file of E' epochs with its own
checksums; the pulled manifest says E' epochs, so the result is a cache train-student accepts (its
epochs wrap at E' as always). Seeds stay as recorded: a pulled epoch replays exactly the views the
teacher saw.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from .. import storage
from ..files import (FormatError, UserError, atomic_write_bytes, atomic_write_json, claim_dir, inside, read_json,
                     sha256_file)
from ..format import (ARROW_ENTRY_KEY, ARROW_RUN_ID_KEY, MANIFEST_NAME, RUN_NAME, CacheFile, RemoteArrowFile,
                      check_cache_names, check_manifest, ipc_bytes, manifest_identity, run_id_of)
from ..progress import bar
from .reader import _footer_problem

PULL_MARK = ".distill.pull.json"      # written first: what this directory is a pull of (resume, refusal)
DONE_DIR = ".distill.pull"            # one JSON per file pulled and checked: its new manifest entry
PUSH_DONE = ".distill.push"           # in the store: one object per file pushed, its sha256


@dataclass
class TransferResult:
    source: str
    dest: str
    files: int = 0
    reused: int = 0
    epochs: int = 0
    bytes_written: int = 0
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        s = self.stats
        return (f"{self.source} -> {self.dest}: {self.files} files ({self.reused} already there, checked), "
                f"{self.epochs} epochs, {self.bytes_written:,} bytes written; {s.get('gets', 0)} GET requests, "
                f"{s.get('bytes_in', 0):,} bytes fetched, {s.get('puts', 0)} PUT requests")


def parse_epochs(text: str | None, epochs: int) -> int:
    """``--epochs``: "0-B" (or "B+1" epochs as a count is not accepted: say the range) -> E' = B + 1."""
    if text is None:
        return epochs
    a, sep, b = str(text).partition("-")
    try:
        first, last = int(a), int(b if sep else a)
    except ValueError:
        raise UserError(f"--epochs {text}: expected a range A-B of epoch numbers, e.g. 0-29") from None
    if first != 0:
        raise UserError(f"--epochs {text}: a pull takes the cache's first epochs (0-B): a record's seed is "
                        "derived from its epoch number, so epochs cannot be renumbered")
    if not 0 <= last < epochs:
        raise UserError(f"--epochs {text}: the cache has epochs 0-{epochs - 1}")
    return last + 1


def _subset(src: str, entry: dict, manifest: dict, epochs: int, run_id: str) -> tuple[bytes, dict]:
    """The shard file ``src`` cut to its first ``epochs``: (the new file's bytes, its manifest entry).
    Fetches the footer and epochs 0..epochs-1's byte range only; every batch and the footer checked."""
    try:
        f = RemoteArrowFile(src) if storage.is_remote(src) else None
        if f is not None and f.size != entry["file_bytes"]:
            raise FormatError(f"{f.size} bytes, the manifest says {entry['file_bytes']}")
        cf = CacheFile(src, source=f)
        problem = _footer_problem(cf, entry, manifest)
        if problem:
            raise FormatError(problem)
        keep = epochs * cf.per_epoch
        if f is not None:
            if len(f.blocks) != cf.num_batches:
                raise FormatError(f"its footer lists {len(f.blocks)} record batches, its reader {cf.num_batches}")
            f.prefetch_batches(0, keep - 1)
        fields = tuple(range(len(cf.schema)))
        batches = [cf._batch(fields, i) for i in range(keep)]
    except FormatError as e:
        raise FormatError(f"{src}: {e}; the object is damaged: nothing pulled from it") from None
    md = dict(cf.schema.metadata)
    footer_entry = json.loads(md.get(ARROW_ENTRY_KEY, b"{}"))
    records = entry["samples"] * epochs
    md.update({b"epochs": str(epochs).encode(), ARROW_RUN_ID_KEY: run_id.encode(),
               ARROW_ENTRY_KEY: json.dumps(dict(footer_entry, records=records)).encode()})
    schema = cf.schema.with_metadata(md)
    table = pa.Table.from_batches([b.replace_schema_metadata(md) for b in batches], schema=schema)
    data = ipc_bytes(table)
    new = dict(entry, records=records, file_bytes=len(data), file_sha256=hashlib.sha256(data).hexdigest())
    if isinstance(entry.get("view_fingerprints"), list):
        new["view_fingerprints"] = [v for v in entry["view_fingerprints"] if v.get("epoch", 0) < epochs]
    return data, new


def _whole(src: str, entry: dict) -> bytes:
    data = storage.read_bytes(src)
    if len(data) != entry["file_bytes"] or hashlib.sha256(data).hexdigest() != entry["file_sha256"]:
        raise FormatError(f"{src}: its bytes differ from the manifest's size and sha256: the object is damaged; "
                          "nothing pulled from it")
    return data


def pull(url: str, out: str | Path, *, epochs: str | None = None, shards: str | None = None,
         quiet: bool = False) -> TransferResult:
    """Copy the cache at ``url`` into the directory ``out``: all of it, or its epochs 0..B (``epochs``
    "0-B") and the shards whose names match ``shards`` (a glob). A rerun with the same arguments goes
    on where an interrupted one stopped, reusing only files whose bytes match what it recorded."""
    before = storage.STATS.snapshot()
    src_manifest = storage.join(url, MANIFEST_NAME)
    try:
        manifest = json.loads(storage.read_bytes(src_manifest))
    except UserError as e:
        hint = f" (is {url} a complete cache? its manifest is written last)" if str(e).startswith("not found") else ""
        raise UserError(f"{e}{hint}") from None
    except ValueError as e:
        raise FormatError(f"{src_manifest} is not valid JSON ({e})") from None
    check_manifest(manifest, src_manifest)
    check_cache_names(manifest, src_manifest)
    keep = parse_epochs(epochs, manifest["epochs"])
    entries = [e for e in manifest["shards"] if shards is None or fnmatch.fnmatchcase(e["name"], shards)]
    if not entries:
        raise UserError(f"--shards {shards}: no shard of {url} matches (it has {', '.join(manifest['shard_set'][:3])}, ...)")
    whole = keep == manifest["epochs"]
    new = dict(manifest, epochs=keep, shard_set=[e["name"] for e in entries])
    run_id = manifest["run_id"] if whole and len(entries) == len(manifest["shards"]) else \
        run_id_of(manifest_identity(new))
    mark = {"source": url, "run_id": run_id, "epochs": keep, "shards": shards}
    out = Path(out).expanduser()
    res = TransferResult(url, str(out), epochs=keep)
    with claim_dir(out, "pull", ((PULL_MARK, {"run_id": run_id}),), flag="DIR") as d:
        atomic_write_json(d / PULL_MARK, mark)
        (d / DONE_DIR).mkdir(exist_ok=True)
        done = []
        for e in _counted(entries, f"pull {url}", quiet):
            dst = inside(d, e["file"], f"{src_manifest}: the file of shard {e['name']!r} is", str(d))
            marker = d / DONE_DIR / f"{dst.name}.json"
            prior = read_json(marker, "pull record") if marker.exists() else None
            if prior and dst.is_file() and sha256_file(dst) == prior["file_sha256"]:
                done.append(prior)
                res.reused += 1
            else:
                src = storage.join(url, e["file"])
                data, entry = (_whole(src, e), e) if whole else _subset(src, e, manifest, keep, run_id)
                atomic_write_bytes(dst, data)
                atomic_write_json(marker, entry)
                done.append(entry)
                res.bytes_written += len(data)
            res.files += 1
        totals = dict(manifest["totals"], samples=sum(e["samples"] for e in done),
                      records=sum(e["records"] for e in done), skipped=sum(len(e["skipped"]) for e in done),
                      excluded=sum(e["excluded"] for e in done))
        final = dict(new, run_id=run_id, shards=done, totals=totals)
        atomic_write_json(d / RUN_NAME, manifest_identity(final))
        atomic_write_json(d / MANIFEST_NAME, final)            # last: the commit point
    res.stats = _since(before)
    return res


def push(directory: str | Path, url: str, *, quiet: bool = False) -> TransferResult:
    """Upload the cache in ``directory`` to ``url``: each file checked against the manifest, uploaded
    whole, recorded (``.distill.push/NAME.json``: its sha256 and the store's ETag); the manifest last, so a reader never takes
    the upload for complete before it is. A rerun skips what its records prove is there."""
    from .reader import open_cache
    before = storage.STATS.snapshot()
    cache = open_cache(directory)
    if storage.scheme(url) in storage.READ_ONLY:
        raise UserError(f"{url}: {storage.scheme(url)}:// is read-only")
    res = TransferResult(str(directory), url, epochs=cache.epochs)
    for e in _counted(cache.manifest["shards"], f"push {url}", quiet):
        path = cache.file(e["name"])               # checked against the manifest (size, sha256, footer)
        record, dst = storage.join(url, PUSH_DONE, f"{e['file']}.json"), storage.join(url, e["file"])
        prior = storage.read_json(record, "push record") if storage.exists(record) else {}
        if prior.get("file_sha256") == e["file_sha256"] and prior.get("etag") and storage.etag(dst) == prior["etag"]:
            res.reused += 1
        else:
            data = path.read_bytes()
            storage.write_bytes(dst, data)
            storage.write_bytes(record, json.dumps({"file_sha256": e["file_sha256"],
                                                    "etag": storage.etag(dst)}).encode())
            res.bytes_written += len(data)
        res.files += 1
    for name in (RUN_NAME, MANIFEST_NAME):                   # the manifest last: the commit point
        p = Path(directory) / name
        if p.is_file():
            storage.write_bytes(storage.join(url, name), p.read_bytes())
    res.stats = _since(before)
    return res


def _counted(items: list, label: str, quiet: bool):
    """``items``, one by one, with a progress bar of them."""
    pbar = bar(len(items), label, "file", quiet)
    try:
        for x in items:
            yield x
            if pbar:
                pbar.update(1)
    finally:
        if pbar:
            pbar.close()


def _since(before: dict) -> dict:
    now = storage.STATS.snapshot()
    return {k: now[k] - before[k] for k in now}

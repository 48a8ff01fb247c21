"""The one definition of distill's on-disk data. FORMAT.md beside this file is the spec in prose.

Nothing here imports torch or Ray: a reader of the files needs only pyarrow, numpy and json.

Three kinds of directory:

* shard directory: webdataset tars ``<prefix>-%06d.tar`` plus ``index.json`` (``ShardIndex``).
* cache directory: one Arrow IPC file per input shard plus ``manifest.json`` (written last).
* filter directory: ``scores.arrow`` plus ``summary.json`` and a report.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from .files import FormatError, UserError, atomic_write_json, inside, plain_name, read_json

SHARD_INDEX_NAME = "index.json"
# Where a name from a manifest or index must stay (``files.plain_name``), as refusals say it.
SHARD_DIR, CACHE_DIR = "the shard directory", "the cache directory"
SHARD_INDEX_FORMAT = "distill-shards"
SHARD_INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "png", "webp")
LABEL_EXT = "cls"

# A key names one sample inside a dataset. webdataset splits a tar member name at its first dot
# into key and extension, so keys may not contain dots; we also keep them shell- and URL-safe.
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-]+)*$")
MAX_KEY_LEN = 200


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key) or len(key) > MAX_KEY_LEN:
        raise FormatError(f"invalid sample key {key!r}: use letters, digits, '_', '-', '/' (no dots), at most {MAX_KEY_LEN} chars")
    return key


def sanitize_key(text: str) -> str:
    """Turn a file stem into a valid key: every run of other characters becomes '_'."""
    key = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")
    return key or "_"


# ---------------------------------------------------------------------------------------------
# shard index

@dataclass
class Skip:
    """A sample left out, with the reason. ``shard`` is the tar it came from (or the source file)."""
    key: str
    reason: str
    shard: str = ""


@dataclass
class ShardEntry:
    name: str          # file name relative to the index, e.g. "train-000000.tar"
    samples: int
    bytes: int
    sha256: str


@dataclass
class ShardIndex:
    classes: list[str]
    shards: list[ShardEntry]
    skipped: list[Skip] = field(default_factory=list)
    # how make-shards ordered the samples: {"shuffled": bool, "seed": int}; None (not written) for
    # shards whose writer did not say
    order: dict | None = None
    format: str = SHARD_INDEX_FORMAT
    version: int = SHARD_INDEX_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["order"] is None:
            del d["order"]
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | os.PathLike = SHARD_INDEX_NAME) -> "ShardIndex":
        """The index a dict of ``index.json`` describes (``source``: where it was read, for messages).
        Every shard name must be a plain file name (FORMAT.md 1)."""
        if d.get("format") != SHARD_INDEX_FORMAT:
            raise FormatError(f"not a distill shard index (format={d.get('format')!r})")
        if d.get("version") != SHARD_INDEX_VERSION:
            raise FormatError(f"shard index version {d.get('version')} is not supported (expected {SHARD_INDEX_VERSION})")
        for s in d["shards"]:
            plain_name(s.get("name"), f"{source} names shard", SHARD_DIR)
        return cls(classes=list(d["classes"]),
                   shards=[ShardEntry(**s) for s in d["shards"]],
                   skipped=[Skip(**s) for s in d.get("skipped", [])], order=d.get("order"))

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / SHARD_INDEX_NAME
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "ShardIndex":
        path = Path(directory) / SHARD_INDEX_NAME
        return cls.from_dict(read_json(path, "shard index"), path)

    def paths(self, directory: str | os.PathLike) -> list[Path]:
        """The shards' paths in ``directory`` (the index's own), each inside it (``files.inside``)."""
        return [inside(directory, s.name, f"{Path(directory) / SHARD_INDEX_NAME} names shard", SHARD_DIR)
                for s in self.shards]


def skips_to_dicts(skips: Iterable[Skip]) -> list[dict]:
    return [asdict(s) for s in skips]


# How many skipped samples a summary (cache-teacher, filter-labels, inspect) names before pointing
# at the full list.
SKIPS_SHOWN = 10
SKIPS_TSV_HEADER = "shard\tkey\treason"


def _skip_dict(s: Skip | dict) -> dict:
    return asdict(s) if isinstance(s, Skip) else s


def skip_lines(skips: Iterable[Skip | dict], full: str, indent: str = "  ") -> list[str]:
    """Summary lines for skipped samples (``Skip`` or ``{"key", "reason", "shard"}``): a count naming
    where the full list is (``full``), then the first ``SKIPS_SHOWN`` as ``key (shard): reason``.
    No lines when nothing was skipped."""
    skips = [_skip_dict(s) for s in skips]
    if not skips:
        return []
    more = len(skips) - SKIPS_SHOWN
    lines = [f"{indent}skipped {len(skips)} sample(s){f', first {SKIPS_SHOWN} shown' if more > 0 else ''} "
             f"(full list: {full}):"]
    for s in skips[:SKIPS_SHOWN]:
        where = f" ({s['shard']})" if s.get("shard") else ""
        lines.append(f"{indent}  {s['key']}{where}: {' '.join(str(s['reason']).split())}")
    if more > 0:
        lines.append(f"{indent}  ... and {more} more")
    return lines


def skips_tsv(skips: Iterable[Skip | dict]) -> str:
    """Every skipped sample as TSV: the header ``shard, key, reason`` then one line each (tabs and line
    breaks inside a field become spaces)."""
    cell = lambda x: " ".join(str(x or "").replace("\t", " ").splitlines())
    rows = [SKIPS_TSV_HEADER]
    for s in map(_skip_dict, skips):
        rows.append("\t".join(cell(s.get(k)) for k in ("shard", "key", "reason")))
    return "\n".join(rows)


# Shard members: ``KEY.<ext>`` holds the image bytes (ext in IMAGE_EXTS), ``KEY.cls`` the label. A
# reader maps IMAGE_EXT_ALIASES onto IMAGE_EXTS; writers store only IMAGE_EXTS.
IMAGE_EXT_ALIASES = {"jpeg": "jpg"}
SHARD_PREFIX_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# Skip.key of the one record a reader emits when a whole shard is damaged (truncated or corrupt tar).
SHARD_SKIP_KEY = "*"
# Skip.reason (prefix) of a key met again inside one shard: cache-teacher fails the run on it, naming key and shard
DUPLICATE_KEY_REASON = "duplicate key in shard"
_LABEL_RE = re.compile(rb"^\s*-?[0-9]+\s*$")


def shard_name(prefix: str, number: int) -> str:
    """File name of shard ``number`` (from 0) of a shard directory: ``<prefix>-%06d.tar``."""
    return f"{prefix}-{number:06d}.tar"


def encode_label(label: int) -> bytes:
    """A ``KEY.cls`` member: the integer label as decimal ASCII text, no newline."""
    return str(label.__index__()).encode("ascii")


def decode_label(data: bytes) -> int:
    """Parse a ``KEY.cls`` member (surrounding whitespace allowed); ValueError if it is not an integer."""
    if not _LABEL_RE.match(data):
        raise ValueError(f"label {data[:40]!r} is not an integer")
    return int(data)


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# teacher cache: manifest.json + one Arrow IPC file per input shard (see FORMAT.md 2)

CACHE_FORMAT = "distill-cache"
CACHE_VERSION = 2
CONVERT_HINT = "distill convert-cache OLD NEW"   # what to run on a cache of an older version
MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"            # identity of the run that writes the directory (written first)
CACHE_EXT = ".arrow"
IPC_COMPRESSION = "zstd"
IPC_LEVEL = 9
PROB_DTYPES = ("float16", "float32")
CACHE_CHUNK = 4096      # samples per record batch; a batch never spans two epochs
# consecutive epochs whose top-K ids share one class dictionary per sample; 0 = all epochs (the default:
# a teacher's top-K over 90 views of one image use ~28 distinct classes, over any 10 views already ~22)
CACHE_GROUP = 0
# Arrow schema metadata of a cache file, besides the encoding facts of ``encode_cache_shard``:
ARROW_ENTRY_KEY = b"entry"        # JSON: the shard's manifest entry (lets a rerun reuse the file)
ARROW_RUN_ID_KEY = b"run_id"      # the run identity digest of the run that wrote the file
# manifest keys beyond the run identity (FORMAT.md 2.3)
REPLAY_ENV_KEY = "replay_env"            # versions that decide replayed pixels (Pillow, libjpeg-turbo, numpy, policy)
AGREEMENT_KEY = "teacher_agreement"      # the teacher against the given labels: top1, mean_label_prob, records
FINGERPRINTS_KEY = "view_fingerprints"   # per shard entry: [{key, epoch, seed, size, sha256}] of replayed views
LOGICAL_COLUMNS = ("key", "shard", "epoch", "seed", "topk_idx", "topk_prob", "label", "label_prob")


def index_dtype(num_classes: int) -> str:
    return "uint16" if num_classes <= 65536 else "int32"


def check_cache_names(manifest: dict, source: str | os.PathLike) -> None:
    """Every shard entry of a cache manifest (read from ``source``) names its input shard and its cache
    file with plain file names (FORMAT.md 2.3); FormatError, one line naming the entry, if not."""
    for e in manifest.get("shards") or ():
        plain_name(e.get("name"), f"{source} names shard", SHARD_DIR)
        plain_name(e.get("file"), f"{source}: shard {e['name']!r} names file", CACHE_DIR)


def cache_file_path(directory: str | os.PathLike, entry: dict, source: str | os.PathLike) -> Path:
    """The cache file of a manifest ``entry``: its ``file`` inside ``directory`` (``files.inside``)."""
    return inside(directory, entry.get("file"), f"{source}: shard {entry.get('name')!r} names file", CACHE_DIR)


def cache_file_name(shard_name: str) -> str:
    stem = shard_name[:-4] if shard_name.endswith(".tar") else shard_name
    return stem.replace("/", "_") + CACHE_EXT


def _local_dtype(distinct: int) -> type:
    """Smallest unsigned dtype whose values 0..distinct-1 index a row's ``classes`` list."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if distinct <= int(np.iinfo(dt).max) + 1:
            return dt
    raise UserError(f"a cache row holds {distinct} distinct classes, more than uint32 local ids can index")


def _fixed(values: np.ndarray, pa_type) -> pa.Array:
    n, width = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa_type), width)


def _fixed_np(col, width: int) -> np.ndarray:
    """A fixed_size_list column (array or chunked) as an (n, width) numpy array."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)


def _plane_columns(prefix: str, values: np.ndarray) -> dict[str, pa.Array]:
    """(n, K) or (n,) little-endian values -> one uint8 column per byte: ``<prefix>_b<p>`` holds byte p.

    zstd then sees the slowly varying high bytes of fp16 probabilities (sign, exponent) apart from
    the noisy low bytes."""
    b = np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"))).view(np.uint8)
    size = values.dtype.itemsize
    b = b.reshape(values.shape + (size,))
    if values.ndim == 1:
        return {f"{prefix}_b{p}": pa.array(np.ascontiguousarray(b[:, p])) for p in range(size)}
    return {f"{prefix}_b{p}": _fixed(np.ascontiguousarray(b[:, :, p]), pa.uint8()) for p in range(size)}


def _bits_dtype(dtype: str) -> np.dtype:
    return np.dtype(f"<u{np.dtype(dtype).itemsize}")


def _delta(prob: np.ndarray) -> np.ndarray:
    """(n, K) probabilities (most probable first) -> their bit patterns as unsigned ints, each rank's
    minus the previous rank's (mod 2**bits): sorted positive floats have sorted bit patterns, so the
    differences are small. Exactly invertible whatever the values (``_undelta``)."""
    bits = np.ascontiguousarray(prob).view(_bits_dtype(prob.dtype.name)).copy()
    bits[:, 1:] = prob.view(bits.dtype)[:, :-1] - prob.view(bits.dtype)[:, 1:]
    return bits


def _undelta(bits: np.ndarray, dtype: str) -> np.ndarray:
    steps = bits.copy()
    steps[:, 1:] = np.zeros_like(bits[:, 1:]) - bits[:, 1:]      # rank r = rank r-1 minus its difference (mod 2**bits)
    return (np.cumsum(steps, axis=1, dtype=bits.dtype) if bits.size else bits).view(np.dtype(dtype).newbyteorder("<"))


def _label_bits(lprob: np.ndarray, prob: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The label probability's bits, XOR the bits of the top-K probability of the label when the label
    is among the record's top-K ids (then usually equal: 0), else as they are. Invertible given the
    record's ids and probabilities."""
    bt = _bits_dtype(prob.dtype.name)
    hit = ids == labels[:, None]
    at = np.where(hit.any(1), (prob.view(bt) * hit).max(1) if len(ids) else 0, 0).astype(bt)
    return np.ascontiguousarray(lprob).view(bt) ^ at


def _plane_names(prefix: str, dtype: str) -> list[str]:
    return [f"{prefix}_b{p}" for p in range(np.dtype(dtype).itemsize)]


def _from_planes(table: pa.Table, prefix: str, dtype: str, width: int | None) -> np.ndarray:
    """The unsigned ints ``_plane_columns`` split (bits of ``dtype``'s size)."""
    parts = [_fixed_np(table.column(c), width) if width else table.column(c).to_numpy() for c in _plane_names(prefix, dtype)]
    return np.ascontiguousarray(np.stack(parts, -1)).view(_bits_dtype(dtype)).reshape(parts[0].shape)


def _dictionary(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``ids`` (n, M): its distinct ids in order of first appearance, and every position's
    index into that list. Returns (the lists concatenated, their lengths, local (n, M) uint32)."""
    n, m = ids.shape
    if n == 0 or m == 0:
        return ids.reshape(-1)[:0], np.zeros(n, np.int64), np.zeros((n, m), np.uint32)
    order = np.argsort(ids, axis=1, kind="stable")
    s = np.take_along_axis(ids, order, 1)
    starts = np.ones((n, m), bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    first = np.zeros((n, m), bool)          # positions where an id appears for the first time
    np.put_along_axis(first, order, starts, 1)
    rank = np.cumsum(first, 1) - 1           # at a first appearance: that id's index in the row's list
    run = np.cumsum(starts, 1) - 1           # sorted position -> which distinct id
    run_rank = np.zeros((n, m), np.int64)
    rows = np.repeat(np.arange(n), m).reshape(n, m)
    run_rank[rows[starts], run[starts]] = np.take_along_axis(rank, order, 1)[starts]
    local = np.empty((n, m), np.uint32)
    np.put_along_axis(local, order, np.take_along_axis(run_rank, run, 1).astype(np.uint32), 1)
    return ids[first], first.sum(1), local


def _schema(k: int, idt: np.dtype, ldt: type, prob_dtype: str) -> pa.Schema:
    fields = [("key", pa.string()), ("label", pa.int32()), ("seed", pa.uint32()),
              ("classes", pa.list_(pa.from_numpy_dtype(idt))), ("local", pa.list_(pa.from_numpy_dtype(ldt), k))]
    fields += [(c, pa.list_(pa.uint8(), k)) for c in _plane_names("prob", prob_dtype)]
    fields += [(c, pa.uint8()) for c in _plane_names("label_prob", prob_dtype)]
    return pa.schema(fields)


def encode_cache_shard(keys, labels, seeds, topk_idx, topk_prob, label_prob, *, num_classes: int,
                       prob_dtype: str = "float16", shard: str = "", group: int = CACHE_GROUP,
                       chunk: int = CACHE_CHUNK) -> pa.Table:
    """Physical table of one input shard (FORMAT.md 2.2): E*N rows, epoch-major, in record batches of
    at most ``chunk`` samples of one epoch, so that a reader of epoch e reads only e's batches.

    seeds (N, E) uint32; topk_idx (N, E, K) ints; topk_prob (N, E, K); label_prob (N, E)."""
    if prob_dtype not in PROB_DTYPES:
        raise UserError(f"prob dtype must be one of {PROB_DTYPES}, got {prob_dtype!r}")
    seeds = np.asarray(seeds, dtype=np.uint32)
    n, e_ = seeds.shape if seeds.ndim == 2 else (0, 0)
    topk_idx = np.asarray(topk_idx)
    k = topk_idx.shape[2] if topk_idx.ndim == 3 else 0
    topk_idx = topk_idx.reshape(n, e_, k)
    idt = np.dtype(index_dtype(num_classes))
    prob = np.asarray(topk_prob, dtype=prob_dtype).reshape(n, e_, k)
    lprob = np.asarray(label_prob, dtype=prob_dtype).reshape(n, e_)
    group = group if 0 < group < e_ else max(e_, 1)
    dicts = []                              # per group: (offsets, class lists concatenated, local (n, g, K), most distinct)
    for g0 in range(0, e_, group):
        g = min(group, e_ - g0)
        flat, counts, local = _dictionary(topk_idx[:, g0:g0 + g].reshape(n, g * k).astype(np.int64))
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(counts, out=offsets[1:])
        dicts.append((offsets, flat.astype(idt), local.reshape(n, g, k), int(counts.max(initial=0))))
    ldt = _local_dtype(max((d[3] for d in dicts), default=0))
    schema = _schema(k, idt, ldt, prob_dtype)
    meta = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "epochs": str(e_), "topk": str(k),
            "samples": str(n), "chunk": str(chunk), "group": str(group), "prob_dtype": prob_dtype,
            "index_dtype": idt.name, "num_classes": str(num_classes), "shard": shard}
    keys, labels = list(keys), np.asarray(labels, dtype=np.int32)
    batches = []
    for e in range(e_):
        offsets, flat, local, _ = dicts[e // group]
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            lead = e % group == 0               # the group's first epoch carries its dictionary
            offs = offsets[a:b + 1] - offsets[a] if lead else np.zeros(b - a + 1, np.int32)
            cols = {"key": pa.array(keys[a:b] if e == 0 else [""] * (b - a), type=pa.string()),
                    "label": pa.array(labels[a:b] if e == 0 else np.zeros(b - a, np.int32)),
                    "seed": pa.array(seeds[a:b, e]),
                    "classes": pa.ListArray.from_arrays(pa.array(offs),
                                                        pa.array(flat[offsets[a]:offsets[b]] if lead else flat[:0])),
                    "local": _fixed(local[a:b, e % group].astype(ldt), pa.from_numpy_dtype(ldt)),
                    **_plane_columns("prob", _delta(prob[a:b, e])),
                    **_plane_columns("label_prob", _label_bits(lprob[a:b, e], prob[a:b, e], topk_idx[a:b, e], labels[a:b]))}
            batches.append(pa.record_batch([cols[f.name].cast(f.type) for f in schema], schema=schema))
    schema = schema.with_metadata({k_.encode(): v.encode() for k_, v in meta.items()})
    return pa.Table.from_batches(batches, schema=schema)


def replace_keys(table: pa.Table, keys) -> pa.Table:
    """A physical shard table with other sample keys (same count; e.g. synthetic caches that reuse records)."""
    md = cache_meta(table)
    n, e_ = int(md["samples"]), int(md["epochs"])
    keys = list(keys)
    if len(keys) != n:
        raise UserError(f"{len(keys)} keys for a shard of {n} samples")
    return table.set_column(0, "key", pa.array(keys + [""] * (n * (e_ - 1)), pa.string()))


def cache_meta(table_or_schema) -> dict:
    schema = getattr(table_or_schema, "schema", table_or_schema)
    md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if md.get("format") != CACHE_FORMAT:
        raise FormatError(f"not a distill cache file (format={md.get('format')!r})")
    if int(md.get("version", -1)) != CACHE_VERSION:
        raise FormatError(f"cache file version {md.get('version')} is not supported (expected {CACHE_VERSION}); "
                          f"convert the cache with {CONVERT_HINT}")
    return md


# logical column -> the physical columns it is decoded from: (of epoch 0, of the epoch, of the group's first epoch)
# (label_prob is stored relative to the record's top-K: it needs label, ids and probabilities too)
def _physical(md: dict, columns) -> tuple[list, list, bool]:
    lp = "label_prob" in columns
    base = [c for c in ("key", "label") if c in columns or (c == "label" and lp)]
    per = ["seed"] if "seed" in columns else []
    per += ["local"] if "topk_idx" in columns or lp else []
    per += _plane_names("prob", md["prob_dtype"]) if "topk_prob" in columns or lp else []
    per += _plane_names("label_prob", md["prob_dtype"]) if lp else []
    return base, per, "topk_idx" in columns or lp


_ORDER = ("key", "label", "seed", "classes", "local") + tuple(f"{p}_b{i}" for p in ("prob", "label_prob") for i in range(4))


def _check_request(md: dict, epochs, columns) -> tuple[list[str], np.ndarray]:
    cols = list(LOGICAL_COLUMNS if columns is None else columns)
    bad = [c for c in cols if c not in LOGICAL_COLUMNS]
    if bad:
        raise UserError(f"unknown cache column(s) {bad} (valid: {list(LOGICAL_COLUMNS)})")
    e_ = int(md["epochs"])
    ep = np.arange(e_) if epochs is None else np.asarray(sorted(set(int(x) for x in epochs)), dtype=np.int64)
    if len(ep) and (ep.min() < 0 or ep.max() >= e_):
        raise UserError(f"epochs {list(ep)} out of range: this cache holds epochs 0..{e_ - 1}")
    return cols, ep


def _logical(md: dict, fetch, epochs, columns, start: int, stop: int) -> pa.Table:
    """The logical records (FORMAT.md 2.1) of samples [start, stop) at ``epochs``, sample-major;
    ``fetch(epoch, physical columns, start, stop)`` returns those rows of that epoch's batches."""
    cols, ep = _check_request(md, epochs, columns)
    k, group, n, ne = int(md["topk"]), int(md["group"]), stop - start, len(ep)
    base_cols, per_cols, need_dict = _physical(md, cols)
    want: dict[int, set] = {}                 # epoch -> the physical columns read from its batches (once each)
    if base_cols and ne:
        want.setdefault(0, set()).update(base_cols)
    for e in map(int, ep):
        if per_cols:
            want.setdefault(e, set()).update(per_cols)
        if need_dict:
            want.setdefault(e // group * group, set()).add("classes")
    got = {e: fetch(e, [c for c in _ORDER if c in need], start, stop) for e, need in sorted(want.items())}
    base = got.get(0)
    per = {int(e): got[int(e)] for e in ep} if per_cols else {}
    dicts = {int(e) // group: got[int(e) // group * group] for e in ep} if need_dict else {}

    def stack(f) -> np.ndarray:               # per-epoch (n, ...) arrays -> (n * ne, ...) sample-major
        if not ne:
            return None
        parts = [f(int(e)) for e in ep]
        return parts[0] if ne == 1 else np.stack(parts, 1).reshape((n * ne,) + parts[0].shape[1:])

    memo: dict = {}

    def once(fn):                             # each epoch's ids and probabilities are decoded once
        def f(e: int):
            if (fn, e) not in memo:
                memo[fn, e] = fn(e)
            return memo[fn, e]
        return f

    @once
    def ids(e: int) -> np.ndarray:
        cls = dicts[e // group].column("classes").combine_chunks()
        flat = cls.values.to_numpy(zero_copy_only=False)
        local = _fixed_np(per[e].column("local"), k).astype(np.int64)
        return flat[cls.offsets.to_numpy()[:-1, None] + local] if n else np.zeros((0, k), flat.dtype)

    pdt = md["prob_dtype"]

    @once
    def probs(e: int) -> np.ndarray:
        return _undelta(_from_planes(per[e], "prob", pdt, k), pdt)

    def label_prob(e: int) -> np.ndarray:
        stored = _from_planes(per[e], "label_prob", pdt, None)
        labels = base.column("label").to_numpy().astype(np.int64)
        return (stored ^ _label_bits(np.zeros(n, pdt), probs(e).astype(pdt), ids(e), labels)).view(np.dtype(pdt).newbyteorder("<"))

    rows = np.repeat(np.arange(n), ne)
    out: dict[str, pa.Array] = {}
    for c in cols:
        if c == "key":
            key = base.column("key").combine_chunks() if ne else pa.array([], pa.string())
            out[c] = key if ne <= 1 else key.take(pa.array(rows))
        elif c == "shard":
            out[c] = pa.array(np.full(n * ne, md["shard"], dtype=object), type=pa.string())
        elif c == "epoch":
            out[c] = pa.array(np.tile(ep, n).astype(np.int32))
        elif c == "label":
            out[c] = pa.array(np.repeat(base.column("label").to_numpy(), ne) if ne else np.zeros(0, np.int32))
        elif c == "seed":
            out[c] = pa.array(stack(lambda e: per[e].column("seed").to_numpy()) if ne else np.zeros(0, np.uint32))
        elif c == "topk_idx":
            out[c] = _fixed(stack(ids) if ne else np.zeros((0, k), np.int64), pa.from_numpy_dtype(np.dtype(md["index_dtype"])))
        elif c == "topk_prob":
            v = stack(probs) if ne else np.zeros((0, k), pdt)
            out[c] = _fixed(v.astype(pdt), pa.from_numpy_dtype(np.dtype(pdt)))
        elif c == "label_prob":
            v = stack(label_prob) if ne else np.zeros(0)
            out[c] = pa.array(v.astype(np.float32))
    return pa.table(out)


def decode_cache_shard(table: pa.Table, epochs=None, columns=None) -> pa.Table:
    """A whole physical table of one shard (as ``read_ipc`` returns it) -> the logical view: one row
    per (sample, epoch), sample-major. ``CacheFile`` reads only what is needed instead."""
    md = cache_meta(table)
    n = int(md["samples"])

    def fetch(e: int, cols: list, start: int, stop: int) -> pa.Table:
        return table.select(cols).slice(e * n + start, stop - start)
    return _logical(md, fetch, epochs, columns, 0, n)


class CacheFile:
    """One shard file of a cache, opened for reading: its metadata comes from the IPC footer, and only
    the record batches (epochs, sample ranges) and columns asked for are read and decompressed.

    ``source``: an open pyarrow file to read from instead of memory-mapping ``path`` (e.g. one that
    counts the bytes read). ``batches_read`` counts the record batches read so far."""

    def __init__(self, path: str | os.PathLike, source=None):
        self.path = str(path)
        try:
            self._src = source if source is not None else pa.memory_map(self.path)
            self._readers: dict = {}
            self.schema = self._reader(()).schema
        except FileNotFoundError:
            raise FormatError(f"cache file missing: {path}") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise FormatError(f"cache file unreadable: {path} ({str(e).splitlines()[0]}); run distill verify") from None
        self.meta = cache_meta(self.schema)
        self.samples, self.epochs = int(self.meta["samples"]), int(self.meta["epochs"])
        self.chunk = int(self.meta["chunk"])
        self.batches_read = 0

    def _reader(self, fields: tuple):
        if fields not in self._readers:
            opts = pa.ipc.IpcReadOptions(included_fields=list(fields), use_threads=False) if fields else None
            self._readers[fields] = pa.ipc.open_file(self._src, options=opts)
        return self._readers[fields]

    def fetch(self, epoch: int, columns: list[str], start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of epoch ``epoch``'s batches, only ``columns``."""
        fields = tuple(sorted(self.schema.get_field_index(c) for c in columns))
        if -1 in fields:
            raise FormatError(f"cache file {self.path} has no column {columns}")
        reader = self._reader(fields)
        per_epoch = -(-self.samples // self.chunk)
        first, last = start // self.chunk, max(start, stop - 1) // self.chunk
        try:
            parts = [reader.get_batch(epoch * per_epoch + c) for c in range(first, min(last, per_epoch - 1) + 1)]
        except (pa.ArrowInvalid, OSError) as e:
            raise FormatError(f"cache file unreadable: {self.path} ({str(e).splitlines()[0]}); run distill verify") from None
        self.batches_read += len(parts)
        if not parts:
            return pa.table({c: pa.array([], self.schema.field(c).type) for c in columns})
        t = pa.Table.from_batches(parts).select(columns)
        return t.slice(start - first * self.chunk, stop - start)

    def read(self, epochs=None, columns=None, rows: tuple[int, int] | None = None) -> pa.Table:
        """The logical records (FORMAT.md 2.1) of samples ``rows`` = (start, stop) (all by default) at
        ``epochs`` (all by default), sample-major."""
        start, stop = rows if rows is not None else (0, self.samples)
        return _logical(self.meta, self.fetch, epochs, columns, max(0, start), min(stop, self.samples))

    def num_rows(self) -> int:
        """Rows stored in the file (should be samples x epochs), reading only the label buffers."""
        reader = self._reader((self.schema.get_field_index("label"),))
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))

    def keys(self) -> pa.Array:
        """The sample keys in row order (a string array; read from epoch 0's batches only)."""
        return self.fetch(0, ["key"], 0, self.samples).column("key").combine_chunks()

    def close(self) -> None:
        self._readers.clear()
        self._src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def ipc_bytes(table: pa.Table) -> bytes:
    """Serialise a table as a compressed Arrow IPC file (the caller writes the bytes atomically). A
    cache shard table is written one (epoch, sample chunk) per record batch (FORMAT.md 2.2)."""
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec(IPC_COMPRESSION, compression_level=IPC_LEVEL))
    md = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    with pa.ipc.new_file(sink, table.schema, options=opts) as w:
        if md.get("format") == CACHE_FORMAT:
            n, chunk = int(md["samples"]), int(md["chunk"])
            for e in range(int(md["epochs"])):
                for a in range(0, n, chunk):
                    for b in table.slice(e * n + a, min(chunk, n - a)).combine_chunks().to_batches():
                        w.write_batch(b)
        else:
            w.write_table(table, max_chunksize=4096)
    return sink.getvalue().to_pybytes()


def read_ipc(path: str | os.PathLike, columns=None) -> pa.Table:
    try:
        with pa.memory_map(str(path)) as src:
            reader = pa.ipc.open_file(src)
            table = reader.read_all()
    except FileNotFoundError:
        raise FormatError(f"cache file missing: {path}") from None
    except (pa.ArrowInvalid, OSError) as e:      # a damaged file: bad footer, or zstd refuses a block
        raise FormatError(f"cache file unreadable: {path} ({str(e).splitlines()[0]}); run distill verify") from None
    return table.select(columns) if columns else table

# ---------------------------------------------------------------------------------------------
# filter directory: scores.arrow (one row per scored sample) + summary.json (written last) + report

FILTER_FORMAT = "distill-filter"
FILTER_VERSION = 1
FILTER_SCORES_NAME = "scores.arrow"
FILTER_SUMMARY_NAME = "summary.json"


FILTER_SCORING_DIR = "scoring"           # the scoring pass's cache (one centre view per sample)
FILTER_REPORT_NAME = "report.md"
FILTER_MONTAGE_NAME = "suspicious.png"
FILTER_HIST_NAME = "label_prob_hist.png"
# scores.arrow: one row per scored sample, in shard order (FORMAT.md 3)
FILTER_SCORES_COLUMNS = ("key", "shard", "label", "label_prob", "label_rank", "topk_idx", "topk_prob", "margin",
                         "keep", "reason")


def read_filter_summary(directory: str | os.PathLike) -> dict:
    d = read_json(Path(directory) / FILTER_SUMMARY_NAME, "filter summary (is this a finished filter-labels output?)")
    if d.get("format") != FILTER_FORMAT or d.get("version") != FILTER_VERSION:
        raise FormatError(f"{directory} is not a distill filter directory of version {FILTER_VERSION}")
    return d


def read_excluded_keys(directory: str | os.PathLike) -> set[str]:
    """Keys that filter-labels dropped (keep == false)."""
    read_filter_summary(directory)
    t = read_ipc(Path(directory) / FILTER_SCORES_NAME, columns=["key", "keep"])
    keys = t.column("key").to_numpy(zero_copy_only=False)
    keep = t.column("keep").to_numpy(zero_copy_only=False)
    return set(keys[~keep].tolist())


# ---------------------------------------------------------------------------------------------
# run directory (train-student): checkpoints with JSON sidecars, metrics, resolved config, summary

RUN_LAST = "last.pt"                # checkpoint after every epoch (--resume continues from it)
RUN_BEST = "best.pt"                # checkpoint of the best validation top-1
RUN_METRICS_NAME = "metrics.jsonl"  # one JSON line per epoch
RUN_SUMMARY_NAME = "summary.json"   # written when the run completes
RUN_CONFIG_NAME = "config.json"     # the resolved TrainConfig
RUN_BASELINE_DIR = "hard-labels"    # the --compare-hard-labels run, inside the run directory
RUN_CLASS_STATS_NAME = "class_stats.npz"  # last epoch's validation sums for class relations (train/relations.py)


# ---------------------------------------------------------------------------------------------
# adapted teacher directory (adapt-teacher): a teacher spec on its own (--teacher OUT / --scorer OUT)

ADAPT_FORMAT = "distill-adapted-teacher"
ADAPT_VERSION = 1
ADAPT_TEACHER_JSON = "teacher.json"     # what the teacher is: file, input size, mean/std, classes, method, base, metrics
ADAPT_TEACHER_FILE = "teacher.pt2"      # the merged teacher as a torch.export program (dynamic batch)
ADAPT_WEIGHTS = "weights.pth"           # its state dict in timm's names (a plain ViT after merging)
ADAPT_RUN_FILES = ("config.json", "last.pt", "last.json", "metrics.jsonl")   # the training run beside them


def read_teacher_json(directory: str | os.PathLike) -> dict | None:
    """The ``teacher.json`` of an adapted-teacher directory, or None when there is none."""
    p = Path(directory) / ADAPT_TEACHER_JSON
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {p}: {e}") from None
    if not isinstance(d, dict) or d.get("format") != ADAPT_FORMAT:
        raise UserError(f"{p} is not an adapted teacher's teacher.json (format {d.get('format') if isinstance(d, dict) else None!r})")
    if int(d.get("version", 0)) > ADAPT_VERSION:
        raise UserError(f"{p} has version {d.get('version')}; this distill reads up to {ADAPT_VERSION}: upgrade distill")
    return d

"""The one definition of distill's on-disk data. FORMAT.md beside this file is the spec in prose.

Nothing here imports torch or Ray: a reader of the files needs only pyarrow, numpy and json.

Three kinds of directory:

* shard directory: webdataset tars ``<prefix>-%06d.tar`` plus ``index.json`` (``ShardIndex``).
* cache directory: one Arrow IPC file per input shard plus ``manifest.json`` (written last).
* filter directory: ``scores.arrow`` plus ``summary.json`` and a report.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from .files import FormatError, UserError, atomic_write_json, read_json

SHARD_INDEX_NAME = "index.json"
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
    def from_dict(cls, d: dict) -> "ShardIndex":
        if d.get("format") != SHARD_INDEX_FORMAT:
            raise FormatError(f"not a distill shard index (format={d.get('format')!r})")
        if d.get("version") != SHARD_INDEX_VERSION:
            raise FormatError(f"shard index version {d.get('version')} is not supported (expected {SHARD_INDEX_VERSION})")
        return cls(classes=list(d["classes"]),
                   shards=[ShardEntry(**s) for s in d["shards"]],
                   skipped=[Skip(**s) for s in d.get("skipped", [])], order=d.get("order"))

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / SHARD_INDEX_NAME
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "ShardIndex":
        return cls.from_dict(read_json(Path(directory) / SHARD_INDEX_NAME, "shard index"))


def skips_to_dicts(skips: Iterable[Skip]) -> list[dict]:
    return [asdict(s) for s in skips]


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
# teacher cache: manifest.json + one Arrow IPC file per input shard (see FORMAT.md)

CACHE_FORMAT = "distill-cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"            # identity of the run that writes the directory (written first)
CACHE_EXT = ".arrow"
IPC_COMPRESSION = "zstd"
IPC_LEVEL = 9
PROB_DTYPES = ("float16", "float32")
# Arrow schema metadata of a cache file, besides the encoding facts of ``encode_cache_shard``:
ARROW_ENTRY_KEY = b"entry"        # JSON: the shard's manifest entry (lets a rerun reuse the file)
ARROW_RUN_ID_KEY = b"run_id"      # the run identity digest of the run that wrote the file
# manifest keys beyond the run identity (FORMAT.md 2.1)
REPLAY_ENV_KEY = "replay_env"            # versions that decide replayed pixels (Pillow, libjpeg-turbo, numpy, policy)
AGREEMENT_KEY = "teacher_agreement"      # the teacher against the given labels: top1, mean_label_prob, records
FINGERPRINTS_KEY = "view_fingerprints"   # per shard entry: [{key, epoch, seed, size, sha256}] of replayed views


def index_dtype(num_classes: int) -> str:
    return "uint16" if num_classes <= 65536 else "int32"


def cache_file_name(shard_name: str) -> str:
    stem = shard_name[:-4] if shard_name.endswith(".tar") else shard_name
    return stem.replace("/", "_") + CACHE_EXT


def _planes(values: np.ndarray) -> np.ndarray:
    """(N, M) little-endian values -> (N, itemsize * M) bytes, byte plane by byte plane.

    Splitting the bytes of fp16 probabilities into planes lets zstd see the slowly varying high
    bytes (sign/exponent) apart from the noisy low bytes."""
    n, m = values.shape
    b = np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"))).view(np.uint8)
    return np.ascontiguousarray(b.reshape(n, m, values.dtype.itemsize).transpose(0, 2, 1)).reshape(n, m * values.dtype.itemsize)


def _unplanes(data: np.ndarray, dtype: str, m: int) -> np.ndarray:
    dt = np.dtype(dtype).newbyteorder("<")
    n = data.shape[0]
    b = np.ascontiguousarray(data.reshape(n, dt.itemsize, m).transpose(0, 2, 1))
    return b.view(dt).reshape(n, m).astype(dtype)


def _fixed(values: np.ndarray, pa_type) -> pa.Array:
    n, width = values.shape
    flat = pa.array(values.reshape(-1), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _local_dtype(distinct: int) -> type:
    """Smallest unsigned dtype whose values 0..distinct-1 index a row's ``classes`` list."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if distinct <= int(np.iinfo(dt).max) + 1:
            return dt
    raise UserError(f"a cache row holds {distinct} distinct classes, more than uint32 local ids can index")


def encode_cache_shard(keys, labels, seeds, topk_idx, topk_prob, label_prob, *, num_classes: int,
                       prob_dtype: str = "float16", shard: str = "") -> pa.Table:
    """Physical table for one input shard: one row per sample, all epochs in the row.

    seeds (N, E) uint32; topk_idx (N, E, K) ints; topk_prob (N, E, K); label_prob (N, E)."""
    if prob_dtype not in PROB_DTYPES:
        raise UserError(f"prob dtype must be one of {PROB_DTYPES}, got {prob_dtype!r}")
    topk_idx = np.asarray(topk_idx)
    n, e, k = topk_idx.shape if topk_idx.ndim == 3 else (0, seeds.shape[1] if np.ndim(seeds) == 2 else 0, 0)
    idt = np.dtype(index_dtype(num_classes))
    ids = topk_idx.reshape(n, e * k)
    # Work in uint32 (a row holds at most E*K distinct ids), then narrow to the smallest unsigned
    # type that holds every row's distinct-class count: a fixed uint16 would wrap past 65,536.
    class_lists, locals_ = [], np.zeros((n, e * k), dtype=np.uint32)
    for i in range(n):
        uniq, first, inv = np.unique(ids[i], return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        class_lists.append(uniq[order].astype(idt))
        locals_[i] = rank[inv.reshape(-1)]
    local_dt = _local_dtype(max((len(c) for c in class_lists), default=0))
    offsets = np.zeros(n + 1, dtype=np.int32)
    if n:
        np.cumsum([len(c) for c in class_lists], out=offsets[1:])
    flat_classes = np.concatenate(class_lists) if n else np.zeros(0, idt)
    classes = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_classes, type=pa.from_numpy_dtype(idt)))
    prob = np.asarray(topk_prob, dtype=prob_dtype).reshape(n, e * k)
    lprob = np.asarray(label_prob, dtype=prob_dtype).reshape(n, e)
    cols = {
        "key": pa.array(list(keys), type=pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int32)),
        "seed": _fixed(np.asarray(seeds, dtype=np.uint32).reshape(n, e), pa.uint32()),
        "classes": classes,
        "local": _fixed(locals_.astype(local_dt), pa.from_numpy_dtype(local_dt)),
        "prob_planes": _fixed(_planes(prob), pa.uint8()),
        "label_prob_planes": _fixed(_planes(lprob), pa.uint8()),
    }
    meta = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "epochs": str(e), "topk": str(k),
            "prob_dtype": prob_dtype, "index_dtype": idt.name, "num_classes": str(num_classes), "shard": shard}
    return pa.table(cols, metadata={k_.encode(): v.encode() for k_, v in meta.items()})


def cache_meta(table_or_schema) -> dict:
    schema = getattr(table_or_schema, "schema", table_or_schema)
    md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if md.get("format") != CACHE_FORMAT:
        raise FormatError(f"not a distill cache file (format={md.get('format')!r})")
    if int(md.get("version", -1)) != CACHE_VERSION:
        raise FormatError(f"cache file version {md.get('version')} is not supported (expected {CACHE_VERSION})")
    return md


LOGICAL_COLUMNS = ("key", "shard", "epoch", "seed", "topk_idx", "topk_prob", "label", "label_prob")


def decode_cache_shard(table: pa.Table, epochs=None, columns=None) -> pa.Table:
    """Physical table of one shard -> the logical view: one row per (sample, epoch), sample-major."""
    md = cache_meta(table)
    E, K = int(md["epochs"]), int(md["topk"])
    columns = list(LOGICAL_COLUMNS if columns is None else columns)
    bad = [c for c in columns if c not in LOGICAL_COLUMNS]
    if bad:
        raise UserError(f"unknown cache column(s) {bad} (valid: {list(LOGICAL_COLUMNS)})")
    ep = np.arange(E) if epochs is None else np.asarray(sorted(set(int(x) for x in epochs)), dtype=np.int64)
    if len(ep) and (ep.min() < 0 or ep.max() >= E):
        raise UserError(f"epochs {list(ep)} out of range: this cache holds epochs 0..{E - 1}")
    n, ne = table.num_rows, len(ep)
    out: dict[str, pa.Array] = {}
    rows = np.repeat(np.arange(n), ne)
    for c in columns:
        if c == "key":
            out[c] = table.column("key").combine_chunks().take(pa.array(rows))
        elif c == "shard":
            out[c] = pa.array(np.full(n * ne, md["shard"], dtype=object), type=pa.string())
        elif c == "epoch":
            out[c] = pa.array(np.tile(ep, n).astype(np.int32))
        elif c == "label":
            out[c] = pa.array(np.repeat(table.column("label").to_numpy(), ne))
        elif c == "seed":
            s = _fixed_np(table, "seed", E)
            out[c] = pa.array(s[:, ep].reshape(-1))
        elif c == "topk_idx":
            cls = table.column("classes").combine_chunks()
            flat = cls.values.to_numpy(zero_copy_only=False)
            offs = cls.offsets.to_numpy()[:-1]
            local = _fixed_np(table, "local", E * K).reshape(n, E, K)[:, ep].astype(np.int64)
            ids = flat[offs[:, None, None] + local] if n else np.zeros((0, ne, K), flat.dtype)
            out[c] = _fixed(ids.reshape(n * ne, K), pa.from_numpy_dtype(np.dtype(md["index_dtype"])))
        elif c == "topk_prob":
            isz = np.dtype(md["prob_dtype"]).itemsize
            p = _unplanes(_fixed_np(table, "prob_planes", isz * E * K), md["prob_dtype"], E * K)
            out[c] = _fixed(p.reshape(n, E, K)[:, ep].reshape(n * ne, K), pa.from_numpy_dtype(np.dtype(md["prob_dtype"])))
        elif c == "label_prob":
            isz = np.dtype(md["prob_dtype"]).itemsize
            lp = _unplanes(_fixed_np(table, "label_prob_planes", isz * E), md["prob_dtype"], E)
            out[c] = pa.array(lp[:, ep].reshape(-1).astype(np.float32))
    return pa.table(out)


def _fixed_np(table: pa.Table, name: str, width: int) -> np.ndarray:
    col = table.column(name).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), width)


def ipc_bytes(table: pa.Table) -> bytes:
    """Serialise a table as a compressed Arrow IPC file (the caller writes the bytes atomically)."""
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec(IPC_COMPRESSION, compression_level=IPC_LEVEL))
    with pa.ipc.new_file(sink, table.schema, options=opts) as w:
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

"""The one definition of distill's on-disk data. FORMAT.md beside this file is the spec in prose.

Nothing here imports torch or Ray: a reader of the files needs only pyarrow, numpy and json.

Three kinds of directory:

* shard directory: webdataset tars ``<prefix>-%06d.tar`` plus ``index.json`` (``ShardIndex``).
* cache directory: one Arrow IPC file per input shard plus ``manifest.json`` (written last).
* filter directory: ``scores.arrow`` plus ``summary.json`` and a report.
"""
from __future__ import annotations

import base64
import json
import os
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from . import storage
from .files import FormatError, UserError, atomic_write_json, digest, inside, plain_name

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
        if not isinstance(d, dict) or d.get("format") != SHARD_INDEX_FORMAT:
            raise FormatError(f"{source}: not a distill shard index (format={d.get('format') if isinstance(d, dict) else None!r})")
        if d.get("version") != SHARD_INDEX_VERSION:
            raise FormatError(f"shard index version {d.get('version')} is not supported (expected {SHARD_INDEX_VERSION})")
        try:
            for s in d["shards"]:
                plain_name(s.get("name"), f"{source} names shard", SHARD_DIR)
            _typed({"classes": d["classes"]}, {"classes": list}, str(source))
            shards = [ShardEntry(**s) for s in d["shards"]]
            for i, e in enumerate(shards):
                _typed(asdict(e), {"samples": _INT, "bytes": _INT, "sha256": str}, f"{source}: shard {i} ({e.name!r})")
            return cls(classes=[str(c) for c in d["classes"]], shards=shards,
                       skipped=[Skip(**s) for s in d.get("skipped", [])], order=d.get("order"))
        except (KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{source}: not a well-formed shard index ({type(e).__name__}: {e})") from None

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / SHARD_INDEX_NAME
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "ShardIndex":
        path = storage.path(directory) / SHARD_INDEX_NAME
        return cls.from_dict(storage.read_json(path, "shard index"), path)

    def paths(self, directory: str | os.PathLike) -> list[Path]:
        """The shards' paths in ``directory`` (the index's own), each inside it (``files.inside``)."""
        return [inside(directory, s.name, f"{storage.path(directory) / SHARD_INDEX_NAME} names shard", SHARD_DIR)
                for s in self.shards]


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
# per finished shard file, until the manifest is written: {file, file_bytes, file_sha256, run_id} in
# <dir>/.distill.done/<file>.json; a resumed run reuses a file only when its bytes match
CACHE_DONE_DIR = ".distill.done"
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
ARROW_CHECKSUMS_KEY = b"checksums"  # JSON: CRC-32 of the other metadata and schema, and of every (batch, column)
CHECKSUM_ALGORITHM = "crc32"
DIGEST_COLUMN = "digest"          # per sample (epoch 0's rows): CRC-32 of its image bytes then its label text
# manifest keys beyond the run identity (FORMAT.md 2.3)
REPLAY_ENV_KEY = "replay_env"            # versions that decide replayed pixels (Pillow, libjpeg-turbo, numpy, policy)
AGREEMENT_KEY = "teacher_agreement"      # the teacher against the given labels: top1, mean_label_prob, records
FINGERPRINTS_KEY = "view_fingerprints"   # per shard entry: [{key, epoch, seed, size, sha256}] of replayed views
LOGICAL_COLUMNS = ("key", "shard", "epoch", "seed", "topk_idx", "topk_prob", "label", "label_prob")


# manifest keys that are not the run identity (``run.json``; its digest is ``run_id``)
def cache_bytes(directory: str | os.PathLike, files: Iterable[str]) -> int:
    """A cache's size as B/record counts it: its shard ``files`` (the manifest's), manifest and run
    file; never another file that shares the directory (shards, checkpoints, a user's)."""
    d = Path(directory)
    return sum((d / n).stat().st_size for n in (*files, MANIFEST_NAME, RUN_NAME) if (d / n).is_file())


MANIFEST_NOT_IDENTITY = ("run_id", "source", "shards", "totals", AGREEMENT_KEY, REPLAY_ENV_KEY)
# what every manifest holds, and the type of each (FORMAT.md 2.3); bool is not an int here
_INT, _NUM = "an integer", "a number"
_MANIFEST_FIELDS = {"format": str, "version": _INT, "teacher": dict, "policy": dict, "topk": _INT,
                    "temperature": _NUM, "prob_dtype": str, "epochs": _INT, "cache_seed": _INT,
                    "num_classes": _INT, "classes": list, "shard_set": list, "run_id": str, "shards": list,
                    "totals": dict}
_ENTRY_FIELDS = {"name": str, "file": str, "bytes": _INT, "sha256": str, "samples": _INT, "records": _INT,
                 "excluded": _INT, "skipped": list, "file_bytes": _INT, "file_sha256": str}
_TOTALS_FIELDS = {"samples": _INT, "records": _INT, "skipped": _INT, "excluded": _INT}
# fields of a shard's manifest entry that its file's footer (``ARROW_ENTRY_KEY``) must repeat
ENTRY_CROSS_CHECKED = ("name", "bytes", "sha256", "samples", "records", "excluded", "skipped")


def manifest_identity(manifest: dict) -> dict:
    """The run identity a manifest was written from (``run.json``), whose digest is its ``run_id``."""
    identity = {k: v for k, v in manifest.items() if k not in MANIFEST_NOT_IDENTITY}
    if isinstance(identity.get("exclude"), dict):
        identity["exclude"] = {k: v for k, v in identity["exclude"].items() if k != "filter_dir"}
    return identity


def run_id_of(identity: dict) -> str:
    return digest(json.dumps(identity, sort_keys=True))


# what a synthetic cache (tests, benchmarks) may leave out of its identity and entries
_IDENTITY_DEFAULTS = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "teacher": {}, "policy": {},
                      "temperature": 1.0, "prob_dtype": "float16", "cache_seed": 0}
_ENTRY_DEFAULTS = {"bytes": 0, "sha256": "", "excluded": 0, "skipped": []}


def cache_manifest(identity: dict, entries: list[dict], **extra) -> dict:
    """A cache manifest (FORMAT.md 2.3): the run identity (``shard_set`` and ``classes`` filled in when
    absent), its ``run_id``, the shard entries and their ``totals``; ``extra``: the other keys."""
    entries = [{**e, **{k: v for k, v in _ENTRY_DEFAULTS.items() if k not in e}} for e in entries]
    identity = {**_IDENTITY_DEFAULTS, "shard_set": [e["name"] for e in entries], **identity}
    identity.setdefault("classes", [str(i) for i in range(identity["num_classes"])])
    totals = {"samples": sum(e["samples"] for e in entries), "records": sum(e["records"] for e in entries),
              "skipped": sum(len(e["skipped"]) for e in entries), "excluded": sum(e["excluded"] for e in entries),
              "incomplete_shards": sum(e.get("complete") is False for e in entries)}
    m = dict(identity, **extra)
    return dict(m, run_id=run_id_of(manifest_identity(m)), shards=entries, totals=totals)


def _typed(d: dict, fields: dict, where: str) -> None:
    for k, t in fields.items():
        if k not in d:
            raise FormatError(f"{where}: key {k!r} is missing")
        v = d[k]
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0 if t == _INT else
              isinstance(v, (int, float)) and not isinstance(v, bool) if t == _NUM else isinstance(v, t))
        if not ok:
            what = t if isinstance(t, str) else f"a {t.__name__}"
            raise FormatError(f"{where}: {k!r} must be {what}{' >= 0' if t == _INT else ''}, got {v!r:.60}")


def check_manifest(m, path) -> None:
    """Refuse, in one line naming the file and the field, a cache manifest that is not well formed or
    not consistent with itself: missing or ill-typed keys, counts that do not add up, a ``run_id``
    that is not the digest of the manifest's own run identity (an edited epoch count, K, seed, class
    list or teacher). Its files are checked against it when they are opened (``reader.file_problem``)."""
    if not isinstance(m, dict):
        raise FormatError(f"{path}: not a JSON object")
    _typed(m, _MANIFEST_FIELDS, str(path))
    if m["prob_dtype"] not in PROB_DTYPES or len(m["classes"]) != m["num_classes"] or m["topk"] < 1:
        raise FormatError(f"{path}: prob_dtype, classes ({len(m['classes'])}), num_classes ({m['num_classes']}) "
                          f"or topk ({m['topk']}) out of place")
    entries = m["shards"]
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise FormatError(f"{path}: shard entry {i} is not a JSON object")
        _typed(e, _ENTRY_FIELDS, f"{path}: shard {i} ({e.get('name')!r})")
        if e["records"] != e["samples"] * m["epochs"]:
            raise FormatError(f"{path}: shard {e['name']!r} has {e['records']} records, not samples x epochs "
                              f"({e['samples']} x {m['epochs']})")
    check_cache_names(m, path)                      # every name stays inside its directory
    if len({e["name"] for e in entries}) != len(entries) or [e["name"] for e in entries] != m["shard_set"]:
        raise FormatError(f"{path}: its shard entries do not match its shard_set")
    _typed(m["totals"], _TOTALS_FIELDS, f"{path}: totals")
    sums = {"samples": sum(e["samples"] for e in entries), "records": sum(e["records"] for e in entries),
            "skipped": sum(len(e["skipped"]) for e in entries), "excluded": sum(e["excluded"] for e in entries)}
    wrong = [f"{k} {m['totals'][k]} (shards: {v})" for k, v in sums.items() if m["totals"][k] != v]
    if wrong:
        raise FormatError(f"{path}: totals do not add up: {', '.join(wrong)}")
    if run_id_of(manifest_identity(m)) != m["run_id"]:
        raise FormatError(f"{path}: its run_id is not the digest of its settings (epochs, topk, classes, "
                          f"cache_seed, teacher, policy ...): the manifest was edited")


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


def _schema(k: int, idt: np.dtype, ldt: type, prob_dtype: str, digests: bool) -> pa.Schema:
    fields = [("key", pa.string()), ("label", pa.int32())] + ([(DIGEST_COLUMN, pa.uint32())] if digests else [])
    fields += [("seed", pa.uint32()),
              ("classes", pa.list_(pa.from_numpy_dtype(idt))), ("local", pa.list_(pa.from_numpy_dtype(ldt), k))]
    fields += [(c, pa.list_(pa.uint8(), k)) for c in _plane_names("prob", prob_dtype)]
    fields += [(c, pa.uint8()) for c in _plane_names("label_prob", prob_dtype)]
    return pa.schema(fields)


def encode_cache_shard(keys, labels, seeds, topk_idx, topk_prob, label_prob, *, num_classes: int,
                       prob_dtype: str = "float16", shard: str = "", group: int = CACHE_GROUP,
                       chunk: int = CACHE_CHUNK, digests=None) -> pa.Table:
    """Physical table of one input shard (FORMAT.md 2.2): E*N rows, epoch-major, in record batches of
    at most ``chunk`` samples of one epoch, so that a reader of epoch e reads only e's batches.

    seeds (N, E) uint32; topk_idx (N, E, K) ints; topk_prob (N, E, K); label_prob (N, E); digests (N,)
    uint32 (``sample_digest`` of each sample's image and label; None: the file has no digest column)."""
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
    schema = _schema(k, idt, ldt, prob_dtype, digests is not None)
    digests = None if digests is None else np.asarray(digests, dtype=np.uint32).reshape(n)
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
                    DIGEST_COLUMN: pa.array(digests[a:b] if e == 0 else np.zeros(b - a, np.uint32))
                    if digests is not None else None,
                    "seed": pa.array(seeds[a:b, e]),
                    "classes": pa.ListArray.from_arrays(pa.array(offs),
                                                        pa.array(flat[offsets[a]:offsets[b]] if lead else flat[:0])),
                    "local": _fixed(local[a:b, e % group].astype(ldt), pa.from_numpy_dtype(ldt)),
                    **_plane_columns("prob", _delta(prob[a:b, e])),
                    **_plane_columns("label_prob", _label_bits(lprob[a:b, e], prob[a:b, e], topk_idx[a:b, e], labels[a:b]))}
            batches.append(pa.record_batch([cols[f.name].cast(f.type) for f in schema], schema=schema))
    schema = schema.with_metadata({k_.encode(): v.encode() for k_, v in meta.items()})
    return pa.Table.from_batches(batches, schema=schema)


def cache_meta(table_or_schema) -> dict:
    schema = getattr(table_or_schema, "schema", table_or_schema)
    try:
        md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    except UnicodeDecodeError:
        raise FormatError("not a distill cache file (its metadata is not text): damaged?") from None
    if md.get("format") != CACHE_FORMAT:
        raise FormatError(f"not a distill cache file (format={md.get('format')!r})")
    if md.get("version") != str(CACHE_VERSION):
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


_ORDER = ("key", "label", DIGEST_COLUMN, "seed", "classes", "local") + tuple(f"{p}_b{i}" for p in ("prob", "label_prob") for i in range(4))


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


def ipc_blocks(footer: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each record batch of an Arrow IPC file, from its footer (the flatbuffer
    ``Footer`` between the file's data and its last 10 bytes): field 3 of the root table is the vector
    of ``Block`` structs (offset int64, metadata length int32, padding, body length int64)."""
    try:
        table = struct.unpack_from("<I", footer, 0)[0]
        vtable = table - struct.unpack_from("<i", footer, table)[0]
        vlen = struct.unpack_from("<H", footer, vtable)[0]
        fo = struct.unpack_from("<H", footer, vtable + 10)[0] if vlen > 10 else 0
        if not fo:
            return []
        vec = table + fo + struct.unpack_from("<I", footer, table + fo)[0]
        return [(off, meta + body) for off, meta, body in
                (struct.unpack_from("<qi4xq", footer, vec + 4 + 24 * i)
                 for i in range(struct.unpack_from("<I", footer, vec)[0]))]
    except struct.error:
        raise FormatError("its Arrow footer is damaged") from None


class RemoteArrowFile(storage.RangeFile):
    """An Arrow IPC file in an object store, read in part: its footer is fetched once (two exact ranged
    GETs: the trailer, then the footer) and kept; ``prefetch_batches(first, last)`` fetches the byte
    span of those record batches in one GET (a cache file is epoch-major, so one epoch is one span);
    any other read is one exact ranged GET."""

    def __init__(self, location: str):
        super().__init__(location, block=0)
        trailer = self.pin(max(0, self.size - 10), self.size)
        if len(trailer) != 10 or trailer[-6:] != b"ARROW1":
            raise FormatError(f"cache file unreadable: {location} (not an Arrow IPC file); run distill verify")
        n = struct.unpack("<i", trailer[:4])[0]
        if not 0 < n <= self.size - 10:
            raise FormatError(f"cache file unreadable: {location} (its footer length is {n}); run distill verify")
        self.blocks = ipc_blocks(self.pin(self.size - 10 - n, self.size - 10))

    def prefetch_batches(self, first: int, last: int) -> None:
        if 0 <= first <= last < len(self.blocks):
            self.prefetch([(self.blocks[first][0], self.blocks[last][0] + self.blocks[last][1])])

    def keep_first(self, batches: int) -> None:
        """Pin what is read from the first ``batches`` record batches (epoch 0's: the class dictionaries
        and digests every epoch's read needs), so they are fetched once for the life of this file."""
        if 0 < batches <= len(self.blocks):
            self.keep = (self.blocks[0][0], self.blocks[batches - 1][0] + self.blocks[batches - 1][1])


class CacheFile:
    """One shard file of a cache, opened for reading: its metadata comes from the IPC footer, and only
    the record batches (epochs, sample ranges) and columns asked for are read and decompressed.

    Every record batch read is checked against the CRC-32 the footer holds for it (column by column, on
    the buffers as read, before any value is interpreted), and the footer's metadata against its own
    CRC-32: a file damaged after the cache was checked stops the read with one line (``FormatError``).
    A file written before checksums existed (``checksummed`` False) is read unchecked.

    ``source``: an open pyarrow file to read from instead of memory-mapping ``path`` (e.g. one that
    counts the bytes read); a ``RemoteArrowFile`` for a file in an object store (a read of three or
    more columns then fetches its record batches' byte span in one request). ``batches_read`` counts
    the record batches read so far."""

    def __init__(self, path: str | os.PathLike, source=None):
        self.path = str(path)
        if source is None and storage.is_remote(path):
            source = RemoteArrowFile(self.path)
        self._remote = source if isinstance(source, RemoteArrowFile) else None
        try:
            if self._remote is not None:
                source = pa.PythonFile(source, mode="r")
            self._src = source if source is not None else pa.memory_map(self.path)
            self._readers: dict = {}
            self.schema = self._reader(()).schema
            self.num_batches = self._reader(()).num_record_batches
        except FileNotFoundError:
            raise FormatError(f"cache file missing: {path}") from None
        except (pa.ArrowException, OSError) as e:
            raise FormatError(f"cache file unreadable: {path} ({str(e).splitlines()[0]}); run distill verify") from None
        try:
            self.meta = cache_meta(self.schema)
        except FormatError as e:
            raise FormatError(f"cache file {path}: {e}") from None
        self._crcs = self._checksums()
        try:
            self.samples, self.epochs = int(self.meta["samples"]), int(self.meta["epochs"])
            self.chunk, self.topk = int(self.meta["chunk"]), int(self.meta["topk"])
        except (KeyError, ValueError) as e:
            raise self._damaged(f"metadata field {e} missing or not an integer") from None
        self.per_epoch = -(-self.samples // self.chunk) if self.chunk > 0 else -1
        if self.per_epoch < 0 or self.samples < 0 or self.epochs < 0 or self.num_batches != self.epochs * self.per_epoch:
            raise self._damaged(f"{self.num_batches} record batches, its metadata says {self.samples} samples x "
                                f"{self.epochs} epochs in chunks of {self.chunk}")
        self.batches_read = 0
        if self._remote is not None:
            self._remote.keep_first(self.per_epoch)

    @property
    def checksummed(self) -> bool:
        return self._crcs is not None

    def _damaged(self, what: str) -> FormatError:
        return FormatError(f"cache file {self.path} is damaged ({what}); run distill verify")

    def _checksums(self) -> np.ndarray | None:
        """The footer's (batch, column) CRC-32 table, after checking the metadata against its own CRC."""
        raw = (self.schema.metadata or {}).get(ARROW_CHECKSUMS_KEY)
        if raw is None:
            return None
        try:
            sums = json.loads(raw)
            crcs = np.frombuffer(base64.b64decode(sums["batches"], validate=True), dtype="<u4")
            meta_ok = sums["algorithm"] == CHECKSUM_ALGORITHM and int(sums["meta"]) == _meta_crc(self.schema)
        except (ValueError, KeyError, TypeError) as e:
            raise self._damaged(f"unreadable checksums: {type(e).__name__}") from None
        if not meta_ok:
            raise self._damaged("its metadata fails its checksum")
        if crcs.size != self.num_batches * len(self.schema):
            raise self._damaged(f"{crcs.size} checksums for {self.num_batches} batches of {len(self.schema)} columns")
        return crcs.reshape(self.num_batches, len(self.schema))

    def _reader(self, fields: tuple):
        if fields not in self._readers:
            opts = pa.ipc.IpcReadOptions(included_fields=list(fields), use_threads=False) if fields else None
            self._readers[fields] = pa.ipc.open_file(self._src, options=opts)
        return self._readers[fields]

    def _batch(self, fields: tuple, i: int) -> pa.RecordBatch:
        """Record batch ``i`` of the file, only ``fields`` (sorted field indices), checked: its row count
        and, in a checksummed file, each column's CRC-32."""
        where = f"record batch {i} (epoch {i // self.per_epoch})"
        try:
            batch = self._reader(fields).get_batch(i)
        except (pa.ArrowException, OSError) as e:
            raise self._damaged(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        c = i % self.per_epoch
        rows = min(self.chunk, self.samples - c * self.chunk)
        if batch.num_rows != rows or batch.num_columns != len(fields):
            raise self._damaged(f"{where} holds {batch.num_rows} rows, expected {rows}")
        if self._crcs is not None:
            for f, col in zip(fields, batch.columns):
                if _array_crc(col) != self._crcs[i, f]:
                    raise self._damaged(f"{where} column {self.schema.field(f).name!r} fails its checksum")
        self.batches_read += 1
        return batch

    def fetch(self, epoch: int, columns: list[str], start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of epoch ``epoch``'s batches, only ``columns``."""
        fields = tuple(sorted(self.schema.get_field_index(c) for c in columns))
        if -1 in fields:
            raise FormatError(f"cache file {self.path} has no column {columns}")
        first, last = start // self.chunk, max(start, stop - 1) // self.chunk
        if self._remote is not None and len(fields) >= 3:
            self._remote.prefetch_batches(epoch * self.per_epoch + first,
                                          epoch * self.per_epoch + min(last, self.per_epoch - 1))
        parts = [self._batch(fields, epoch * self.per_epoch + c) for c in range(first, min(last, self.per_epoch - 1) + 1)]
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
        fields = (self.schema.get_field_index("label"),)
        return sum(self._batch(fields, i).num_rows for i in range(self.num_batches))

    def keys(self) -> pa.Array:
        """The sample keys in row order (a string array; read from epoch 0's batches only)."""
        return self.fetch(0, ["key"], 0, self.samples).column("key").combine_chunks()

    def digests(self) -> np.ndarray | None:
        """Each sample's ``sample_digest`` in row order (uint32), or None when the file records none."""
        if self.schema.get_field_index(DIGEST_COLUMN) < 0:
            return None
        return self.fetch(0, [DIGEST_COLUMN], 0, self.samples).column(DIGEST_COLUMN).to_numpy()

    def close(self) -> None:
        self._readers.clear()
        self._src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def sample_digest(data: bytes, label: int) -> int:
    """What a cache records of one input sample (its ``digest`` column): CRC-32 of the image member's
    bytes, continued over the label as decimal ASCII. Training checks it as it reads each sample."""
    return zlib.crc32(encode_label(label), zlib.crc32(data))


def _shape_crc(array, crc: int) -> int:
    """CRC-32 continued over the length and null count of an array and of its list children (the IPC
    field nodes: a changed null count would turn values into nulls without touching a buffer)."""
    crc = zlib.crc32(_SHAPE.pack(len(array), array.null_count, array.offset), crc)
    if isinstance(array, (pa.ListArray, pa.FixedSizeListArray)):
        crc = _shape_crc(array.values, crc)         # the child as stored, its offsets not applied
    return crc


_SHAPE = struct.Struct("<qqq")


def _array_crc(array) -> int:
    """CRC-32 of an array's shape and buffers as read from an IPC file (children included), interpreting
    nothing: a damaged buffer is found before any offset or value in it is used."""
    crc = _shape_crc(array, 0)
    for buf in array.buffers():
        if buf is not None:
            crc = zlib.crc32(buf, crc)
    return crc


def batch_crcs(batch: pa.RecordBatch) -> list[int]:
    """The CRC-32 of each column of a record batch, as a reader of the written file will compute it (the
    batch round-trips through IPC first, so slices and offsets are laid out as the file holds them)."""
    batch = pa.ipc.read_record_batch(batch.serialize(), batch.schema)
    return [_array_crc(c) for c in batch.columns]


def _meta_crc(schema: pa.Schema) -> int:
    """CRC-32 of a cache file's schema (names, types) and metadata, less the checksums themselves."""
    md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if k != ARROW_CHECKSUMS_KEY}
    text = json.dumps({"fields": [[f.name, str(f.type)] for f in schema], "metadata": md}, sort_keys=True)
    return zlib.crc32(text.encode())


def _with_checksums(schema: pa.Schema, batches: list) -> pa.Schema:
    crcs = np.array([batch_crcs(b) for b in batches], dtype="<u4").reshape(len(batches), len(schema))
    md = dict(schema.metadata or {})
    md.pop(ARROW_CHECKSUMS_KEY, None)
    schema = schema.with_metadata(md)
    sums = {"algorithm": CHECKSUM_ALGORITHM, "meta": _meta_crc(schema),
            "batches": base64.b64encode(crcs.tobytes()).decode()}
    return schema.with_metadata({**md, ARROW_CHECKSUMS_KEY: json.dumps(sums).encode()})


def ipc_bytes(table: pa.Table) -> bytes:
    """Serialise a table as a compressed Arrow IPC file (the caller writes the bytes atomically). A
    cache shard table is written one (epoch, sample chunk) per record batch (FORMAT.md 2.2), with the
    CRC-32 of its metadata and of every (batch, column) in the footer (``ARROW_CHECKSUMS_KEY``)."""
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec(IPC_COMPRESSION, compression_level=IPC_LEVEL))
    md = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if md.get("format") != CACHE_FORMAT:
        with pa.ipc.new_file(sink, table.schema, options=opts) as w:
            w.write_table(table, max_chunksize=4096)
        return sink.getvalue().to_pybytes()
    n, chunk = int(md["samples"]), int(md["chunk"])
    batches = [b for e in range(int(md["epochs"])) for a in range(0, n, chunk)
               for b in table.slice(e * n + a, min(chunk, n - a)).combine_chunks().to_batches()]
    schema = _with_checksums(table.schema, batches)
    with pa.ipc.new_file(sink, schema, options=opts) as w:
        for b in batches:
            w.write_batch(b.replace_schema_metadata(schema.metadata))
    return sink.getvalue().to_pybytes()


def read_ipc(path: str | os.PathLike, columns=None) -> pa.Table:
    try:
        with (pa.BufferReader(storage.read_bytes(path)) if storage.is_remote(path) else pa.memory_map(str(path))) as src:
            reader = pa.ipc.open_file(src)
            table = reader.read_all()
    except FileNotFoundError:
        raise FormatError(f"cache file missing: {path}") from None
    except (pa.ArrowException, OSError) as e:      # a damaged file: bad footer, or zstd refuses a block
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
    d = storage.read_json(storage.join(directory, FILTER_SUMMARY_NAME),
                          "filter summary (is this a finished filter-labels output?)")
    if d.get("format") != FILTER_FORMAT or d.get("version") != FILTER_VERSION:
        raise FormatError(f"{directory} is not a distill filter directory of version {FILTER_VERSION}")
    return d


def read_excluded_keys(directory: str | os.PathLike) -> set[str]:
    """Keys that filter-labels dropped (keep == false), from a ``scores.arrow`` whose bytes and counts
    match its ``summary.json`` (``scores_sha256``, ``samples``, ``dropped``)."""
    summary = read_filter_summary(directory)
    path = storage.join(directory, FILTER_SCORES_NAME)
    if "scores_sha256" in summary and (not storage.exists(path) or storage.sha256(path) != summary["scores_sha256"]):
        raise FormatError(f"{path} is not the file its {FILTER_SUMMARY_NAME} describes (missing, or its checksum "
                          f"differs): damaged or edited; rerun filter-labels")
    t = read_ipc(path, columns=["key", "keep"])
    keys = t.column("key").to_numpy(zero_copy_only=False)
    keep = t.column("keep").to_numpy(zero_copy_only=False).astype(bool)
    if (len(keep), int((~keep).sum())) != (summary.get("samples"), summary.get("dropped")):
        raise FormatError(f"{path}: {len(keep)} scored samples, {int((~keep).sum())} dropped; its "
                          f"{FILTER_SUMMARY_NAME} says {summary.get('samples')} and {summary.get('dropped')}: "
                          f"rerun filter-labels")
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

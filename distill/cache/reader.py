"""Read a finished cache: ``open_cache(dir)`` -> ``Cache``. Lazy: opening reads only the manifest;
tables are read per shard and per column on demand. No teacher code, no Ray; torch is imported only
to replay views, matplotlib (``distill[viz]``) only to draw them, pandas only for ``to_pandas``.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import storage
from ..format import (ARROW_ENTRY_KEY, ARROW_RUN_ID_KEY, CACHE_FORMAT, CACHE_VERSION, DIGEST_COLUMN,
                      ENTRY_CROSS_CHECKED, LOGICAL_COLUMNS, MANIFEST_NAME, RUN_NAME, SHARD_DIR, CacheFile,
                      RemoteArrowFile, cache_file_name, cache_file_path, check_cache_names, check_manifest,
                      decode_cache_shard, read_ipc, sample_digest)
from ..files import FormatError, UserError, inside, read_json

_READ_THREADS = min(4, os.cpu_count() or 1)
_KEEP_OBJECTS = 64          # remote shard files whose footers a process keeps


class Cache:
    def __init__(self, path: str | os.PathLike, shards_dir: str | os.PathLike | None = None):
        self.remote = storage.is_remote(path)
        self.path = storage.text(path).rstrip("/") if self.remote else storage.local_path(path)
        if self.remote:
            m = _read_remote_manifest(self.path)
        elif not self.path.is_dir():
            raise UserError(f"cache directory not found: {self.path}")
        else:
            m = _read_manifest(self.path)
        self.manifest = m
        self._checked: set[str] = set()      # shard files already checked against the manifest
        self._objects: dict[str, RemoteArrowFile] = {}     # a remote cache's files, footers fetched
        self._digests: dict[str, np.ndarray | None] = {}   # a remote cache's digests, fetched ahead
        self._owner, self._lock_ = os.getpid(), threading.RLock()
        source = m.get("source") if isinstance(m.get("source"), dict) else {}
        self._shards_dir = storage.path(shards_dir if shards_dir else str(source.get("dir", ".")))

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
    def view_spec(self):
        """How this cache's views were made (``data.views.ViewSpec``): its policy, or the centre view of a
        scoring cache. Refuses a policy version this distill cannot replay."""
        from ..data import views
        return views.ViewSpec.from_manifest(self.manifest)

    @property
    def policy(self):
        return self.view_spec.policy

    @property
    def is_scoring(self) -> bool:
        """A filter-labels scoring cache: one deterministic centre view per sample, not augmented views."""
        return bool((self.manifest.get("view") or {}).get("center_crop"))

    def __repr__(self) -> str:
        return (f"Cache({str(self.path)!r}: {self.num_samples} samples x {self.epochs} epochs = {self.num_records} records, "
                f"top-{self.topk} of {self.num_classes} classes, {len(self.shard_names)} shards)")

    # ------------------------------------------------------------------ tables
    @cached_property
    def _entries(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.manifest["shards"]}

    def _entry(self, shard: str) -> dict:
        try:
            return self._entries[shard]
        except KeyError:
            raise UserError(f"no shard {shard!r} in this cache (have {self.shard_names[:5]}...)") from None

    def file_path(self, shard: str) -> Path | str:
        """Where the shard's cache file is: the manifest's ``file`` in the cache directory, refused when
        it is a symbolic link that leads outside (not checked against the manifest: see ``file``); in
        a store, the object's URL (a plain name under the cache's prefix: ``check_cache_names``)."""
        if self.remote:
            return storage.join(self.path, self._entry(shard)["file"])
        return cache_file_path(self.path, self._entry(shard), self.path / MANIFEST_NAME)

    @property
    def _lock(self) -> threading.RLock:
        """This process's lock: a forked DataLoader worker gets a fresh one (and the parent's fetched
        bytes, which are still good)."""
        if self._owner != os.getpid():
            self._owner, self._lock_ = os.getpid(), threading.RLock()
        return self._lock_

    def __getstate__(self):                      # to spawned DataLoader workers: no fetched bytes, no lock
        return {k: v for k, v in self.__dict__.items() if k not in ("_objects", "_digests", "_lock_", "_owner")}

    def __setstate__(self, state):
        self.__dict__.update(state, _objects={}, _digests={}, _owner=os.getpid(), _lock_=threading.RLock())

    def file(self, shard: str) -> Path:
        """The shard's cache file, checked against the manifest the first time it is used: its size, its
        sha256, then its footer's facts (a damaged or foreign file is named, with the way to find all of
        them: distill verify)."""
        if shard not in self._checked:
            self.open_file(shard).close()
        return self.file_path(shard)

    def mark_checked(self, shards) -> None:
        """Files already checked against the manifest (e.g. by train-student before its first step), so
        that later reads (DataLoader workers inherit this) do not hash them again."""
        self._checked.update(shards)

    def physical(self, shard: str, columns=None) -> pa.Table:
        """The shard's file as stored (FORMAT.md 2.2: E*N rows, epoch-major), all of it or ``columns``."""
        return _read_columns(self.file(shard), columns)

    def open_file(self, shard: str) -> CacheFile:
        """The shard's file opened for reading only the epochs, samples and columns asked for; the first
        time, checked against the manifest (``file_problem``) on the same open file."""
        entry, f = self._entry(shard), self.file_path(shard)
        if self.remote:
            return self._open_object(shard, entry, f)
        if shard in self._checked:
            return CacheFile(f)
        problem, cf = _checked_open(f, entry, self.manifest)
        if problem:
            raise FormatError(f"cache file {problem}: the cache is damaged; run distill verify {self.path}")
        self._checked.add(shard)
        return cf

    def _open_object(self, shard: str, entry: dict, url: str) -> CacheFile:
        """A remote shard file: its footer fetched once per process (a few shards' kept), checked the first
        time against the manifest (size, then the footer's facts); its record batches are checked by
        their CRC-32 as they are read (a store's file is not hashed whole: that would read every epoch)."""
        with self._lock:
            obj = self._objects.get(shard)
        if obj is None:
            obj = RemoteArrowFile(url)            # its requests made outside the lock: others go on meanwhile
        with self._lock:
            obj = self._objects.pop(shard, obj)
            self._objects[shard] = obj
            while len(self._objects) > _KEEP_OBJECTS:
                self._objects.pop(next(iter(self._objects)))
            cf = CacheFile(url, source=obj.cursor())
            if shard not in self._checked:
                problem = (f"{url}: size {obj.size} != manifest {entry['file_bytes']}" if obj.size != entry["file_bytes"]
                           else _footer_problem(cf, entry, self.manifest))
                if problem:
                    raise FormatError(f"cache file {problem}: the cache is damaged; run distill verify {self.path}")
                self._checked.add(shard)
        return cf

    def prefetch_later(self, shard: str, epoch: int, columns=()) -> None:
        """A remote cache: fetch what reading ``columns`` of the shard at ``epoch`` will read (the file's
        footer, that epoch's record batches, the class dictionaries) and its digests, in the background,
        so that the read that follows does not wait on the store (a failure here is left for that read
        to meet and report)."""
        if self.remote:
            storage.background(self._prefetch, shard, epoch, list(columns))

    def _prefetch(self, shard: str, epoch: int, columns: list) -> None:
        try:
            with self.open_file(shard) as cf:
                pe = cf.per_epoch
                cf._remote.prefetch_batches(epoch * pe, epoch * pe + pe - 1)
                if columns:
                    cf.read(epochs=[epoch], columns=columns)       # the ranges it reads stay held
                digests = cf.digests()
            with self._lock:
                self._digests[shard] = digests
                while len(self._digests) > _KEEP_OBJECTS:
                    self._digests.pop(next(iter(self._digests)))
        except Exception:  # noqa: BLE001 - the read that follows meets it and says it in one line
            pass

    def shard_table(self, shard: str, epochs=None, columns=None, rows: tuple[int, int] | None = None) -> pa.Table:
        """The logical records of one shard; only the record batches of ``epochs`` (and of the samples in
        ``rows`` = (start, stop)) and the columns behind ``columns`` are read and decompressed."""
        with self.open_file(shard) as f:
            return f.read(epochs, columns, rows)

    def _names(self, shards) -> list[str]:
        names = self.shard_names if shards is None else [shards] if isinstance(shards, str) else list(shards)
        for n in names:
            self._entry(n)
        return names

    def to_table(self, epochs=None, shards=None, columns=None) -> pa.Table:
        """The logical view (key, shard, epoch, seed, topk_idx, topk_prob, label, label_prob), one row per
        (sample, epoch) in spec order. Lazy: only the named shards' files, the record batches of
        ``epochs`` (all by default) and the physical columns behind ``columns`` are read (in parallel)."""
        names = self._names(shards)
        cols = list(LOGICAL_COLUMNS if columns is None else columns)
        if not names:
            return decode_cache_shard(_empty_physical(), epochs, cols)
        inner = [c for c in cols if c != "shard"]

        def one(name: str) -> pa.Table:
            t = self.shard_table(name, epochs, inner or ["epoch"])
            if "shard" not in cols:
                return t
            t = t.add_column(0, "shard", _repeat_strings([name], np.array([t.num_rows], dtype=np.int64)))
            return t.select(cols)

        if len(names) == 1:
            return one(names[0])
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            return pa.concat_tables(list(pool.map(one, names)))

    def iter_tables(self, epochs=None, shards=None, columns=None):
        """Yield the logical view one shard at a time (constant memory over any cache size)."""
        for n in self._names(shards):
            yield self.shard_table(n, epochs, columns)

    def to_pandas(self, epochs=None, shards=None, columns=None):
        """``to_table(...)`` as a pandas DataFrame (needs pandas: ``pip install 'distill[viz]'``)."""
        _need_pandas("Cache.to_pandas")
        return self.to_table(epochs, shards, columns).to_pandas()

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, item):
        """``cache[i]``: record i (``to_table`` order, negative from the end) as a dict;
        ``cache["label_prob"]``: one logical column over the whole cache (a pyarrow ChunkedArray)."""
        if isinstance(item, str):
            return self.to_table(columns=[item]).column(0)
        i = operator.index(item)
        i += self.num_records if i < 0 else 0
        if not 0 <= i < self.num_records:
            raise IndexError(f"record {item} out of range: this cache holds {self.num_records} records")
        for e in self.manifest["shards"]:
            if i < e["records"]:
                row, epoch = divmod(i, self.epochs)
                return self._row(e["name"], row, [epoch])[0]
            i -= e["records"]
        raise IndexError(f"record {item} not found (manifest totals disagree with its shards)")

    def __iter__(self):
        """Records as dicts, one shard decoded at a time."""
        for t in self.iter_tables():
            yield from t.to_pylist()

    @property
    def column_names(self) -> list[str]:
        return list(LOGICAL_COLUMNS)

    def keys(self, shard: str | None = None) -> "Keys":
        """Sample keys in record order (one shard's when ``shard`` is given): a read-only sequence of str
        over an Arrow array, so 14M keys stay ~25 B each instead of a Python object each."""
        return Keys(pa.chunked_array([self._keys_of(n) for n in self._names(shard)], type=pa.string()))

    def _keys_of(self, shard: str) -> pa.Array:
        with self.open_file(shard) as f:
            return f.keys()

    def digests(self, shard: str) -> np.ndarray | None:
        """Each sample's ``format.sample_digest`` (its image bytes and label when the cache was made) in
        row order, or None for a cache made before they were recorded."""
        with self._lock:
            if shard in self._digests:
                return self._digests[shard]
        with self.open_file(shard) as f:
            return f.digests()

    def has_digests(self, shard: str) -> bool:
        """Whether the shard's file records per-sample digests (footer only, no data read)."""
        with self.open_file(shard) if self.remote else CacheFile(self.file_path(shard)) as f:
            return f.schema.get_field_index(DIGEST_COLUMN) >= 0

    def check_sample(self, shard: str, row: int, key: str, data: bytes, label, digests: np.ndarray | None) -> None:
        """Stop (one line) when the sample read from the shard now is not the one the cache's row was
        made from: its image bytes or label changed since cache-teacher ran."""
        if digests is not None and (label is None or sample_digest(data, label) != int(digests[row])):
            raise FormatError(f"shard {shard}: sample {key!r} changed since the cache {self.path} was made (its image "
                              f"bytes or label differ from the digest cache-teacher recorded); rebuild the cache "
                              f"for this shard (rerun cache-teacher) or restore the shard")

    # ------------------------------------------------------------------ single records
    @cached_property
    def _key_index(self) -> tuple[pa.ChunkedArray, np.ndarray]:
        """Every key (one Arrow string array per shard, read once) and the first row of each shard."""
        keys = self.keys().arrow
        return keys, np.cumsum([0] + [len(c) for c in keys.chunks])

    def locate(self, key: str) -> tuple[str, int]:
        """(shard, row) of a sample key: a scan of the keys in Arrow (no Python dict of all keys)."""
        import pyarrow.compute as pc
        keys, starts = self._key_index
        i = pc.index(keys, pa.scalar(key, pa.string())).as_py() if len(keys) else -1
        if i < 0:
            raise KeyError(f"key {key!r} is not in this cache")
        s = int(np.searchsorted(starts, i, side="right")) - 1
        return self.shard_names[s], i - int(starts[s])

    def _row(self, shard: str, row: int, epochs) -> list[dict]:
        """The records of one sample at ``epochs`` as dicts (only that sample's record batches are read)."""
        return self.shard_table(shard, epochs, rows=(row, row + 1)).to_pylist()

    def _check_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"epoch {epoch} out of range 0..{self.epochs - 1}")

    def record(self, key: str, epoch: int) -> dict:
        self._check_epoch(epoch)
        shard, row = self.locate(key)
        return self._row(shard, row, [epoch])[0]

    def soft_target(self, key: str, epoch: int, fill: str = "uniform") -> np.ndarray:
        r = self.record(key, epoch)
        return dense_target(np.array(r["topk_idx"]), np.array(r["topk_prob"], dtype=np.float32), self.num_classes, fill)

    # ------------------------------------------------------------------ replay
    def shard_path(self, shard: str) -> Path:
        """The source shard (a plain file name, e.g. from the manifest or a filter's scores) in the
        shard directory."""
        p = inside(self._shards_dir, shard, "cannot read shard", SHARD_DIR)
        if not p.exists():
            raise UserError(f"source shard {p} not found; pass shards_dir= to open_cache")
        return p

    def _block(self, key: str):
        """Positions of the mixing block that holds key: (shard, keys of the block, index in block)."""
        shard, row = self.locate(key)
        mb = self.policy.mix_block
        start = row // mb * mb
        keys = self._keys_of(shard)[start:start + mb].to_pylist()
        return shard, keys, row - start

    def _sources(self, shard: str, keys: list[str]) -> dict:
        """The source images of ``keys`` from their shard, each checked against the cache's digest."""
        from ..data import augment, shards as shardio
        got = shardio.read_samples(self.shard_path(shard), keys)
        digests = self.digests(shard)
        for k, s in got.items():
            self.check_sample(shard, self.locate(k)[1], k, s.data, s.label, digests)
        return {k: augment.SourceImage(s.data) for k, s in got.items()}

    def augmentation(self, key: str, epoch: int) -> dict:
        """The decoded augmentation parameters of (key, epoch), with the mix partner and lambda when mixed."""
        from ..data import views
        self._check_epoch(epoch)
        shard, keys, pos = self._block(key)
        seeds = self._seeds(shard, keys, epoch)
        src = self._sources(shard, [key])[key]
        params = dict(views.params(self.view_spec, seeds[pos], src))
        plan = views.block_plan(self.view_spec, seeds)[pos]
        if plan is not None:
            params["mix"] = dict(plan, partner_key=keys[plan["partner"]])
        return params

    def _seeds(self, shard: str, keys: list[str], epoch: int) -> list[int]:
        _, row = self.locate(keys[0])
        return self.shard_table(shard, [epoch], ["seed"], rows=(row, row + len(keys))).column("seed").to_pylist()

    def side(self, view: str, size: int | None = None, mean=None, std=None) -> tuple[int, tuple, tuple]:
        """(size, mean, std) of a side: ``teacher`` (the manifest's preprocessing) or ``student``
        (``policy.size`` and ImageNet normalisation), each overridable."""
        from ..data import augment
        size = self._side_size(view, size)
        if view == "teacher":
            return size, tuple(mean or self.teacher["mean"]), tuple(std or self.teacher["std"])
        return size, tuple(mean or augment.IMAGENET_MEAN), tuple(std or augment.IMAGENET_STD)

    def view_tensor(self, key: str, epoch: int, side: str = "teacher", size: int | None = None, mean=None, std=None):
        """The normalised tensor of (key, epoch) as that side saw it (teacher: the manifest's preprocessing)."""
        from ..data import views
        self._check_epoch(epoch)
        shard, keys, pos = self._block(key)
        size, mean, std = self.side(side, size, mean, std)
        seeds = self._seeds(shard, keys, epoch)
        plan = views.block_plan(self.view_spec, seeds)[pos]
        srcs = self._sources(shard, [keys[pos]] + ([keys[plan["partner"]]] if plan else []))
        return views.view_tensor(self.view_spec, srcs, keys, seeds, pos, size, mean, std)

    def image(self, key: str):
        """The sample's source image (PIL, RGB, full resolution) from its shard."""
        from ..data import augment
        shard, _ = self.locate(key)
        return augment.open_image(self._sources(shard, [key])[key].data)

    def replay(self, key: str, epoch: int, view: str = "teacher", size: int | None = None):
        """The view of (key, epoch) as a PIL image, exactly as cache-teacher cut it, before normalisation.

        ``view="teacher"``: at the manifest's teacher input size; ``"student"``: at ``policy.size``
        (or ``size``). These are the pixels of ``data.views.render``: crop + resize, flip, RandAugment ops
        or colour jitter. Random erasing (``params["erase"]``) and Mixup/CutMix (``params["mix"]``,
        see ``augmentation``) act later, on the normalised tensor; ``view_tensor`` returns that tensor,
        and ``show`` draws it. For a record without erasing or mixing,
        ``augment.to_tensor(replay(...), {}, mean, std)`` equals ``view_tensor(...)`` bit for bit.
        """
        from ..data import views
        self._check_epoch(epoch)
        size = self._side_size(view, size)
        shard, keys, pos = self._block(key)
        src = self._sources(shard, [key])[key]
        return views.render(self.view_spec, self._seeds(shard, keys, epoch)[pos], src, size)

    def _side_size(self, view: str, size: int | None) -> int:
        if view not in ("teacher", "student"):
            raise UserError(f"view must be 'teacher' or 'student', got {view!r}")
        return size or (self.teacher["input_size"] if view == "teacher" else self.policy.size)

    def show(self, key: str, epochs=None, view: str = "teacher", size: int | None = None):
        """A matplotlib figure of (key, epochs): the source image with the crop boxes, then per epoch the
        view as the model saw it (erasing and mixing included) above bars of its top-K classes by name.
        ``epochs``: an int, a list, or None for the first 8. Needs ``distill[viz]``."""
        from ..figures import show_cache_views
        return show_cache_views(self, key, epochs, view, size)


class Keys:
    """Sample keys as a sequence of str backed by an Arrow string array (``.arrow``); slicing gives Keys."""

    def __init__(self, arrow: pa.ChunkedArray):
        self.arrow = arrow

    def __len__(self) -> int:
        return len(self.arrow)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return Keys(self.arrow.slice(start, max(0, stop - start)))
            return Keys(pa.chunked_array([self.arrow.take(pa.array(range(start, stop, step)))], type=pa.string()))
        return self.arrow[operator.index(i) + (len(self) if i < 0 else 0)].as_py()

    def __iter__(self):
        for chunk in self.arrow.chunks:
            yield from chunk.to_pylist()

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, tuple, Keys)) else NotImplemented

    def to_pylist(self) -> list[str]:
        return self.arrow.to_pylist()

    def __repr__(self) -> str:
        head = ", ".join(repr(k) for k in self[:3])
        return f"Keys([{head}{', ...' if len(self) > 3 else ''}], {len(self)} keys)"


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
    """Open a finished cache directory (reads only manifest.json). ``shards_dir``: where the source
    shards are now, when they moved since cache-teacher ran (needed only to replay views)."""
    return Cache(path, shards_dir)


def old_version(path, version) -> str:
    """The one line that refuses a cache of another format version (and names the converter)."""
    from ..format import CONVERT_HINT
    if isinstance(version, int) and version < CACHE_VERSION:
        return (f"{path} is a cache of format version {version}; this distill reads version {CACHE_VERSION}: "
                f"convert it with {CONVERT_HINT.replace('OLD', str(path))} (it rewrites the files, the records stay the same)")
    return f"cache format version {version} is not supported (expected {CACHE_VERSION}): made by a newer distill?"


def _empty_physical() -> pa.Table:
    from ..format import encode_cache_shard
    return encode_cache_shard([], [], np.zeros((0, 1), np.uint32), np.zeros((0, 1, 1), np.int64),
                              np.zeros((0, 1, 1)), np.zeros((0, 1)), num_classes=1)


def _read_remote_manifest(url: str) -> dict:
    """A cache manifest in an object store, checked like a local one; none there is one line."""
    where = storage.join(url, MANIFEST_NAME)
    if not storage.exists(where):
        raise UserError(f"no cache at {url}: {MANIFEST_NAME} not found (a cache is complete once its manifest is written)")
    try:
        m = json.loads(storage.read_bytes(where))
    except ValueError as e:
        raise FormatError(f"cache manifest is not valid JSON: {where} ({e})") from None
    if not isinstance(m, dict) or m.get("format") != CACHE_FORMAT:
        raise FormatError(f"{url} is not a distill cache (format={m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("version") not in (None, CACHE_VERSION):
        raise FormatError(old_version(url, m.get("version")))
    check_manifest(m, where)
    check_cache_names(m, where)
    return m


def _read_manifest(path: Path) -> dict:
    """The manifest of a finished cache, checked (``format.check_manifest``); a directory without one
    (a cache-teacher run that did not finish) or with an incomplete shard is refused in one line that
    names the shards left to do and how to finish them."""
    if not (path / MANIFEST_NAME).exists() and (path / RUN_NAME).exists():
        raise FormatError(unfinished(path))
    m = read_json(path / MANIFEST_NAME, "cache manifest (is the cache complete?)")
    if isinstance(m, dict) and m.get("format") == CACHE_FORMAT and m.get("version") not in (None, CACHE_VERSION):
        raise FormatError(old_version(path, m.get("version")))
    if not isinstance(m, dict) or m.get("format") != CACHE_FORMAT:
        raise FormatError(f"{path} is not a distill cache (format={m.get('format') if isinstance(m, dict) else None!r})")
    check_manifest(m, path / MANIFEST_NAME)         # its shape, sums, run_id and names
    bad = [e["name"] for e in m["shards"] if e.get("complete") is False]
    if bad:
        raise FormatError(f"{path} is not a complete cache: shard(s) {', '.join(bad[:3])}"
                          f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} hit read errors ({FINISH_HINT})")
    return m


FINISH_HINT = ("rerun the cache-teacher command that made it, same flags and --out: it redoes only what is not "
               "done; a shard that fails again is damaged: rewrite it, or leave it out of --shards")


def unfinished(path: Path) -> str:
    """The line for a cache directory whose run did not finish: which shards have no finished file, and
    which finished with read errors (from the files' own footers)."""
    try:
        names = list(read_json(path / RUN_NAME, "cache run file").get("shard_set", []))
    except (FormatError, AttributeError):
        names = []
    missing, failed = [], []
    for n in names:
        try:
            with CacheFile(path / cache_file_name(n)) as f:
                entry = json.loads(f.schema.metadata.get(ARROW_ENTRY_KEY, b"{}"))
            if entry.get("errors"):
                failed.append(n)
        except (FormatError, ValueError, TypeError):
            missing.append(n)
    parts = [f"{len(missing)} of its {len(names)} shard(s) not done ({', '.join(missing[:3])}"
             f"{', ...' if len(missing) > 3 else ''})"] if missing else []
    parts += [f"{len(failed)} hit read errors ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''})"] if failed else []
    return f"{path} is not a complete cache (no {MANIFEST_NAME}): {'; '.join(parts) or 'its run did not finish'}; {FINISH_HINT}"


def file_problem(f: Path, entry: dict, manifest: dict) -> str | None:
    """How a shard's cache file ``f`` differs from its manifest entry, or None: missing, size, sha256,
    then its footer against the manifest (shard, samples, epochs, K, classes, run and entry fields)."""
    problem, cf = _checked_open(f, entry, manifest)
    if cf is not None:
        cf.close()
    return problem


def _checked_open(f: Path, entry: dict, manifest: dict) -> tuple[str | None, CacheFile | None]:
    """(None, the file opened for reading) when it matches its manifest entry (``file_problem``), else
    (the problem, None)."""
    from ..files import sha256_file
    source = None
    if storage.is_remote(f):                     # one whole read, hashed and then parsed from memory
        if not storage.exists(f):
            return f"{f}: missing", None
        data = storage.read_bytes(f)
        size, sha = len(data), hashlib.sha256(data).hexdigest()
        source = pa.BufferReader(data)
    elif not f.exists():
        return f"{f}: missing", None
    else:
        size, sha = f.stat().st_size, None
    if size != entry["file_bytes"]:
        return f"{f}: size {size} != manifest {entry['file_bytes']}", None
    if (sha or sha256_file(f)) != entry["file_sha256"]:
        return f"{f}: checksum differs from the manifest", None
    try:
        cf = CacheFile(f, source=source)
    except FormatError as e:
        return f"{f}: {e}", None
    try:
        problem = _footer_problem(cf, entry, manifest)
    except ValueError as e:
        problem = f"{f}: {e}"
    if problem:
        cf.close()
        return problem, None
    return None, cf


def _footer_problem(cf: CacheFile, entry: dict, manifest: dict) -> str | None:
    md = cf.meta
    footer = json.loads(md.get(ARROW_ENTRY_KEY.decode(), "{}"))
    want = {"shard": entry["name"], "samples": str(entry["samples"]), "epochs": str(manifest["epochs"]),
            "topk": str(manifest["topk"]), "num_classes": str(manifest["num_classes"]),
            "prob_dtype": manifest["prob_dtype"]}
    if ARROW_RUN_ID_KEY.decode() in md:          # cache-teacher's files name their run (synthetic ones may not)
        want[ARROW_RUN_ID_KEY.decode()] = manifest["run_id"]
    want.update({f"entry {k}": entry[k] for k in ENTRY_CROSS_CHECKED if k in footer})
    got = dict(md, **{f"entry {k}": footer[k] for k in ENTRY_CROSS_CHECKED if k in footer})
    differ = [k for k, v in want.items() if got.get(k) != v]
    if differ:
        k = differ[0]
        return f"{cf.path}: its {k} is {str(got.get(k))[:40]!r}, the manifest says {str(want[k])[:40]!r}"
    return None


def _read_columns(path: str | os.PathLike, columns=None, threads: bool = True) -> pa.Table:
    """An Arrow IPC file like ``format.read_ipc``, but reading (and decompressing) only ``columns``."""
    if not columns:
        return read_ipc(path)
    try:
        with (pa.BufferReader(storage.read_bytes(path)) if storage.is_remote(path) else pa.memory_map(str(path))) as src:
            schema = pa.ipc.open_file(src).schema
            missing = [c for c in columns if schema.get_field_index(c) < 0]
            if missing:
                raise KeyError(f"Field \"{missing[0]}\" does not exist in schema")
            fields = sorted({schema.get_field_index(c) for c in columns})
            opts = pa.ipc.IpcReadOptions(included_fields=fields, use_threads=threads)
            table = pa.ipc.open_file(src, options=opts).read_all()
    except FileNotFoundError:
        raise FormatError(f"cache file missing: {path}") from None
    except (pa.ArrowException, OSError) as e:      # a damaged file: bad footer, or zstd refuses a block
        raise FormatError(f"cache file unreadable: {path} ({str(e).splitlines()[0]}); run distill verify") from None
    return table.select(columns)


def _repeat_strings(values: list[str], counts: np.ndarray) -> pa.Array:
    """A string array holding values[i] counts[i] times, built from buffers (no per-row Python)."""
    enc = [v.encode() for v in values]
    lengths = np.repeat(np.array([len(b) for b in enc], dtype=np.int64), counts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = b"".join(b * int(c) for b, c in zip(enc, counts))
    arr = pa.Array.from_buffers(pa.large_string(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return arr.cast(pa.string())


def _need_pandas(what: str):
    try:
        import pandas
    except ImportError:
        raise ImportError(f"{what} needs pandas, which is not installed: pip install 'distill[viz]' "
                          f"(or pip install pandas)") from None
    return pandas

"""Where distill's files live: local paths, ``file://`` URLs and object stores (``s3://``, ``gs://``;
``https://`` read-only), through fsspec (s3fs, gcsfs, aiohttp: the extras ``distill[s3]``,
``distill[gcs]``, ``distill[http]``).

Credentials and endpoints come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...) or from
``set_options`` (the CLI's ``--storage-options JSON``); they stay in this process: nothing here writes
them, and ``redact`` takes their values out of any message.

Every request to a store is counted (``STATS``: GET requests, bytes fetched, PUT requests, bytes
sent), so a benchmark can say what an epoch or a pull costs.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import threading
from dataclasses import dataclass
from pathlib import Path

from . import hooks
from .files import UserError

REMOTE = ("s3", "gs", "gcs", "http", "https")
READ_ONLY = ("http", "https")
_EXTRA = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "session")

_options: dict = {}


@dataclass
class Stats:
    gets: int = 0
    bytes_in: int = 0
    puts: int = 0
    bytes_out: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()

    def add(self, gets: int = 0, bytes_in: int = 0, puts: int = 0, bytes_out: int = 0) -> None:
        with self._lock:
            self.gets += gets
            self.bytes_in += bytes_in
            self.puts += puts
            self.bytes_out += bytes_out

    def snapshot(self) -> dict:
        with self._lock:
            return {"gets": self.gets, "bytes_in": self.bytes_in, "puts": self.puts, "bytes_out": self.bytes_out}


STATS = Stats()


def set_options(options: dict | str | None) -> None:
    """Options for the store's filesystem (e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}``
    for s3fs), for this process only; a JSON text is parsed. Replaces the previous options."""
    global _options
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError as e:
            raise UserError(f"--storage-options is not JSON ({e.msg})") from None
    if options is not None and not isinstance(options, dict):
        raise UserError("--storage-options must be a JSON object")
    _options = dict(options or {})


def text(location) -> str:
    """A location as text: a path, or the URL of a remote ``path()``."""
    return str(location) if getattr(location, "protocol", "") not in ("", "file") else os.fspath(location)


def path(location):
    """A pathlib-like object for a location: ``pathlib.Path`` for a local one, else a
    ``upath.UPath`` (universal_pathlib, over the same fsspec filesystem) with this process's options."""
    loc = text(location)
    if not is_remote(loc):
        return local_path(loc).expanduser()
    try:
        from upath import UPath
    except ImportError:
        raise UserError(f"{scheme(loc)}:// needs universal_pathlib: pip install 'distill[{_EXTRA.get(scheme(loc))}]'") from None
    return UPath(loc, **_options)


def options() -> dict:
    """This process's store options (to hand to worker processes, never to write down)."""
    return dict(_options)


def scheme(location: str | os.PathLike) -> str:
    """``s3``, ``gs``, ``https``, ... for a URL; ``file`` for a path or ``file://`` URL."""
    text_ = text(location)
    head, sep, _ = text_.partition("://")
    return head.lower() if sep and head.isalnum() else "file"


def is_remote(location: str | os.PathLike) -> bool:
    return scheme(location) in REMOTE


def local_path(location: str | os.PathLike) -> Path:
    """A local location as a Path (``file://`` stripped)."""
    loc = text(location)
    return Path(loc[len("file://"):] if loc.lower().startswith("file://") else loc)


def _fs(location: str):
    """(fsspec filesystem, its path) of a remote location, for one request; a missing backend is one line
    naming the extra."""
    if hooks.ACTIVE:
        hooks.fire("store-request")
    s = scheme(location)
    try:
        import fsspec
        fs, path = fsspec.core.url_to_fs(location, **_options)
    except ImportError as e:
        raise UserError(f"{s}:// needs {getattr(e, 'name', None) or 'its fsspec backend'}: "
                        f"pip install 'distill[{_EXTRA.get(s, s)}]'") from None
    except ValueError as e:
        raise UserError(redact(f"{location}: {e}")) from None
    return fs, path


def join(location: str | os.PathLike, *parts: str) -> str:
    loc = text(location)
    if not is_remote(loc):
        return os.fspath(local_path(loc).joinpath(*parts))
    return posixpath.join(loc.rstrip("/"), *parts)


def name(location: str | os.PathLike) -> str:
    return posixpath.basename(text(location).rstrip("/"))


def _fail(location: str, e: BaseException) -> UserError:
    if isinstance(e, FileNotFoundError):
        return UserError(redact(f"not found: {location}"))
    if isinstance(e, PermissionError):
        return UserError(redact(f"access denied: {location} (check the store's credentials)"))
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(redact(f"cannot reach {location}: {text}"))


def size(location: str | os.PathLike) -> int:
    loc = text(location)
    if not is_remote(loc):
        return local_path(loc).stat().st_size
    fs, path = _fs(loc)
    try:
        return int(fs.size(path))
    except Exception as e:  # noqa: BLE001 - one line, whatever the backend raised
        raise _fail(loc, e) from None


def exists(location: str | os.PathLike) -> bool:
    loc = text(location)
    if not is_remote(loc):
        return local_path(loc).exists()
    fs, path = _fs(loc)
    try:
        fs.invalidate_cache(path)
        return bool(fs.exists(path))
    except Exception as e:  # noqa: BLE001
        raise _fail(loc, e) from None


def listdir(location: str | os.PathLike) -> list[str]:
    """The names of the objects directly under a prefix (or files in a directory), sorted."""
    loc = text(location)
    if not is_remote(loc):
        p = local_path(loc)
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []
    fs, path = _fs(loc)
    try:
        fs.invalidate_cache(path)
        return sorted(posixpath.basename(x.rstrip("/")) for x in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    except Exception as e:  # noqa: BLE001
        raise _fail(loc, e) from None


def read_bytes(location: str | os.PathLike, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of a file or object, or of its range [start, end) (one GET)."""
    loc = text(location)
    if not is_remote(loc):
        with open(local_path(loc), "rb") as f:
            f.seek(start or 0)
            return f.read() if end is None else f.read(end - (start or 0))
    fs, path = _fs(loc)
    try:
        data = fs.cat_file(path, start=start, end=end)
    except Exception as e:  # noqa: BLE001
        raise _fail(loc, e) from None
    STATS.add(gets=1, bytes_in=len(data))
    return data


def sha256(location) -> str:
    """The sha256 of a file or object (an object is read front to back in 8 MiB ranged requests)."""
    import hashlib
    loc = text(location)
    if not is_remote(loc):
        from .files import sha256_file
        return sha256_file(local_path(loc))
    h = hashlib.sha256()
    with RangeFile(loc, 8 << 20, ahead=True) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_json(location, what: str):
    """A JSON file or object; a missing one is ``FormatError(what not found: location)``."""
    from .files import FormatError, read_json as read_local
    loc = text(location)
    if not is_remote(loc):
        return read_local(local_path(loc), what)
    if not exists(loc):
        raise FormatError(f"{what} not found: {loc}")
    try:
        return json.loads(read_bytes(loc))
    except ValueError as e:
        raise FormatError(f"{what} is not valid JSON: {loc} ({e})") from None


def write_bytes(location: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> None:
    """Write a whole file or object: locally atomically (temp file, rename); to a store as one upload
    (multipart for large objects), which the store makes visible whole or not at all. ``exclusive``:
    only if nothing is there yet (``FileExistsError`` otherwise; on S3 a conditional put)."""
    loc = text(location)
    s = scheme(loc)
    if s in READ_ONLY:
        raise UserError(f"{s}:// is read-only: cannot write {loc}")
    if not is_remote(loc):
        p = local_path(loc)
        if exclusive:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "xb") as f:
                f.write(data)
            return
        from .files import atomic_write_bytes
        atomic_write_bytes(p, data)
        return
    fs, path = _fs(loc)
    try:
        if exclusive:
            fs.pipe_file(path, data, mode="create")
        else:
            fs.pipe_file(path, data)
    except FileExistsError:
        raise
    except Exception as e:  # noqa: BLE001
        if "PreconditionFailed" in str(e) or "412" in str(e):
            raise FileExistsError(loc) from None
        raise _fail(loc, e) from None
    STATS.add(puts=1, bytes_out=len(data))
    if hooks.ACTIVE:
        hooks.fire("atomic-write", name=name(loc), before=False)


def remove(location: str | os.PathLike) -> None:
    loc = text(location)
    if not is_remote(loc):
        local_path(loc).unlink(missing_ok=True)
        return
    fs, path = _fs(loc)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001
        raise _fail(loc, e) from None


_POOL = None
_POOL_LOCK = threading.Lock()
_GEN = 0                          # bumped in a forked child: the parent's background fetches are not its own


def background(fn, *args):
    """Run ``fn(*args)`` in this process's small pool of request threads (made on first use; a
    DataLoader worker has its own, forked or spawned); returns the Future."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor
            _POOL = ThreadPoolExecutor(4, thread_name_prefix="distill-store")
    fut = _POOL.submit(fn, *args)
    fut.distill_gen = _GEN
    return fut


def _mine(fut) -> bool:
    """Whether a background fetch belongs to this process (one inherited through fork never finishes)."""
    return getattr(fut, "distill_gen", None) == _GEN


def _after_fork() -> None:
    global _POOL, _POOL_LOCK, _GEN, _WARM, _WARM_LOCK
    _POOL, _POOL_LOCK, _GEN = None, threading.Lock(), _GEN + 1
    _WARM, _WARM_LOCK = {}, threading.Lock()
    STATS._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


class RangeFile:
    """A read-only, seekable file over an object, for tarfile and pyarrow: each read past what is held
    is one ranged GET of at least ``block`` bytes; with ``ahead`` (a file read front to back, like a tar
    shard) the next block is fetched in the background meanwhile, so the reader does not wait on the
    store's latency. ``prefetch`` fetches given ranges in one GET each (e.g. one epoch's record
    batches); ``prefetch_later`` does it in the background. What is held is bounded: the last 16
    ranges, and those pinned (``pin``). Local files are opened as themselves (``open_input``)."""

    def __init__(self, location: str, block: int = 1 << 20, ahead: bool = False):
        self.location, self.block, self.ahead = location, block, ahead
        self.size = size(location)
        self.pos = 0
        self._held: list[tuple[int, bytes]] = []     # (start, bytes), most recent last
        self._pinned: list[tuple[int, bytes]] = []   # kept for good (e.g. a footer)
        self.keep: tuple[int, int] | None = None     # reads inside [start, end) are kept for good too
        self._pending: dict[tuple[int, int], object] = {}    # (start, end) -> Future of a background fetch
        self._owner, self._lock_ = os.getpid(), threading.RLock()
        self.closed = False

    def cursor(self) -> "RangeFile":
        """Another reader of the same object: its own position, the same held bytes and fetches (one
        per thread that reads)."""
        import copy
        other = copy.copy(self)
        other.pos = 0
        return other

    @property
    def _lk(self) -> threading.RLock:
        """This process's lock (a forked child gets a fresh one, and none of the parent's fetches)."""
        if self._owner != os.getpid():
            self._owner, self._lock_, self._pending = os.getpid(), threading.RLock(), {}
        return self._lock_

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock_", "_pending", "_owner")}

    def __setstate__(self, state):
        self.__dict__.update(state, _owner=os.getpid(), _lock_=threading.RLock(), _pending={})

    def prefetch(self, ranges) -> None:
        for start, end in ranges:
            end = min(end, self.size)
            if end > start and self._find(start, end) is None:
                got = read_bytes(self.location, start, end)
                with self._lk:
                    self._hold(start, got)

    def prefetch_later(self, start: int, end: int) -> None:
        """Fetch [start, end) in the background, unless held or on its way already."""
        end = min(end, self.size)
        with self._lk:
            if end <= start or _mine(self._pending.get((start, end))) or self._find(start, end) is not None:
                return
            self._pending[(start, end)] = background(self._fetch_later, start, end)

    def _fetch_later(self, start: int, end: int) -> None:
        try:
            got = read_bytes(self.location, start, end)
            with self._lk:
                self._hold(start, got)
        finally:
            with self._lk:
                self._pending.pop((start, end), None)

    def pin(self, start: int, end: int) -> bytes:
        """Fetch [start, end) once and keep it for as long as this file lives."""
        data = self._find(start, end)
        if data is None:
            data = read_bytes(self.location, start, min(end, self.size))
            with self._lk:
                self._pinned.append((start, data))
        return data

    def _hold(self, start: int, data: bytes) -> None:
        self._held.append((start, data))
        del self._held[:-16]                         # bounded: the last few ranges only

    def _find(self, start: int, end: int) -> bytes | None:
        with self._lk:
            for s, data in (*reversed(self._held), *self._pinned):
                if s <= start and end <= s + len(data):
                    return data[start - s:end - s]
        return None

    def _wait(self, start: int, end: int) -> None:
        """Wait for a background fetch that covers [start, end), if one is on its way."""
        with self._lk:
            futures = [f for (s, e), f in self._pending.items() if s <= start and end <= e and _mine(f)]
        for f in futures:
            f.result()

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        data = self._find(self.pos, end)
        if data is None:
            self._wait(self.pos, end)
            data = self._find(self.pos, end)
        if data is None:
            fetch_end = min(self.size, max(end, self.pos + self.block))
            got = read_bytes(self.location, self.pos, fetch_end)
            with self._lk:
                if self.keep and self.keep[0] <= self.pos and fetch_end <= self.keep[1]:
                    self._pinned.append((self.pos, got))      # a range the owner keeps (``keep``)
                else:
                    self._hold(self.pos, got)
            data = got[:end - self.pos]
            if self.ahead and fetch_end < self.size:
                self.prefetch_later(fetch_end, fetch_end + self.block)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        """Nothing to release but memory: what is held stays, so the file may be read again (pyarrow
        closes its wrapper after each open; a reader reopens the same RangeFile)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_WARM: dict = {}                  # location -> Future of a RangeFile opened ahead (``warm``)
_WARM_KEEP = 8
_WARM_LOCK = threading.Lock()


def warm(location, block: int = 8 << 20) -> None:
    """Open an object ahead, in the background: its size and its first ``block`` bytes, for the next
    ``open_input(location, block, ahead=True)`` to take (a few are kept; local files: nothing to do)."""
    loc = text(location)
    if not is_remote(loc):
        return
    with _WARM_LOCK:
        if loc in _WARM:
            return
        _WARM[loc] = background(_opened, loc, block)
        while len(_WARM) > _WARM_KEEP:
            _WARM.pop(next(iter(_WARM)))


def _opened(loc: str, block: int) -> "RangeFile":
    f = RangeFile(loc, block, ahead=True)
    f.prefetch([(0, block)])
    return f


def open_input(location: str | os.PathLike, block: int = 1 << 20, ahead: bool = False):
    """A seekable binary file to read: the local file itself, or a ``RangeFile`` over the object (the one
    ``warm`` opened, when there is one)."""
    loc = text(location)
    if not is_remote(loc):
        return open(local_path(loc), "rb")
    with _WARM_LOCK:
        pending = _WARM.pop(loc, None) if ahead else None
    if pending is not None:
        try:
            f = pending.result()
            if f.block == block:
                return f
        except Exception:  # noqa: BLE001 - opened again below, where a failure is reported
            pass
    return RangeFile(loc, block, ahead)


def redact(text: str) -> str:
    """``text`` without the value of any secret it might hold: the storage options' and the
    environment's credentials (variables named like keys, secrets, tokens, passwords)."""
    secrets = [str(v) for k, v in _options.items() if any(w in k.lower() for w in _SECRET_WORDS)]
    secrets += [v for k, v in os.environ.items()
                if k.startswith(("AWS_", "GOOGLE_", "GCS_", "AZURE_")) and any(w in k.lower() for w in _SECRET_WORDS)]
    for s in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(s, "***")
    return text


def etag(location) -> str | None:
    """The store's entity tag of an object (changes whenever its bytes are rewritten), or None."""
    loc = text(location)
    if not is_remote(loc):
        return None
    fs, path = _fs(loc)
    try:
        fs.invalidate_cache(path)
        return str(fs.info(path).get("ETag") or "") or None
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001
        raise _fail(loc, e) from None


LOCK_NAME = ".distill.lock"


@contextlib.contextmanager
def claim_prefix(location: str, stage: str, marks: tuple, overwrite_hint: str = "--out"):
    """``with claim_prefix(url, "cache-teacher", marks):`` an output prefix in an object store, held for
    this run: refused when it holds objects and none of ``marks`` ((name, {key: value}) JSON objects a
    stage writes first) says they are this stage's; locked by a conditional put of ``.distill.lock``
    (S3's If-None-Match: a second writer is refused), which is deleted at the end. A run killed hard
    leaves its lock: one of this host whose process is gone is taken over; another host's is refused
    in one line that says when and where it was taken and how to remove it."""
    import datetime
    import socket
    names = [n for n in listdir(location) if n != LOCK_NAME]
    if names and not any(_marked(join(location, n), fields) for n, fields in marks if n in names):
        raise UserError(f"{overwrite_hint} {location} holds objects that are not a distill {stage} output "
                        f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): choose an empty prefix")
    lock = join(location, LOCK_NAME)
    me = {"what": stage, "host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for attempt in (0, 1):
        try:
            write_bytes(lock, json.dumps(me).encode(), exclusive=True)
            break
        except FileExistsError:
            try:
                held = json.loads(read_bytes(lock))
            except (UserError, ValueError):
                held = {}
            if attempt == 0 and held.get("host") == me["host"] and not _alive(held.get("pid")):
                remove(lock)                     # this host's run that died: its lock is stale
                continue
            raise UserError(f"{location} is being written by distill {held.get('what', '?')} (pid {held.get('pid', '?')} "
                            f"on {held.get('host', '?')}, since {held.get('started', '?')}); wait for it, or, if that "
                            f"run is dead, delete {lock} and rerun") from None
    try:
        yield location
    finally:
        remove(lock)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def _marked(location: str, fields: dict) -> bool:
    try:
        doc = json.loads(read_bytes(location))
    except (UserError, ValueError):
        return False
    return isinstance(doc, dict) and all(k in doc and (v is None or doc[k] == v) for k, v in fields.items())

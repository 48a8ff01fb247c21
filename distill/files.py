"""General file helpers every layer uses: the user-facing errors, checksums, atomic writes, JSON
reading and the output-directory lock. No torch, no Ray, no import-time side effects.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import contextlib
import io
import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

from . import hooks


class UserError(Exception):
    """Bad input from the user (path, flag, config, data). The CLI prints it as one line and exits 2."""


class FormatError(UserError):
    """A file does not follow the format (missing, wrong version, inconsistent)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job): handled as Ctrl-C is, with its own exit status."""


# what to do about an OSError the machine gives on a path (disk full, read-only, no permission, ...)
_OS_FAULTS = {
    errno.ENOSPC: "the disk is full: free space or choose another directory",
    errno.EDQUOT: "the disk quota is used up: free space or choose another directory",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit",
    errno.EROFS: "it is on a read-only file system: choose a writable directory",
    errno.EACCES: "permission denied: fix its permissions or choose another directory",
    errno.EPERM: "operation not permitted: fix its permissions or choose another directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "it is a directory where a file was expected: choose another path",
}


def os_fault(e: OSError) -> str | None:
    """``PATH: what happened; what to do`` for an OSError the machine gave on a path (``_OS_FAULTS``);
    None for any other error (a bug: its traceback is wanted)."""
    advice = _OS_FAULTS.get(e.errno)
    if advice is None:
        return None
    path = f"{e.filename}: " if e.filename else ""
    return f"{path}{e.strerror or os.strerror(e.errno)}; {advice}"


def plain_name(name: Any, what: str, where: str) -> str:
    """``name`` when it is a plain file name: a non-empty str without '/', '\\' or NUL, not '.' or '..'
    (so never absolute). Else one FormatError: ``{what} {name!r}, which is not a plain file name inside
    {where}``, e.g. what = "manifest.json: shard 'x' names file", where = "the cache directory"."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0") \
            or os.path.isabs(name):
        raise FormatError(f"{what} {name!r}, which is not a plain file name inside {where}")
    return name


def inside(directory: str | os.PathLike, name: Any, what: str, where: str) -> Path:
    """``directory / name`` for a name a manifest, index or other file gives (``plain_name``), refused
    when that path is a symbolic link that leads outside ``directory``. The message names the entry
    only: nothing about the file outside (size, existence, content)."""
    if getattr(directory, "protocol", "") not in ("", "file"):    # in an object store: no links
        return directory / plain_name(name, what, where)
    path = Path(directory) / plain_name(name, what, where)
    if path.is_symlink() and not path.resolve().is_relative_to(Path(directory).resolve()):
        raise FormatError(f"{what} {name!r}, which is a symbolic link that leads outside {where}")
    return path


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def error_text(e: BaseException) -> str:
    """``Type: message`` of an exception as recorded in outputs (skip reasons): without the parts that
    differ between identical runs, the addresses of object reprs (Pillow's ``cannot identify image file
    <_io.BytesIO object at 0x7f...>`` reads ``<_io.BytesIO object>``), so the same input writes the same bytes."""
    return f"{type(e).__name__}: {_ADDRESS.sub('', str(e))}"


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def digest(text: str) -> str:
    """A short stable id of a JSON text (run ids, key-set ids)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# the name of every file distill writes before renaming it into place: ``.<final name>.<12 hex>.tmp``;
# a killed run leaves such files behind, swept (by this pattern only) when a run next claims the directory
TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name for ``path`` in the same directory (``TEMP_RE``)."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike):
    """An open binary file under a temporary name in the same directory; on a clean exit it is fsynced
    and renamed onto ``path`` (readers see the old file or the whole new one, never a part), on an
    error removed. Created with mode 0666 so the process umask applies, as for ``open(path, "wb")``."""
    path = Path(path)
    tmp = temp_path(path)
    with writing(path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            if hooks.ACTIVE:
                hooks.fire("atomic-write", name=path.name, before=True)
            os.replace(tmp, path)
            if hooks.ACTIVE:
                hooks.fire("atomic-write", name=path.name, before=False)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """An OSError without a path (a write that found the disk full) raised inside names ``path``,
    the file being written, so that its one line (``os_fault``) says where."""
    try:
        yield
    except OSError as e:
        if e.filename or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_writer``)."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{what} is not valid JSON: {path} ({e})") from None


# ---------------------------------------------------------------------------------------------
# output-directory lock: <directory>/.distill.lock, created with O_EXCL, holds JSON
# {"host", "pid", "started", "what"}. A lock of this host whose pid is gone is stale and taken over.

LOCK_NAME = ".distill.lock"
# Taking over a stale lock is serialised by this second O_EXCL file, so two processes that both saw
# the same stale lock cannot both remove it and both win (the second would remove the first's new lock).
TAKEOVER_NAME = LOCK_NAME + ".takeover"
# An unreadable (half-written) lock or takeover file older than this is left over from a crash.
LOCK_STALE_UNREADABLE_S = 10.0
_LOCK_READ_WAIT_S = 0.5      # how long to wait for a writer to finish a lock file just created


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # exists, owned by someone else
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _read_lock(path: Path) -> tuple[bool, dict | None, float]:
    """(exists, info, mtime). info is None when the file is unreadable or not a complete lock."""
    try:
        mtime = os.stat(path).st_mtime
        data = path.read_bytes()
    except FileNotFoundError:
        return False, None, 0.0
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a distill lock file; remove it") from None
    except OSError as e:
        raise UserError(f"cannot read the lock file {path}: {e.strerror or e}") from None
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return True, None, mtime
    ok = (isinstance(info, dict) and isinstance(info.get("host"), str)
          and type(info.get("pid")) is int and info["pid"] > 0)
    return True, (info if ok else None), mtime


def _read_lock_settled(path: Path) -> tuple[bool, dict | None, float]:
    """Like _read_lock, but gives a young unreadable file a moment to be completed by its writer."""
    deadline = time.monotonic() + _LOCK_READ_WAIT_S
    while True:
        exists, info, mtime = _read_lock(path)
        if not exists or info is not None or time.time() - mtime > LOCK_STALE_UNREADABLE_S \
                or time.monotonic() >= deadline:
            return exists, info, mtime
        time.sleep(0.02)


def _pid_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), as text; None
    where unknown (no /proc, gone). With the pid it names one process: a pid reused later differs here."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()      # after "pid (comm) ": field 3 onwards
    return fields[19] if len(fields) > 19 else None


def _process_record() -> dict:
    """Who this process is, as locks and reader marks record it: host, pid, pid_start, started."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _is_mine(info: dict) -> bool:
    return info.get("host") == socket.gethostname() and info.get("pid") == os.getpid()


def _process_gone(info: dict) -> bool:
    """The process a lock or mark of THIS host names has ended: its pid is gone, or is now another
    process's (its start time differs from the one recorded)."""
    if not _pid_alive(info["pid"]):
        return True
    recorded = info.get("pid_start")
    return recorded is not None and _pid_start(info["pid"]) not in (None, recorded)


def _is_stale(info: dict | None, mtime: float) -> bool:
    """A lock nobody holds any more: its process on this host is gone, or it is unreadable and old."""
    if info is None:
        return time.time() - mtime > LOCK_STALE_UNREADABLE_S
    return info["host"] == socket.gethostname() and info["pid"] != os.getpid() and _process_gone(info)


def lock_holder(directory: str | os.PathLike) -> dict | None:
    """Who holds ``directory``'s lock, when it is a live lock of ANOTHER process; else None (no lock,
    a stale one, or this process's own). A lock of another host counts as live (its pid can't be
    checked). A lock being written (unreadable, young) gives {"host": "?", "pid": "?", ...}."""
    exists, info, mtime = _read_lock_settled(Path(directory) / LOCK_NAME)
    if not exists or _is_stale(info, mtime):
        return None
    if info is None:
        return {"host": "?", "pid": "?", "started": "?", "what": "?"}
    return None if _is_mine(info) else info


def _create_exclusive(path: Path, payload: bytes) -> bool:
    """Create ``path`` with O_EXCL and write ``payload``; False if it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return True


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class DirLock:
    """Exclusive use of an output directory by one distill run, as a context manager.

    ``with DirLock(out, "cache"):`` (acquired on enter) or ``lock = DirLock(out, "cache").acquire()``
    (acquired on enter). Not re-entrant. Released on exit: the lock file is removed only while it
    still names this process."""

    held_by_other = staticmethod(lock_holder)

    def __init__(self, directory: str | os.PathLike, what: str):
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / LOCK_NAME
        self.info: dict | None = None
        self.created = False              # the directory did not exist: removed again on release when empty

    @property
    def held(self) -> bool:
        return self.info is not None

    def acquire(self) -> "DirLock":
        if self.held:
            return self
        self.created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        info = dict(_process_record(), what=self.what)
        payload = (json.dumps(info) + "\n").encode()
        for _ in range(50):                                  # bounded: each turn sees a lock vanish or change
            if _create_exclusive(self.path, payload):
                self.info = info
                return self
            exists, other, mtime = _read_lock_settled(self.path)
            if not exists:
                continue                                     # released meanwhile: try again
            if not _is_stale(other, mtime):
                self._remove_if_created()
                raise self._in_use(other)
            if self._take_over(other, mtime, payload):
                self.info = info
                return self
        self._remove_if_created()
        raise UserError(f"could not lock {self.directory}: its lock file {self.path} keeps changing; "
                        "is another distill run starting there?")

    def _take_over(self, seen: dict | None, seen_mtime: float, payload: bytes) -> bool:
        """Replace the stale lock ``seen`` by ours, under the takeover file. False: try again."""
        guard = self.directory / TAKEOVER_NAME
        me = (json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n").encode()
        if not _create_exclusive(guard, me):
            g_exists, g_info, g_mtime = _read_lock(guard)
            if g_exists and _is_stale(g_info, g_mtime):
                _unlink_quiet(guard)                         # left by a taker that died mid-takeover
            else:
                time.sleep(0.05)                             # another process is taking over right now
            return False
        try:
            exists, now, mtime = _read_lock(self.path)
            if not exists:
                return False                                 # gone meanwhile: the plain O_EXCL path takes it
            if now != seen or not _is_stale(now, mtime):
                return False                                 # replaced meanwhile: look again
            os.unlink(self.path)
            if not _create_exclusive(self.path, payload):
                return False
        finally:
            _unlink_quiet(guard)
        if seen is None:
            detail = f"its lock file is unreadable and older than {LOCK_STALE_UNREADABLE_S:g} s"
        else:
            detail = f"pid {seen['pid']} on {seen['host']} is gone"
        print(f"distill: warning: taking over a stale lock on {self.directory} ({detail})", file=sys.stderr, flush=True)
        return True

    def _in_use(self, other: dict | None) -> UserError:
        """The refusal, naming the HOLDER: its stage, pid, host and start time."""
        other = other or {}
        what, pid, host, started = (other.get(k, "?") for k in ("what", "pid", "host", "started"))
        return UserError(f"{self.directory} is in use by distill {what} (pid {pid} on {host}, since {started}); "
                         f"wait for it to finish or use another --out")

    def _remove_if_created(self) -> None:
        """Leave no trace of a run that created the directory and wrote nothing into it."""
        if self.created:
            try:
                self.directory.rmdir()
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self.info = None
        exists, now, _ = _read_lock(self.path)
        if exists and now is not None and _is_mine(now):
            _unlink_quiet(self.path)
        self._remove_if_created()

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DirLock({str(self.directory)!r}, {self.what!r}, held={self.held})"


# ---------------------------------------------------------------------------------------------
# reader marks: a process reading a directory (train-student reading a cache) leaves
# ``.distill.reader.<host>.<pid>`` in it, so that a writer's --overwrite can refuse to delete under it

READER_PREFIX = ".distill.reader."


class ReaderMark:
    """Context manager: mark ``directory`` as read by this process until exit. On a directory this
    process cannot write (a read-only mount) nothing is marked and ``marked`` is False (the caller
    says so: an --overwrite elsewhere would not see this reader)."""

    def __init__(self, directory: str | os.PathLike, what: str):
        self.path = Path(directory) / f"{READER_PREFIX}{socket.gethostname()}.{os.getpid()}"
        self.what = what
        self.marked = False

    def __enter__(self) -> "ReaderMark":
        live_readers(self.path.parent)           # sweeps the marks of readers that have ended
        payload = json.dumps(dict(_process_record(), what=self.what))
        try:
            self.path.write_text(payload)
            self.marked = True
        except OSError:
            self.marked = False
        return self

    def __exit__(self, *exc) -> bool:
        if self.marked:
            _unlink_quiet(self.path)
        return False


def live_readers(directory: str | os.PathLike) -> list[dict]:
    """The reader marks of OTHER live processes in ``directory`` (marks of processes of this host that
    have ended, ``_process_gone``, are removed; marks from other hosts count as live)."""
    found = []
    for p in sorted(Path(directory).glob(READER_PREFIX + "*")):
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or type(info.get("pid")) is not int:
            continue
        if _is_mine(info):
            continue
        if info.get("host") == socket.gethostname() and _process_gone(info):
            _unlink_quiet(p)
            continue
        found.append(info)
    return found


# ---------------------------------------------------------------------------------------------
# output directories: a stage writes only into an empty directory or one holding its own earlier
# output, never where its inputs are; ``claim_dir`` checks that, locks, and sweeps distill's temps


def distill_entry(name: str) -> bool:
    """A name distill keeps beside any output: its lock, reader marks, completion records, temps."""
    return name.startswith(".distill.") or bool(TEMP_RE.match(name))


def user_entries(directory: str | os.PathLike) -> list[Path]:
    """The entries of ``directory`` other than ``distill_entry`` ones (none when it does not exist)."""
    d = Path(directory)
    return sorted(p for p in d.iterdir() if not distill_entry(p.name)) if d.is_dir() else []


def holds_output(directory: str | os.PathLike, marks: tuple) -> bool:
    """Whether ``directory`` holds a stage's own earlier output: one of ``marks``, (file name,
    {JSON key: value, or None for any value}), is a JSON object with those keys (each stage writes
    one first, so a run killed early is known too). The one answer to "is this directory mine" for
    every stage."""
    d = Path(directory)
    for name, fields in marks:
        try:
            doc = json.loads((d / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and all(k in doc and (v is None or doc[k] == v) for k, v in fields.items()):
            return True
    return False


def _overlap(out: Path, path: Path) -> bool:
    """``out`` holds or contains the input ``path``, or (an input directory) is inside it."""
    out, path = out.resolve(), path.resolve()
    return path.is_relative_to(out) or (path.is_dir() and out.is_relative_to(path))


def input_path(spec: Any) -> Path | None:
    """The file or directory an input option names (a shard pattern: its folder); None for a spec
    that names no local path (``timm:...``, ``module:callable``)."""
    if not spec or not isinstance(spec, (str, os.PathLike)):
        return None
    p = Path(spec).expanduser()
    if p.exists():
        return p
    return p.parent if any(c in str(p.name) for c in "{*?[") and p.parent.is_dir() else None


def check_out(directory: str | os.PathLike, stage: str, marks: tuple, *, inputs=(), flag: str = "--out") -> Path:
    """Refuse (UserError, one line) an output ``directory`` that is a file, holds, contains or is
    inside one of ``inputs`` (paths or specs, ``input_path``), or is neither empty nor ``stage``'s own
    output (``holds_output``). Reads only."""
    d = Path(directory).expanduser()
    if d.exists() and not d.is_dir():
        raise UserError(f"{flag} {d} is a file, not a directory: give a new or empty directory")
    for spec in inputs:
        p = input_path(spec)
        if p is not None and _overlap(d, p):
            raise UserError(f"{flag} {d} holds, contains or is inside the input {p}: distill never writes "
                            f"where its inputs are; choose another {flag}")
    found = user_entries(d)
    if found and not holds_output(d, marks):
        raise UserError(f"{flag} {d} is not empty ({found[0].name}) and holds no earlier {stage} output: "
                        f"distill writes only into an empty directory or its own; choose another {flag}")
    return d


def sweep_temps(directory: str | os.PathLike) -> int:
    """Remove the temporary files (``TEMP_RE``) a killed run left in ``directory`` and its
    ``.distill.*`` folders; call only while holding its lock. Returns how many."""
    d = Path(directory)
    n = 0
    for folder in [d, *(p for p in d.glob(".distill.*") if p.is_dir())]:
        for p in folder.iterdir():
            if TEMP_RE.match(p.name) and p.is_file():
                _unlink_quiet(p)
                n += 1
    return n


@contextlib.contextmanager
def claim_dir(directory: str | os.PathLike, stage: str, marks: tuple, *, inputs=(), flag: str = "--out"):
    """``with claim_dir(out, "cache-teacher", marks, inputs=...):`` the output directory checked
    (``check_out``), locked for this run (created if missing, removed again if the run leaves it
    empty), its stale temps swept; checked again under the lock. Take it before anything slow."""
    d = check_out(directory, stage, marks, inputs=inputs, flag=flag)
    with DirLock(d, stage):
        check_out(d, stage, marks, inputs=inputs, flag=flag)
        sweep_temps(d)
        yield d


class CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes read through it (``.bytes``): wrap it in
    ``pyarrow.PythonFile(f, mode="r")`` to measure what a reader really reads."""

    def __init__(self, path: str | os.PathLike):
        self.f, self.bytes = open(path, "rb"), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, *a) -> int:
        return self.f.seek(*a)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.bytes += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()

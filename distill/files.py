"""General file helpers every layer uses: the user-facing errors, checksums, atomic writes, JSON
reading and the output-directory lock. No torch, no Ray, no import-time side effects.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input from the user (path, flag, config, data). The CLI prints it as one line and exits 2."""


class FormatError(UserError):
    """A file does not follow the format (missing, wrong version, inconsistent)."""


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def digest(text: str) -> str:
    """A short stable id of a JSON text (run ids, key-set ids)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` under a temporary name in the same directory, fsync, then rename onto ``path``:
    readers see the old file or the whole new one, never a part. The temporary file is created with
    mode 0666 so the process umask applies, as for any ``open(path, "wb")``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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

"""Shards: find them, read them with skip-and-record, write them reproducibly, build them from images.

This is the only module that opens shard tars. A shard is a plain tar of ``KEY.<jpg|png|webp>`` (the
original image bytes) and ``KEY.cls`` (the integer label as text) members; ``index.json`` beside the
shards (``format.ShardIndex``) names them and the classes. Images are never decoded here: callers decode.

* ``resolve_shards(spec)``: a directory or a brace pattern -> shard paths (+ the index, if there is one).
* ``iter_shard(path)``: ``Sample`` or ``Skip`` records; never raises on bad content (see its docstring).
* ``scan_shard(path)``: the same records from the tar headers and labels only (image bytes not read).
* ``write_shards(samples, ...)``: byte-for-byte reproducible tars, then ``index.json`` last.
* ``make_shards(src, out, ...)``: an image-folder tree or a ``path,label`` CSV/TSV -> shards.
"""
from __future__ import annotations

import csv
import io
import lzma
import os
import posixpath
import random
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from .. import hooks, storage
from ..format import (DUPLICATE_KEY_REASON, IMAGE_EXT_ALIASES, IMAGE_EXTS, LABEL_EXT, MAX_KEY_LEN, SHARD_INDEX_NAME,
                      SHARD_INDEX_FORMAT,                      SHARD_PREFIX_RE, SHARD_SKIP_KEY, ShardEntry, ShardIndex, Skip, check_key, decode_label,
                      encode_label, sanitize_key, shard_name)
from ..files import FormatError, UserError, atomic_write_json, check_out, claim_dir, error_text, sha256_file, temp_path, writing

Progress = Callable[[int], None]

# Source files make_shards takes (matched case-insensitively), and Pillow formats -> stored extension.
SOURCE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_PIL_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
# Fixed tar header fields: the same samples always give the same bytes.
_TAR_FORMAT = tarfile.PAX_FORMAT
_TAR_MODE = 0o644
# What reading a damaged tar (or its compression layer) raises.
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset metadata members, ignored like webdataset does


@dataclass(frozen=True)
class Sample:
    """One sample: ``data`` is the image file's bytes (undecoded), ``ext`` one of ``format.IMAGE_EXTS``."""
    key: str
    data: bytes = field(repr=False)
    ext: str
    label: int | None


# ---------------------------------------------------------------------------------------------
# finding shards

def resolve_shards(spec: str | os.PathLike) -> tuple[list[Path], ShardIndex | None]:
    """Shard paths named by SPEC, and the shard index that describes them (None if there is none).

    SPEC is a directory (its ``index.json`` shards in index order, else its ``*.tar`` files sorted by
    name), a brace pattern such as ``dir/train-{000000..000099}.tar`` (or ``{a,b}``), or one tar file.
    For a pattern or a file, the ``index.json`` of their common folder is returned when it lists every
    shard named, restricted to those shards (classes and make-time skips unchanged).
    """
    text = storage.text(spec)
    path = storage.path(text)
    if path.is_dir():
        if (path / SHARD_INDEX_NAME).is_file():
            index = ShardIndex.read(path)
            paths = index.paths(path)
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise FormatError(f"{path / SHARD_INDEX_NAME} lists {len(missing)} shard(s) that do not exist, e.g. {missing[0]}")
            if not paths:
                raise UserError(f"no shards in {path}: its {SHARD_INDEX_NAME} lists none")
            return paths, index
        paths = sorted((p for p in path.iterdir() if p.suffix == ".tar" and p.is_file()), key=lambda p: p.name)
        if not paths:
            raise UserError(f"no .tar files in {path}")
        return paths, None
    if "{" in text:
        from braceexpand import braceexpand  # the brace expansion webdataset uses
        paths = [storage.path(p) for p in braceexpand(text)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"{len(missing)} of the {len(paths)} shards named by {text} do not exist, e.g. {missing[0]}")
    elif path.is_file():
        paths = [path]
    else:
        raise UserError(f"shards not found: {text} (expected a directory of .tar files or a pattern like dir/train-{{000000..000009}}.tar)")
    return paths, _index_for(paths)


def _index_for(paths: list[Path]) -> ShardIndex | None:
    folders = {p.parent for p in paths}
    if len(folders) != 1 or not (next(iter(folders)) / SHARD_INDEX_NAME).is_file():
        return None
    index = ShardIndex.read(next(iter(folders)))
    entries = {e.name: e for e in index.shards}
    if not all(p.name in entries for p in paths):
        return None
    return ShardIndex(classes=index.classes, shards=[entries[p.name] for p in paths], skipped=index.skipped)


# ---------------------------------------------------------------------------------------------
# reading

def iter_shard(path: str | os.PathLike, *, require_label: bool = True) -> Iterator[Sample | Skip]:
    """Yield every sample of one shard tar as a ``Sample``, or a ``Skip(key, reason, shard)`` when it is bad.

    Members are grouped like webdataset does: the key is the member name up to the first dot of its
    file name, the extension the rest (lower-cased); members of one sample are adjacent. A sample needs
    exactly one image member (jpg, jpeg, png, webp; ``Sample.ext`` is "jpg", "png" or "webp") and, unless
    ``require_label=False`` (then ``label`` is None when missing), a ``cls`` member holding an integer;
    other members are ignored. Skipped samples: no image, no label, a non-integer label, a key that is
    invalid or contains dots (``a.b.jpg``, reported as key ``a.b``), a key seen twice, a repeated member.
    Label range is not checked (see ``check_label``); images are not opened (see ``probe_image``).
    A member that is a link (symbolic or hard), a device or a FIFO, or whose name is absolute or holds a
    '..' component or a backslash, is never read or followed: it is a ``Skip(member name, reason)``;
    directory members are ignored (as webdataset does).

    Damaged tar: the samples read before the damage are yielded, then exactly one
    ``Skip(key=format.SHARD_SKIP_KEY ("*"), reason, shard)`` and nothing else. ``reason`` starts with
    "truncated tar:" (data ends early, including a cut between members: a tar must end with its
    end-of-archive block), "corrupt tar:" (a bad header), "not a tar file:", or "read error:" (the read
    itself failed, e.g. an I/O error on a network filesystem: maybe transient; cache-teacher redoes the
    shard on rerun). A sample whose members
    were all read before the damage is still yielded if complete; an incomplete one is named in the
    reason. Only a missing or unopenable file raises (``UserError``).
    """
    f = _open_shard(path, stream=True)
    with f:
        yield from _samples(_members(f), storage.name(path), require_label)


def _open_shard(path, stream: bool = False):
    """The shard opened for reading; in an object store, read front to back in ranged requests of 8 MiB,
    the next one fetched meanwhile (``stream``), or by seeks in requests of 64 KiB. A missing or
    unopenable file is one UserError."""
    try:
        return storage.open_input(path, block=8 << 20 if stream else 64 << 10, ahead=stream)
    except UserError as e:
        raise UserError(f"cannot open shard {storage.text(path)}: {e}") from None
    except FileNotFoundError:
        raise UserError(f"shard not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot open shard {path}: {e.strerror or e}") from None


def read_samples(path: str | os.PathLike, keys: Iterable[str]) -> dict[str, Sample]:
    """The samples of ``keys`` from one shard, reading only their members' data: the tar's headers are
    read one by one and the other members' data is seeked over (a notebook replaying one view of a
    1 GB shard reads kilobytes, not the shard). Keys missing, skipped or damaged are left out."""
    with _open_shard(path) as f:
        found = _samples(_members(f, seek=True, keys=set(keys)), storage.name(path), require_label=False)
        return {x.key: x for x in found if isinstance(x, Sample)}


def scan_shard(path: str | os.PathLike) -> Iterator[Sample | Skip]:
    """Like ``iter_shard`` (same samples, same skips, same damage record), but reading only the tar
    headers and the label members: image members are seeked over and ``Sample.data`` is empty. For
    counting a shard cheaply (``distill inspect`` of shards without an index)."""
    with _open_shard(path) as f:
        yield from _samples(_members(f, seek=True, read=_is_label), storage.name(path), True)


def _is_label(name: str) -> bool:
    return name.rpartition("/")[2].split(".", 1)[-1].lower() == LABEL_EXT


def _key_of(name: str) -> str:
    """A member's sample key, as webdataset reads it: the name up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


class _Damage(str):
    """Reason text for the end of a damaged tar (see iter_shard)."""


# Skip.reason of a tar member that is never read (its key is the member's name)
SYMLINK_MEMBER = "tar member is a symbolic link: not read"
HARDLINK_MEMBER = "tar member is a hard link: not read"
DEVICE_MEMBER = "tar member is a device or FIFO: not read"
OTHER_MEMBER = "tar member is not a regular file: not read"
UNSAFE_MEMBER = "unsafe tar member name (absolute, a '..' component or a backslash): not read"


def unsafe_member_name(name: str) -> bool:
    """A member name no shard may hold: absolute, with a '..' component, a backslash or NUL. Relative
    names with '/' are fine (keys may hold '/': FORMAT.md 1)."""
    return name.startswith("/") or any(c in name for c in "\\\0") or ".." in name.split("/")


def _member_refusal(info: tarfile.TarInfo) -> str | None:
    """Why a (non-directory) tar member is not read, or None for a regular file with a safe name."""
    if info.issym():
        return SYMLINK_MEMBER
    if info.islnk():
        return HARDLINK_MEMBER
    if info.isdev():
        return DEVICE_MEMBER
    if not info.isreg():
        return OTHER_MEMBER
    return UNSAFE_MEMBER if unsafe_member_name(info.name) else None


def _tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo | Skip]:
    """The members every shard reader may read, in tar order: regular files with safe names. Every other
    member is a ``Skip(name, reason)`` (links are never followed, nothing outside the tar is named),
    except directories, left out silently as webdataset does. Each header is dropped once yielded (a
    TarFile keeps them all otherwise)."""
    for info in tar:
        tar.members = []
        if info.isdir():
            continue
        why = _member_refusal(info)
        yield Skip(info.name, why) if why else info


def _members(f, *, seek: bool = False, read=None, keys: set | None = None) -> Iterator[tuple[str, bytes] | Skip | _Damage]:
    """(member name, bytes) of the regular files in a tar, a ``Skip`` for a member not read
    (``_tar_members``); a ``_Damage`` last if the tar is damaged. The one tar reader: ``seek`` reads
    headers by random access (members whose data is not wanted are seeked over; else the tar is one
    forward stream); ``read(name)`` False gives a member empty bytes; ``keys`` keeps only those samples'
    members (and no Skips), and stops once all were read."""
    head = f.read(6)
    f.seek(0)
    plain = not (head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00")
    try:
        tar = tarfile.open(fileobj=f, mode=("r:" if plain else "r:*") if seek else "r|*")
    except _TAR_ERRORS as e:
        yield _Damage(f"not a tar file: {e}")
        return
    n, left = 0, set(keys or ())
    try:
        for info in _tar_members(tar):
            if keys is not None:
                if isinstance(info, Skip) or _key_of(info.name) not in keys:
                    if not left:
                        return
                    continue
                left.discard(_key_of(info.name))
            if isinstance(info, Skip):
                yield info
                continue
            data = tar.extractfile(info).read() if read is None or read(info.name) else b""
            n += 1
            yield info.name, data
            if hooks.ACTIVE:
                hooks.fire("shard-read")
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        yield _Damage(f"truncated tar: {e} (after {n} members)")
        return
    except OSError as e:        # the read itself failed (I/O error, network filesystem): maybe transient
        yield _Damage(f"read error: {e} (after {n} members)")
        return
    if plain:  # tarfile treats a cut between members or a bad header as the end: check the end block
        f.seek(tar.offset)
        block = f.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE:
            yield _Damage(f"truncated tar: no end-of-archive block at byte {tar.offset} (after {n} members)")
        elif block.count(0) != tarfile.BLOCKSIZE:
            yield _Damage(f"corrupt tar: invalid header at byte {tar.offset} (after {n} members)")


def _samples(members: Iterable[tuple[str, bytes] | Skip | _Damage], shard: str,
             require_label: bool) -> Iterator[Sample | Skip]:
    seen: set[str] = set()
    key, group, problem = None, {}, None   # the sample being gathered, its members, why it is bad
    for item in members:
        if isinstance(item, _Damage):
            if key is not None and (problem or _images(group) and (LABEL_EXT in group or not require_label)):
                yield _finish(key, group, problem, shard, require_label)
                key = None
            note = f"; sample {key!r} incomplete" if key is not None else ""
            yield Skip(SHARD_SKIP_KEY, f"{item}{note}", shard)
            return
        if isinstance(item, Skip):
            yield Skip(item.key, item.reason, shard)
            continue
        name, data = item
        if _META_RE.match(name):
            continue
        base = name.rpartition("/")[2]
        if "." not in base:
            yield Skip(name, "tar member without an extension", shard)
            continue
        k, ext = _key_of(name), base.split(".", 1)[1].lower()
        if k != key:
            if key is not None:
                yield _finish(key, group, problem, shard, require_label)
            key, group, problem = k, {}, None
            if k in seen:
                problem = DUPLICATE_KEY_REASON
            seen.add(k)
        if ext in group and not problem:
            problem = f"{DUPLICATE_KEY_REASON} (repeated member {k}.{ext})"
        group[ext] = data
    if key is not None:
        yield _finish(key, group, problem, shard, require_label)


def _images(group: dict[str, bytes]) -> list[str]:
    return [e for e in group if IMAGE_EXT_ALIASES.get(e, e) in IMAGE_EXTS]


def _finish(key: str, group: dict[str, bytes], problem: str | None, shard: str, require_label: bool) -> Sample | Skip:
    if problem:
        return Skip(key, problem, shard)
    images = _images(group)
    if not images:
        dotted = [e.rsplit(".", 1)[0] for e in group if "." in e and _images({e.rsplit(".", 1)[1]: b""})]
        if dotted:  # "a.b.jpg": webdataset reads key "a", extension "b.jpg"
            return Skip(f"{key}.{dotted[0]}", "key contains a dot", shard)
        return Skip(key, f"no image member (.{', .'.join(IMAGE_EXTS)})", shard)
    if len(images) > 1:
        return Skip(key, f"more than one image member ({', '.join(sorted(images))})", shard)
    try:
        check_key(key)
    except FormatError as e:
        return Skip(key, str(e), shard)
    label = None
    if LABEL_EXT in group:
        try:
            label = decode_label(group[LABEL_EXT])
        except ValueError as e:
            return Skip(key, str(e), shard)
    elif require_label:
        return Skip(key, f"no .{LABEL_EXT} label member", shard)
    ext = IMAGE_EXT_ALIASES.get(images[0], images[0])
    return Sample(key, group[images[0]], ext, label)


def check_label(label: int, num_classes: int) -> str | None:
    """The reason a label is invalid for ``num_classes`` classes, or None if it is fine."""
    if not 0 <= label < num_classes:
        return f"label {label} out of range 0..{num_classes - 1}"
    return None


def probe_image(data: bytes, *, decode: bool = False) -> str | None:
    """The reason Pillow cannot read these image bytes, or None. Cheap by default (open + verify,
    which reads headers and, for PNG, checksums); ``decode=True`` also decodes the pixels."""
    return _image_ext(data, decode=decode)[1]


def _image_ext(data: bytes, *, decode: bool = False) -> tuple[str | None, str | None]:
    """(stored extension, None) for a readable JPEG/PNG/WebP, else (None, reason)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
        if decode:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except UnidentifiedImageError:
        return None, "not an image Pillow can identify"
    except Exception as e:  # Pillow raises many kinds (SyntaxError, OSError, ValueError, ...)
        return None, f"unreadable image: {error_text(e)}"      # no address: reasons reproducible
    ext = _PIL_EXT.get(fmt)
    if ext is None:
        return None, f"unsupported image format {fmt} (use JPEG, PNG or WebP)"
    return ext, None


# ---------------------------------------------------------------------------------------------
# writing

def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike, prefix: str, shard_size: int,
                 classes: list[str], *, skipped: Iterable[Skip] = (), progress: Progress | None = None,
                 order: dict | None = None) -> ShardIndex:
    """Write ``OUT/<prefix>-%06d.tar`` shards of ``shard_size`` samples, then ``OUT/index.json`` last.

    Members per sample, in input order: ``KEY.<ext>`` (the bytes unchanged) then ``KEY.cls``. Tar
    headers are fixed (PAX format, mtime 0, uid/gid 0, empty user/group names, mode 0644), so the same
    samples give the same bytes. Each shard is written to a hidden temporary name and renamed when
    complete. ``skipped`` is recorded in the index; it is read after ``samples`` is exhausted, so it
    may be a list that the ``samples`` generator fills. ``progress(n)`` is called after each sample
    with n=1. Bad samples (invalid or duplicate key, unknown ext, label outside the classes) raise
    ``UserError``; shards already written stay, but without an index the directory is incomplete.
    """
    if not isinstance(prefix, str) or not SHARD_PREFIX_RE.match(prefix):
        raise UserError(f"invalid shard prefix {prefix!r}: use letters, digits, '_' or '-'")
    _check_shard_size(shard_size)
    classes = [str(c) for c in classes]
    if not classes:
        raise UserError("at least one class name is needed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[ShardEntry] = []
    keys: set[str] = set()
    writer: _TarWriter | None = None
    try:
        for sample in samples:
            _check_sample(sample, keys, len(classes))
            if writer is None:
                writer = _TarWriter(out / shard_name(prefix, len(entries)))
            writer.add(f"{sample.key}.{sample.ext}", sample.data)
            writer.add(f"{sample.key}.{LABEL_EXT}", encode_label(sample.label))
            if writer.samples == shard_size:
                entries.append(writer.close())
                writer = None
            if progress is not None:
                progress(1)
        if writer is not None:
            entries.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    index = ShardIndex(classes=classes, shards=entries, skipped=list(skipped), order=order)
    index.write(out)
    return index


def _check_sample(sample: Sample, keys: set[str], num_classes: int) -> None:
    check_key(sample.key)
    if sample.key in keys:
        raise UserError(f"duplicate sample key {sample.key!r}")
    keys.add(sample.key)
    if sample.ext not in IMAGE_EXTS:
        raise UserError(f"sample {sample.key!r}: image extension {sample.ext!r} is not one of {', '.join(IMAGE_EXTS)}")
    label = sample.label
    if isinstance(label, bool) or not hasattr(label, "__index__"):
        raise UserError(f"sample {sample.key!r}: label {label!r} is not an integer")
    if reason := check_label(label.__index__(), num_classes):
        raise UserError(f"sample {sample.key!r}: {reason} ({num_classes} classes)")


class _TarWriter:
    """One shard being written: a temporary file renamed into place by ``close``."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = temp_path(path)
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=_TAR_FORMAT, encoding="utf-8")
        self.members = 0

    @property
    def samples(self) -> int:
        return self.members // 2

    def add(self, name: str, data: bytes) -> None:
        if unsafe_member_name(name):            # write_shards checks keys first: never reached
            raise UserError(f"refusing to write the unsafe tar member name {name!r}")
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = _TAR_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        with writing(self.path):
            self.tar.addfile(info, io.BytesIO(data))
        self.members += 1

    def close(self) -> ShardEntry:
        with writing(self.path):
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        return ShardEntry(name=self.path.name, samples=self.samples, bytes=self.path.stat().st_size,
                          sha256=sha256_file(self.path))

    def abort(self) -> None:
        try:
            self.file.close()                   # may flush into a full disk: the temp goes all the same
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# make-shards: image folder tree or CSV -> shards

@dataclass(frozen=True)
class _Source:
    path: Path   # the image file
    name: str    # how the user names it: path relative to SRC, or as written in the CSV
    key: str
    label: int


MAX_SHARD_SIZE = 10_000_000


def _check_shard_size(shard_size) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise UserError(f"--shard-size must be an integer in [1, {MAX_SHARD_SIZE}], got {shard_size!r}")


def make_shards(src: str | os.PathLike, out: str | os.PathLike, *, prefix: str = "train", shard_size: int = 1000,
                keys: str = "stem", classes_file: str | os.PathLike | None = None, overwrite: bool = False,
                progress: Progress | None = None, shuffle: bool = True, seed: int = 0) -> tuple[ShardIndex, list[Skip]]:
    """Build shards in OUT from SRC: an image-folder tree or a ``path,label`` CSV/TSV file.

    Folder tree: one sub-folder per class (searched recursively; hidden files and folders ignored);
    classes are the sorted folder names, or the lines of ``classes_file`` (which must name every
    folder); label = position; order = class, then relative path. Files that are not .jpg, .jpeg, .png
    or .webp (any case) are recorded as skips, as are files directly in SRC.
    CSV/TSV (tab-separated if the name ends in .tsv or the first line has a tab): rows ``path,label``
    in file order, paths relative to the CSV's folder. Labels are either all integers (class indices:
    classes are the lines of ``classes_file``, else "0".."C-1" for C = max label + 1) or all class
    names (classes are the lines of ``classes_file``, which must hold every name, else the sorted set
    of names; label = position); a mix is refused, naming both lines. The first row is a header if its
    label is not an integer and its path cell is not an image file (no .jpg/.jpeg/.png/.webp
    extension and no such file), e.g. ``path,label``.
    Image bytes are stored unchanged with the extension of their real format (a PNG named .jpg is
    stored as .png). Keys: ``stem`` (the sanitised file stem) or ``path`` (the sanitised path relative
    to SRC or the CSV's folder, without extension, '/' -> '_'). Unreadable or unsupported images are
    recorded skips (``Skip(key, reason, source name)``), kept in the index and returned; the check is
    ``probe_image``'s cheap one, so a JPEG cut short inside its pixel data gets through (readers skip it
    when they decode). ``progress(1)``
    is called per image file. OUT must be empty unless ``overwrite``, which first removes OUT's index and
    ``<prefix>-NNNNNN.tar`` files.

    ``shuffle`` (the default): the samples of the whole dataset are written in a random order seeded
    by ``seed`` (reproducible), so that every shard holds a mix of classes (a folder tree lists them
    class by class: at ImageNet-21K's ~650 images per class a 1,000-sample shard would hold 1-2
    classes). ``shuffle=False`` keeps the listing order. index.json records ``order``.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    _check_shard_size(shard_size)
    if keys not in ("stem", "path"):
        raise UserError(f"keys must be 'stem' or 'path', not {keys!r}")
    if not SHARD_PREFIX_RE.match(prefix):
        raise UserError(f"invalid shard prefix {prefix!r}: use letters, digits, '_' or '-'")
    if not src.exists():
        raise UserError(f"source not found: {src}")
    names = _read_classes(Path(classes_file).expanduser()) if classes_file is not None else None
    marks = shard_dir_marks(prefix)
    check_out(out, "make-shards", marks, inputs=(src, classes_file), flag="OUT")
    if src.is_dir():
        classes, sources, skips = _list_folder(src, keys, names)
    else:
        classes, sources, skips = _list_csv(src, keys, names, classes_file)
    if not sources:
        raise UserError(f"no images found in {src} (expected .jpg, .jpeg, .png or .webp files"
                        + (" in one folder per class)" if src.is_dir() else " listed as path,label rows)"))
    by_key: dict[str, str] = {}
    for s in sources:
        if s.key in by_key:
            hint = "rename one of them" if keys == "path" else "use --keys path or rename one of them"
            raise UserError(f"duplicate key {s.key!r} from {by_key[s.key]} and {s.name}: {hint}")
        by_key[s.key] = s.name
    with claim_dir(out, "make-shards", marks, inputs=(src, classes_file), flag="OUT"):
        _prepare_out(out, prefix, overwrite)
        atomic_write_json(out / SHARDS_MARK, {"stage": "make-shards", "prefix": prefix})
        try:
            index = _write_sources(src, sources, skips, progress, out, prefix, shard_size, classes, shuffle, seed)
        finally:                 # the mark stays only beside shards a rerun must know as its own
            if (out / SHARD_INDEX_NAME).is_file() or not own_shard_files(out, prefix):
                (out / SHARDS_MARK).unlink()
    return index, skips


def _read_sources(sources: list[_Source], skips: list[Skip], progress: Progress | None) -> Iterator[Sample]:
    for s in sources:
        try:
            data = s.path.read_bytes()
        except OSError as e:
            skips.append(Skip(s.key, f"cannot read file: {e.strerror or e}", s.name))
        else:
            ext, reason = _image_ext(data)
            if reason:
                skips.append(Skip(s.key, reason, s.name))
            else:
                yield Sample(s.key, data, ext, s.label)
        if progress is not None:
            progress(1)


def _key(rel: str, keys: str) -> str:
    """The key of a file at ``rel`` (relative to SRC or the CSV's folder, '/'-separated)."""
    stem = posixpath.splitext(rel)[0]
    return sanitize_key(posixpath.basename(stem) if keys == "stem" else stem)


def _add_source(path: Path, name: str, rel: str, label: int, keys: str, sources: list[_Source], skips: list[Skip]) -> None:
    """Queue one image file; ``name`` is how the user names it, ``rel`` what its key is made from."""
    key = _key(rel, keys)
    if len(key) > MAX_KEY_LEN:
        skips.append(Skip(key[:MAX_KEY_LEN], f"key longer than {MAX_KEY_LEN} characters", name))
    else:
        sources.append(_Source(path, name, key, label))


def _list_folder(src: Path, keys: str, names: list[str] | None) -> tuple[list[str], list[_Source], list[Skip]]:
    skips: list[Skip] = []
    folders, loose = [], []
    for p in sorted(src.iterdir(), key=lambda p: p.name):
        if p.name.startswith("."):
            continue
        (folders if p.is_dir() else loose).append(p)
    for p in loose:
        skips.append(Skip(_key(p.name, keys), "file is not inside a class folder", p.name))
    found = [p.name for p in folders]
    if names is None:
        classes = found
    else:
        unknown = [n for n in found if n not in names]
        if unknown:
            raise UserError(f"class folder {unknown[0]!r} in {src} is not listed in the classes file")
        classes = names
    sources: list[_Source] = []
    for folder in folders:
        label = classes.index(folder.name)
        files = []
        for root, dirs, filenames in os.walk(folder, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [Path(root, n) for n in filenames if not n.startswith(".")]
        for p in sorted(files, key=lambda p: p.relative_to(src).as_posix()):
            rel = p.relative_to(src).as_posix()
            if p.suffix.lower() not in SOURCE_EXTS:
                skips.append(Skip(_key(rel, keys), f"not an image file extension ({', '.join(SOURCE_EXTS)})", rel))
            else:
                _add_source(p, rel, rel, label, keys, sources, skips)
    return classes, sources, skips


def _is_int(text: str) -> bool:
    return re.fullmatch(r"-?[0-9]+", text) is not None


def _list_csv(src: Path, keys: str, names: list[str] | None, classes_file) -> tuple[list[str], list[_Source], list[Skip]]:
    """Rows ``path,label``: labels are all integers (class indices) or all class names (see make_shards)."""
    try:
        text = src.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{src} is neither a folder nor a UTF-8 CSV/TSV file of path,label rows") from None
    lines = text.splitlines()
    delimiter = "\t" if src.suffix.lower() == ".tsv" or (lines and "\t" in lines[0]) else ","
    base = src.parent
    rows: list[tuple[int, str, str]] = []          # (line number, path as written, label text)
    for lineno, row in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2:
            raise UserError(f"{src} line {lineno}: expected two columns path{delimiter}label, got {len(row)}")
        rows.append((lineno, row[0].strip(), row[1].strip()))
    if rows and rows[0][0] == 1 and _is_header(rows[0][1], rows[0][2], base):
        rows = rows[1:]
    by_name = bool(rows) and not _is_int(rows[0][2])
    for lineno, _, label_text in rows:
        if _is_int(label_text) == by_name:
            first = rows[0]
            if by_name:
                raise UserError(f"{src} line {lineno}: label {label_text!r} is an integer but line {first[0]}'s label "
                                f"{first[2]!r} is a class name: write every label as a class name, or every label "
                                f"as an integer class index")
            raise UserError(f"{src} line {lineno}: label {label_text!r} is not an integer but line {first[0]}'s label "
                            f"{first[2]} is: write every label as an integer class index, or every label as a class name")
    if by_name:
        if names is None:
            classes = sorted({label_text for _, _, label_text in rows})
        else:
            known = set(names)
            for lineno, _, label_text in rows:
                if label_text not in known:
                    raise UserError(f"{src} line {lineno}: class {label_text!r} is not in the classes file {classes_file}")
            classes = names
        position = {c: i for i, c in enumerate(classes)}
    sources: list[_Source] = []
    skips: list[Skip] = []
    max_label = -1
    for lineno, name, label_text in rows:
        if by_name:
            label = position[label_text]
        else:
            label = int(label_text)
            if label < 0:
                raise UserError(f"{src} line {lineno}: label {label} is negative")
            if names is not None and label >= len(names):
                raise UserError(f"{src} line {lineno}: label {label} is out of range for the {len(names)} classes in {classes_file}")
            max_label = max(max_label, label)
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base / path
        try:
            rel = path.relative_to(base).as_posix()
        except ValueError:  # an absolute path elsewhere
            rel = path.as_posix().lstrip("/")
        if path.suffix.lower() not in SOURCE_EXTS:
            skips.append(Skip(_key(rel, keys), f"not an image file extension ({', '.join(SOURCE_EXTS)})", name))
            continue
        _add_source(path, name, rel, label, keys, sources, skips)
    if not by_name:
        classes = names if names is not None else [str(i) for i in range(max_label + 1)]
    return classes, sources, skips


def _is_header(path_text: str, label_text: str, base: Path) -> bool:
    """Line 1 is a header when its label is not an integer and its path cell does not name an image
    file (no image extension and no such file), e.g. ``path,label``."""
    if _is_int(label_text):
        return False
    path = Path(path_text).expanduser()
    return path.suffix.lower() not in SOURCE_EXTS and not (path if path.is_absolute() else base / path).is_file()


def _read_classes(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise UserError(f"classes file not found: {path}") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise UserError(f"classes file {path} is empty")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise UserError(f"classes file {path} names class {n!r} twice")
        seen.add(n)
    return names


# make-shards' mark in OUT while it writes (removed once index.json is written): a run killed before its
# index is known by it, so --overwrite removes that run's shards, never another folder's tars
SHARDS_MARK = ".distill.make-shards.json"


def _write_sources(src: Path, sources, skips, progress, out: Path, prefix: str, shard_size: int, classes,
                   shuffle: bool, seed: int):
    """make_shards' writing, into the claimed OUT: SRC's sources (shuffled or not) as shards with their index."""
    if shuffle:
        random.Random(f"distill-make-shards:{int(seed)}").shuffle(sources)
    index = write_shards(_read_sources(sources, skips, progress), out, prefix, shard_size, classes, skipped=skips,
                         order={"shuffled": bool(shuffle), "seed": int(seed)})
    if index.num_samples == 0:
        (out / SHARD_INDEX_NAME).unlink()
        first = skips[0]
        raise UserError(f"no readable images in {src}: all {len(skips)} skipped, e.g. {first.shard}: {first.reason}")
    return index


def shard_dir_marks(prefix: str) -> tuple:
    """How a shard writer knows its own folder (``files.holds_output``): a shard index, or the mark
    of a make-shards run killed before its index."""
    return ((SHARD_INDEX_NAME, {"format": SHARD_INDEX_FORMAT}), (SHARDS_MARK, {"prefix": prefix}))


def own_shard_files(out: Path, prefix: str, claimed: bool = False) -> list[Path]:
    """The files an earlier shard writer left in ``out``: the index and the shards it lists; without an
    index, the ``<prefix>-NNNNNN.tar`` files, but only in a folder known to be the writer's own
    (``claimed``, or holding make-shards' mark)."""
    index = out / SHARD_INDEX_NAME
    if index.is_file():
        try:
            names = [e.name for e in ShardIndex.read(out).shards]
        except FormatError:
            names = []
        return [index, *(out / n for n in names if (out / n).is_file())]
    if not (claimed or (out / SHARDS_MARK).is_file()):
        return []
    ours = re.compile(rf"^{re.escape(prefix)}-[0-9]{{6}}\.tar$")
    return [p for p in out.iterdir() if p.is_file() and ours.match(p.name)] if out.is_dir() else []


def _prepare_out(out: Path, prefix: str, overwrite: bool) -> None:
    """OUT is claimed (empty, or shards written before); those are deleted only with ``overwrite``."""
    found = own_shard_files(out, prefix)
    if found and not overwrite:
        raise UserError(f"output folder {out} is not empty (use --overwrite to replace its shards)")
    for p in found:
        p.unlink()

"""Untrusted names stay inside (issue 27, "Integrity end to end"): a name that a manifest, a shard index,
a filter's output, an adapted teacher's teacher.json or a tar member gives is used only as a plain file
name inside its own directory. Anything else is refused with one line that says nothing about the file
outside (not its size, not whether it exists), or, for a tar member, skipped and recorded."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import DEMO_POLICY, REPO, cache_config, demo_head, image_bytes, run_group
from distill.data.shards import iter_shard, read_samples, resolve_shards, scan_shard
from distill.files import FormatError, UserError
from distill.format import MANIFEST_NAME, SHARD_INDEX_NAME, ShardIndex, Skip

V1 = REPO / "tests" / "data" / "v1-cache"
SHARDS = ["train-000000.tar", "train-000001.tar"]
SECRET_BYTES = 12345            # the size of the file outside: no message may show it


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return run_group([sys.executable, "-m", "distill.cli", *map(str, args)], env=env)


def _refused(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The one error line of a command that exited 2; it holds every needle and not the secret's size."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("distill: error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert str(SECRET_BYTES) not in lines[0] and "12,345" not in lines[0], lines[0]
    return lines[0]


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes]:
    """Every file under root (not under ``skip``) by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or not p.is_relative_to(skip))}


def _edit_manifest(cache: Path, i: int, **changes) -> None:
    m = json.loads((cache / MANIFEST_NAME).read_text())
    m["shards"][i].update(changes)
    (cache / MANIFEST_NAME).write_text(json.dumps(m))


# ----------------------------------------------------------------------------- convert-cache

@pytest.fixture
def v1_old(tmp_path) -> tuple[Path, Path]:
    """A copy of the version-1 cache (tmp/old) and a decoy file outside it (tmp/decoy.arrow)."""
    old = tmp_path / "old"
    shutil.copytree(V1, old)
    decoy = tmp_path / "decoy.arrow"
    decoy.write_bytes(b"d" * SECRET_BYTES)
    return old, decoy


@pytest.mark.parametrize("shard, field, value", [
    (0, "file", "DECOY"),                              # absolute: would replace that file anywhere
    (1, "file", "../old/train-000001.arrow"),          # would rewrite OLD's own file in place
    (0, "file", "../decoy.arrow"),
    (0, "name", "../x.tar"),
    (1, "name", "/tmp/x.tar"),
])
def test_convert_cache_refuses_names_that_leave_the_directory(v1_old, tmp_path, shard, field, value):
    old, decoy = v1_old
    _edit_manifest(old, shard, **{field: str(decoy) if value == "DECOY" else value})
    new = tmp_path / "new"
    before = _snapshot(tmp_path)
    r = _cli("convert-cache", old, new, "--quiet")
    _refused(r, "not a plain file name")
    assert "converted" not in r.stdout
    assert _snapshot(tmp_path) == before                # OLD and the decoy byte for byte; nothing new anywhere
    assert not new.exists()


def test_convert_cache_never_writes_under_old(v1_old, tmp_path):
    old, _ = v1_old
    before = _snapshot(tmp_path)
    r = _cli("convert-cache", old, old / "v2", "--quiet")
    _refused(r, "inside")
    assert "converted" not in r.stdout and _snapshot(tmp_path) == before


def test_convert_cache_of_no_shards_writes_nothing_and_says_so(v1_old, tmp_path):
    old, _ = v1_old
    m = json.loads((old / MANIFEST_NAME).read_text())
    (old / MANIFEST_NAME).write_text(json.dumps(dict(m, shards=[])))
    r = _cli("convert-cache", old, tmp_path / "new", "--quiet")
    _refused(r, "no shards")
    assert "converted" not in r.stdout and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- cache readers

@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """Two small demo shards and a cache over them made by cache-teacher."""
    from distill.cache import cache_teacher
    tmp = tmp_path_factory.mktemp("names")
    shards = demo_head(tmp, 16, SHARDS)
    cache_teacher(cache_config(shards, tmp / "cache", epochs=1), DEMO_POLICY)
    return tmp, shards


@pytest.fixture
def outside_cache(built, tmp_path) -> tuple[Path, Path, Path]:
    """(a copy of the built cache in tmp/deep/er/cache, its shards, a secret file tmp/secret.arrow)."""
    src, shards = built
    cache = tmp_path / "deep" / "er" / "cache"
    shutil.copytree(src / "cache", cache)
    secret = tmp_path / "secret.arrow"
    secret.write_bytes(b"s" * SECRET_BYTES)
    return cache, shards, secret


def _train(shards, cache, out):
    return _cli("train-student", "--shards", shards, "--cache", cache, "--out", out, "--model", "tinyvit-tiny",
                "--image-size", "32", "--batch-size", "16", "--epochs", "1", "--quiet")


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_a_manifest_file_outside_the_cache_is_refused_without_a_word_about_it(outside_cache, tmp_path, how):
    import distill
    cache, shards, secret = outside_cache
    name = "../../../secret.arrow" if how == "dotdot" else str(secret)
    _edit_manifest(cache, 0, file=name)
    with pytest.raises(FormatError) as e:
        distill.open_cache(cache).to_table()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "not a plain file name inside the cache directory" in msg, msg
    assert repr(name) in msg and str(SECRET_BYTES) not in msg, msg
    _refused(_cli("verify", cache), "not a plain file name", repr(name))
    _refused(_train(shards, cache, tmp_path / "run"), "not a plain file name", repr(name))
    assert secret.read_bytes() == b"s" * SECRET_BYTES


def test_a_cache_file_that_is_a_symlink_leading_outside_is_refused(outside_cache, tmp_path):
    import distill
    cache, shards, secret = outside_cache
    (cache / "evil.arrow").symlink_to(secret)
    _edit_manifest(cache, 0, file="evil.arrow")
    with pytest.raises(FormatError) as e:
        distill.open_cache(cache).to_table()
    msg = str(e.value)
    assert "symbolic link that leads outside the cache directory" in msg and str(SECRET_BYTES) not in msg, msg
    # a link that stays inside the directory is fine
    m = json.loads((cache / MANIFEST_NAME).read_text())
    (cache / "inside.arrow").symlink_to(cache / "train-000001.arrow")
    _edit_manifest(cache, 1, file="inside.arrow")
    assert distill.open_cache(cache).to_table(shards=[m["shards"][1]["name"]]).num_rows > 0


def test_a_manifest_shard_name_is_a_plain_name_in_the_shard_directory(outside_cache):
    import distill
    cache, shards, secret = outside_cache
    c = distill.open_cache(cache, shards_dir=shards)
    for bad in ("../secret.arrow", str(secret), "..", "a/b.tar", ""):
        with pytest.raises(FormatError, match="not a plain file name inside the shard directory"):
            c.shard_path(bad)
    _edit_manifest(cache, 1, name="../../secret.arrow")
    with pytest.raises(FormatError, match="not a plain file name inside the shard directory"):
        distill.open_cache(cache)


# ----------------------------------------------------------------------------- shard index

@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_an_index_shard_name_outside_its_directory_is_refused(tmp_path, how):
    shards = demo_head(tmp_path, 8, SHARDS[:1])
    outside = tmp_path / "x.tar"
    shutil.copy2(shards / SHARDS[0], outside)          # the file exists: only its name is wrong
    d = json.loads((shards / SHARD_INDEX_NAME).read_text())
    d["shards"][0]["name"] = "../x.tar" if how == "dotdot" else str(outside)
    (shards / SHARD_INDEX_NAME).write_text(json.dumps(d))
    with pytest.raises(FormatError, match="not a plain file name inside the shard directory"):
        resolve_shards(shards)
    with pytest.raises(FormatError, match="not a plain file name"):
        ShardIndex.read(shards)
    _refused(_cli("inspect", shards), "not a plain file name", SHARD_INDEX_NAME)


# ----------------------------------------------------------------------------- adapted teacher

def test_a_teacher_json_file_outside_its_directory_is_refused(tmp_path):
    from distill.teachers import TeacherSpec, dir_file_spec
    d = tmp_path / "adapted"
    d.mkdir()
    (tmp_path / "outside.pt2").write_bytes(b"x" * SECRET_BYTES)
    for bad in ("../outside.pt2", str(tmp_path / "outside.pt2")):
        (d / "teacher.json").write_text(json.dumps({"format": "distill-adapted-teacher", "version": 1, "file": bad}))
        with pytest.raises(FormatError, match="not a plain file name inside the adapted-teacher directory"):
            dir_file_spec(TeacherSpec(str(d)))


# ----------------------------------------------------------------------------- tar members

def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kw.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


@pytest.fixture
def unsafe_tar(tmp_path) -> Path:
    img = image_bytes()
    path = tmp_path / "unsafe.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _member(tar, "a.jpg", img)
        _member(tar, "a.cls", b"1")
        _member(tar, "dir", type=tarfile.DIRTYPE)                   # directories: silently ignored
        _member(tar, "dir/c.jpg", img)                              # a key with '/' stays valid
        _member(tar, "dir/c.cls", b"2")
        _member(tar, "s.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _member(tar, "s.cls", b"0")
        _member(tar, "h.jpg", type=tarfile.LNKTYPE, linkname="a.jpg")
        _member(tar, "/abs.jpg", img)
        _member(tar, "/abs.cls", b"0")
        _member(tar, "../up.jpg", img)
        _member(tar, "../up.cls", b"0")
        _member(tar, "x/../y.jpg", img)
        _member(tar, "b\\w.jpg", img)
        _member(tar, "dev.jpg", type=tarfile.CHRTYPE)
        _member(tar, "fifo.jpg", type=tarfile.FIFOTYPE)
        _member(tar, "b.jpg", img)
        _member(tar, "b.cls", b"0")
    return path


REFUSED = [("s.jpg", "tar member is a symbolic link: not read"),
           ("h.jpg", "tar member is a hard link: not read"),
           ("/abs.jpg", "unsafe tar member name"), ("/abs.cls", "unsafe tar member name"),
           ("../up.jpg", "unsafe tar member name"), ("../up.cls", "unsafe tar member name"),
           ("x/../y.jpg", "unsafe tar member name"), ("b\\w.jpg", "unsafe tar member name"),
           ("dev.jpg", "tar member is a device or FIFO: not read"),
           ("fifo.jpg", "tar member is a device or FIFO: not read")]


@pytest.mark.parametrize("reader", [iter_shard, scan_shard])
def test_tar_members_that_are_links_devices_or_leave_the_tar_are_skipped_and_recorded(unsafe_tar, reader):
    items = list(reader(unsafe_tar))
    assert [x.key for x in items if not isinstance(x, Skip)] == ["a", "dir/c", "b"]
    skips = [x for x in items if isinstance(x, Skip)]
    member_skips = [(s.key, s.reason) for s in skips if s.key in dict(REFUSED)]
    assert len(member_skips) == len(REFUSED), skips
    for (key, reason), (want_key, want) in zip(member_skips, REFUSED):
        assert key == want_key and reason.startswith(want), (key, reason)
    assert all(s.shard == unsafe_tar.name for s in skips)
    # s.cls lost its image (a link): the sample s is skipped for that, nothing else is read from outside
    assert ("s", "no image member (.jpg, .png, .webp)") in [(s.key, s.reason) for s in skips]


def test_read_samples_leaves_unsafe_members_out(unsafe_tar):
    got = read_samples(unsafe_tar, ["a", "b", "s", "h", "abs", "up", "/abs", "../up", "dir/c", "y", "dev", "fifo"])
    assert sorted(got) == ["a", "b", "dir/c"]

"""Output directories (issue 28): every stage writes only into an empty directory or its own earlier
output, never where its inputs are; --overwrite deletes only the stage's own files; a fault of the
machine (disk full, read-only, --out a file) or SIGTERM is one line; the lock is taken first and
names its holder; distill's stale temps are swept, a user's are not; reader marks of ended processes
are swept. Real CLI runs in subprocesses on tiny real data."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO_TEACHER, REPO, demo_head, image_bytes, kill_group, one_line_error, run_group
from distill.files import LOCK_NAME, READER_PREFIX, DirLock, live_readers

V1 = REPO / "tests" / "data" / "v1-cache"
CACHE_FLAGS = ["--teacher", str(DEMO_TEACHER), "--teacher-input-size", "32", "--epochs", "2", "--topk", "5",
               "--workers", "1", "--threads", "1", "--quiet"]
TRAIN_FLAGS = ["--model", "tinyvit-tiny", "--image-size", "32", "--recipe", "none", "--epochs", "2",
               "--batch-size", "16", "--lr", "0.002", "--warmup-epochs", "0", "--threads", "1", "--loader-workers", "0",
               "--quiet"]
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")


def distill(*argv, timeout=300, **kw):
    return run_group([sys.executable, "-m", "distill.cli", *map(str, argv)], env=kw.pop("env", ENV), timeout=timeout, **kw)


def snapshot(root: Path) -> dict:
    """Every entry under root (root itself included): its bytes (files) and mtime."""
    entries = [root, *sorted(root.rglob("*"))]
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in entries}


def no_traceback_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    """A run that failed (non-zero) with exactly one ``distill: error:`` line and no traceback."""
    assert r.returncode != 0, (r.stdout[-2000:], r.stderr[-2000:])
    err = [line for line in r.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Two 12-sample demo shards, 12 val samples, and a finished 2-epoch cache of them (CLI-made)."""
    tmp = tmp_path_factory.mktemp("tiny")
    shards = demo_head(tmp, 12, ["train-000000.tar", "train-000001.tar"])
    val = demo_head(tmp, 12, split="val", shards=["val-000000.tar"])
    r = distill("cache-teacher", "--shards", shards, "--out", tmp / "cache", *CACHE_FLAGS)
    assert r.returncode == 0, r.stderr
    return {"shards": shards, "val": val, "cache": tmp / "cache"}


def _images(root: Path, n: int = 40) -> Path:
    """A 2-class tree of n real 64x64 PNGs (about 10 KB each: shards larger than 40 KB)."""
    for i in range(n):
        p = root / ("a" if i % 2 else "b") / f"x{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(image_bytes("PNG", (64, 64), seed=i))
    return root


# ----------------------------------------------------------------------------- only its own directories

def test_overwrite_leaves_a_foreign_file_and_bytes_per_record_counts_the_cache_only(tiny, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(tiny["cache"], out)
    (out / "mydata.arrow").write_bytes(b"user data " * 10_000)          # a user's file in the cache directory
    r = distill("cache-teacher", "--shards", tiny["shards"], "--out", out, *CACHE_FLAGS[:-3], "--epochs", "1",
                "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "mydata.arrow").read_bytes() == b"user data " * 10_000
    m = json.loads((out / "manifest.json").read_text())
    own = sum((out / e["file"]).stat().st_size for e in m["shards"]) + sum(
        (out / n).stat().st_size for n in ("manifest.json", "run.json"))
    per = own / m["totals"]["records"]
    assert f"{per:.1f} B/record" in r.stdout, r.stdout                  # not counting mydata.arrow's 100 KB
    shown = distill("inspect", out)
    assert f"{per:.1f} B/record" in shown.stdout, shown.stdout


@pytest.mark.parametrize("stage", ["train-student", "filter-labels"])
def test_out_a_foreign_directory_is_refused_and_left_unchanged(tiny, tmp_path, stage):
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "summary.json").write_text('{"format": "distill-filter", "mine": true}\n')   # a filter's, for train
    (foreign / "notes.txt").write_text("keep me\n")
    before = snapshot(foreign)
    if stage == "train-student":
        r = distill("train-student", "--shards", tiny["shards"], "--cache", tiny["cache"], "--out", foreign, *TRAIN_FLAGS)
        one_line_error(r, f"--out {foreign} is not empty", "train-student")
    else:
        (foreign / "summary.json").unlink()
        before = snapshot(foreign)
        r = distill("filter-labels", "--shards", tiny["shards"], "--scorer", DEMO_TEACHER, "--scorer-input-size", "32",
                    "--out", foreign, "--quiet")
        one_line_error(r, f"--out {foreign} is not empty", "filter-labels")
    assert snapshot(foreign) == before


def test_write_shards_into_the_input_folder_is_refused(tiny, tmp_path):
    shards = tmp_path / "train"
    shutil.copytree(tiny["shards"], shards)
    before = snapshot(shards)
    r = distill("filter-labels", "--shards", shards, "--scorer", DEMO_TEACHER, "--scorer-input-size", "32",
                "--out", tmp_path / "filter", "--write-shards", shards, "--quiet")
    one_line_error(r, f"--write-shards {shards}", "input")
    assert snapshot(shards) == before
    assert not (tmp_path / "filter").exists()


def _stage_argv(stage: str, tiny: dict, out: Path) -> list:
    return {"make-shards": ["make-shards", tiny["shards"].parent / "images", out],
            "adapt-teacher": ["adapt-teacher", "--base", "vit-mini", "--shards", tiny["shards"], "--val-shards",
                              tiny["val"], "--out", out],
            "filter-labels": ["filter-labels", "--shards", tiny["shards"], "--scorer", DEMO_TEACHER, "--out", out],
            "cache-teacher": ["cache-teacher", "--shards", tiny["shards"], "--out", out, *CACHE_FLAGS],
            "train-student": ["train-student", "--shards", tiny["shards"], "--cache", tiny["cache"], "--out", out,
                              *TRAIN_FLAGS],
            "convert-cache": ["convert-cache", V1, out]}[stage]


@pytest.mark.parametrize("stage", ["make-shards", "adapt-teacher", "filter-labels", "cache-teacher", "train-student",
                                   "convert-cache"])
def test_out_a_file_is_one_line(tiny, tmp_path, stage):
    _images(tiny["shards"].parent / "images", 2)
    out = tmp_path / "afile"
    out.write_text("not a directory\n")
    r = distill(*_stage_argv(stage, tiny, out))
    one_line_error(r, f"{out} is a file, not a directory")
    assert out.read_text() == "not a directory\n"


# ----------------------------------------------------------------------------- faults of the machine

@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` mounted at path (root only: skipped elsewhere)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fsize_limit(limit: int):
    """preexec_fn: files of this process may not grow past ``limit`` bytes (RLIMIT_FSIZE) and SIGXFSZ
    is ignored, so a write past it fails with EFBIG: the kernel's own refusal, as on a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("how", ["tmpfs", "fsize"])
def test_full_disk_is_one_line_and_the_rerun_completes_identically(tmp_path, how):
    """make-shards into a 40 KB tmpfs (ENOSPC; needs root to mount) or, everywhere, with its files
    limited to 40 KB by RLIMIT_FSIZE (EFBIG): one line, no traceback, no file under a final name
    half-written, no temp left; the rerun with space writes the same bytes as a run that never failed."""
    src = _images(tmp_path / "images")
    ref = tmp_path / "ref"
    assert distill("make-shards", src, ref, "--shard-size", "100", "--quiet").returncode == 0
    if how == "tmpfs":
        with _tmpfs(tmp_path / "small", "40k") as mnt:
            out = mnt / "out"
            r = distill("make-shards", src, out, "--shard-size", "100", "--quiet")
            no_traceback_line(r, str(out), "No space left on device", "rerun")
            assert not out.exists()                              # created by the run, left empty: removed
            subprocess.run(["mount", "-o", "remount,size=10m", str(mnt)], check=True)
            r = distill("make-shards", src, out, "--shard-size", "100", "--quiet")
            assert r.returncode == 0, r.stderr
            assert snapshot(out).keys() == snapshot(ref).keys()
            assert all((out / n).read_bytes() == (ref / n).read_bytes() for n in os.listdir(ref))
        return
    out = tmp_path / "out"
    r = distill("make-shards", src, out, "--shard-size", "100", "--quiet", preexec_fn=_fsize_limit(40_000))
    no_traceback_line(r, str(out), "File too large", "rerun")
    assert r.returncode == 1
    assert not out.exists()                  # no temp, no half shard, no index: the directory it made is gone
    r = distill("make-shards", src, out, "--shard-size", "100", "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    assert all((out / n).read_bytes() == (ref / n).read_bytes() for n in os.listdir(ref))


def test_read_only_out_is_one_line(tmp_path):
    """A read-only --out: a read-only bind mount as root (root ignores permission bits), else chmod 0555."""
    src = _images(tmp_path / "images", 4)
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", str(out), str(out)], capture_output=True).returncode != 0:
            pytest.skip("cannot bind-mount here")
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(out)], check=True)
            r = distill("make-shards", src, out, "--quiet")
        finally:
            subprocess.run(["umount", "-l", str(out)], check=False)
        no_traceback_line(r, str(out), "Read-only file system")
    else:
        out.chmod(0o555)
        try:
            r = distill("make-shards", src, out, "--quiet")
        finally:
            out.chmod(0o755)
        no_traceback_line(r, str(out), "Permission denied")
    assert r.returncode == 1


# ----------------------------------------------------------------------------- SIGTERM

def _term_when(cmd: list, ready, timeout: float = 180) -> subprocess.CompletedProcess:
    """Start cmd; once ``ready()`` holds, SIGTERM its process (the distill process only, as a
    scheduler does); wait for it to end."""
    p = subprocess.Popen([str(a) for a in cmd], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not ready() and p.poll() is None:
            time.sleep(0.05)
        assert p.poll() is None, p.communicate()
        os.kill(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        kill_group(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _cleanly_terminated(r: subprocess.CompletedProcess, hint: str) -> None:
    assert r.returncode == 143, (r.returncode, r.stderr[-3000:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("distill: terminated (SIGTERM); ") and hint in lines[0], r.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_during_cache_teacher_resumes(tiny, tmp_path):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "distill.cli", "cache-teacher", "--shards", tiny["shards"], "--out", out, *CACHE_FLAGS]
    r = _term_when(cmd, lambda: any(out.glob("*.arrow")))
    _cleanly_terminated(r, "rerun the same command to resume")
    assert not (out / LOCK_NAME).exists() and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    r = distill(*cmd[3:])
    assert r.returncode == 0 and "1 shard(s) reused" in r.stdout, (r.stdout, r.stderr)
    ref = json.loads((tiny["cache"] / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert [e["file_sha256"] for e in got["shards"]] == [e["file_sha256"] for e in ref["shards"]]


def test_sigterm_during_train_student_resumes(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distill.cli", "train-student", "--shards", tiny["shards"], "--cache", tiny["cache"],
           "--val-shards", tiny["val"], "--out", out, *TRAIN_FLAGS]
    r = _term_when(cmd, lambda: (out / "metrics.jsonl").exists())
    _cleanly_terminated(r, "--resume")
    assert not (out / LOCK_NAME).exists()
    assert not list(tiny["cache"].glob(READER_PREFIX + "*"))
    r = distill(*cmd[3:], "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ----------------------------------------------------------------------------- the lock first

def test_locked_out_is_refused_before_ray_naming_the_holder(tiny, tmp_path):
    out = tmp_path / "cache"
    ray_tmp = tmp_path / "ray"
    with DirLock(out, "filter-labels").acquire():                   # held by this (test) process, as another stage
        t0 = time.monotonic()
        r = distill("cache-teacher", "--shards", tiny["shards"], "--out", out, *CACHE_FLAGS,
                    env=dict(ENV, RAY_TMPDIR=str(ray_tmp)))
        took = time.monotonic() - t0
    one_line_error(r, f"{out} is in use by distill filter-labels (pid {os.getpid()} on ")
    assert not ray_tmp.exists(), "Ray was started before the lock was checked"
    assert took < 30, took


# ----------------------------------------------------------------------------- debris

def test_stale_distill_temps_are_swept_and_a_users_are_left(tmp_path):
    src = _images(tmp_path / "images", 4)
    out = tmp_path / "shards"
    assert distill("make-shards", src, out, "--quiet").returncode == 0
    stale = out / ".train-000000.tar.0123456789ab.tmp"          # what a killed run leaves (atomic writes' names)
    stale.write_bytes(b"half a shard")
    (out / "notes.tmp").write_text("mine\n")
    (out / "mydata.arrow").write_text("mine too\n")
    r = distill("make-shards", src, out, "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert not stale.exists()
    assert (out / "notes.tmp").read_text() == "mine\n" and (out / "mydata.arrow").read_text() == "mine too\n"
    assert (out / "index.json").exists() and (out / "train-000000.tar").exists()


def test_reader_marks_of_ended_or_reused_pids_are_swept(tmp_path):
    """A mark records host, pid and the process's start time: the mark of an ended process, or of a
    pid now used by another process (the start time differs), is swept; a live reader's stays."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]   # field 22
        live = {"host": socket.gethostname(), "pid": p.pid, "pid_start": start, "what": "train-student"}
        reused = dict(live, pid_start=str(int(start) + 1))                  # same pid, another process
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        gone = dict(live, pid=int(dead.stdout))
        for name, info in (("live", live), ("reused", reused), ("gone", gone)):
            (tmp_path / f"{READER_PREFIX}{name}").write_text(json.dumps(info))
        (tmp_path / "notes.txt").write_text("x")
        assert [r["pid_start"] for r in live_readers(tmp_path)] == [live["pid_start"]]
        assert sorted(x.name for x in tmp_path.iterdir()) == [f"{READER_PREFIX}live", "notes.txt"]
    finally:
        p.kill()
        p.wait()


def test_convert_cache_killed_midway_reruns_to_the_same_cache(tmp_path):
    ref, new = tmp_path / "ref", tmp_path / "new"
    assert distill("convert-cache", V1, ref, "--quiet").returncode == 0
    shutil.copytree(ref, new)
    (new / "manifest.json").unlink()                             # what a kill between files leaves
    first = sorted(new.glob("*.arrow"))[0]
    first.unlink()
    (new / f".{first.name}.0123456789ab.tmp").write_bytes(b"half")
    r = distill("convert-cache", V1, new, "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(new)) == sorted(os.listdir(ref))
    assert all((new / n).read_bytes() == (ref / n).read_bytes() for n in os.listdir(ref))

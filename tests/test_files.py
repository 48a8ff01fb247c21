"""distill.files: the output-directory lock (held, in use, stale takeover, races) and the umask rules."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distill import files
from distill.files import LOCK_NAME, DirLock, UserError, lock_holder

REPO = Path(__file__).resolve().parents[1]

# Takes the lock on argv[1] (after waiting until time argv[2]), says so, then holds it argv[3] seconds.
HOLDER = textwrap.dedent("""
    import sys, time
    from distill.files import DirLock, UserError
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    try:
        lock = DirLock(sys.argv[1], "cache").acquire()
    except UserError as e:
        print("busy", e, flush=True)
        sys.exit(0)
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
    lock.release()
""")


def _python(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(p.stdout)
    assert not files._pid_alive(pid)
    return pid


def _write_lock(directory: Path, **info) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00",
                                "what": "cache", **info}))
    return path


def test_acquire_release_creates_parents(tmp_path):
    out = tmp_path / "a" / "b"
    with DirLock(out, "cache").acquire() as lock:
        assert isinstance(lock, DirLock) and lock.held
        info = json.loads((out / LOCK_NAME).read_text())
        assert set(info) == {"host", "pid", "pid_start", "started", "what"}
        assert (info["host"], info["pid"], info["what"]) == (socket.gethostname(), os.getpid(), "cache")
        assert lock_holder(out) is None and DirLock.held_by_other(out) is None      # our own lock
        with pytest.raises(UserError, match="in use"):                               # not re-entrant
            DirLock(out, "cache").acquire()
    assert not (out / LOCK_NAME).exists()
    with DirLock(out, "train"):                                                      # acquired on enter
        assert json.loads((out / LOCK_NAME).read_text())["what"] == "train"
    assert not (out / LOCK_NAME).exists() and lock_holder(out) is None


def test_release_keeps_a_lock_that_is_no_longer_ours(tmp_path):
    lock = DirLock(tmp_path, "cache").acquire()
    _write_lock(tmp_path, pid=os.getpid() + 1, host="elsewhere")
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()


def test_another_live_process_holds_the_lock(tmp_path):
    p = _python("-c", HOLDER, str(tmp_path), "0", "30")
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            DirLock(tmp_path, "filter").acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"pid {p.pid} on {socket.gethostname()}" in msg
        assert msg.startswith(f"{tmp_path} is in use by distill cache (")      # the holder's stage, not ours
        assert msg.endswith("; wait for it to finish or use another --out")
        holder = lock_holder(tmp_path)
        assert holder is not None and holder["pid"] == p.pid and holder["what"] == "cache"
    finally:
        p.kill()
        p.wait()
    # killed without releasing: its lock is now stale and gets taken over
    assert lock_holder(tmp_path) is None
    with DirLock(tmp_path, "filter").acquire():
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, capfd):
    pid = _dead_pid()
    _write_lock(tmp_path, pid=pid)
    assert lock_holder(tmp_path) is None
    capfd.readouterr()
    with DirLock(tmp_path, "cache").acquire():
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capfd.readouterr().err
    assert err == (f"distill: warning: taking over a stale lock on {tmp_path} "
                   f"(pid {pid} on {socket.gethostname()} is gone)\n")


def test_lock_of_another_host_counts_as_live(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host="some-other-host")
    assert lock_holder(tmp_path)["host"] == "some-other-host"
    with pytest.raises(UserError, match="on some-other-host, since 2020-01-01"):
        DirLock(tmp_path, "cache").acquire()


def test_unreadable_lock_is_stale_only_when_old(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(files, "_LOCK_READ_WAIT_S", 0.05)
    path = tmp_path / LOCK_NAME
    path.write_text('{"host": "x", "pi')                  # half-written
    assert lock_holder(tmp_path) is not None
    with pytest.raises(UserError, match="in use"):
        DirLock(tmp_path, "cache").acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    assert lock_holder(tmp_path) is None
    capfd.readouterr()
    with DirLock(tmp_path, "cache").acquire():
        pass
    assert "taking over a stale lock" in capfd.readouterr().err


def test_racing_takers_of_a_stale_lock_one_wins(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    start = time.time() + 0.6
    procs = [_python("-c", HOLDER, str(tmp_path), str(start), "0.8") for _ in range(6)]
    outs = [p.communicate(timeout=20)[0] for p in procs]
    assert sum(o.startswith("locked") for o in outs) == 1, outs
    assert all(o.startswith(("locked", "busy")) for o in outs), outs
    assert not (tmp_path / LOCK_NAME).exists()


def test_import_keeps_umask_and_writes_follow_it(tmp_path):
    script = textwrap.dedent("""
        import os, stat, sys
        os.umask(0o027)
        import distill, distill.files, distill.format
        assert os.umask(0o027) == 0o027, "import changed the umask"
        from distill.files import LOCK_NAME, DirLock, atomic_write_bytes
        p = os.path.join(sys.argv[1], "f.bin")
        atomic_write_bytes(p, b"x")
        with DirLock(sys.argv[1], "cache").acquire():
            lock_mode = stat.S_IMODE(os.stat(os.path.join(sys.argv[1], LOCK_NAME)).st_mode)
        print(oct(stat.S_IMODE(os.stat(p).st_mode)), oct(lock_mode))
    """)
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["0o640", "0o640"]

"""Fault cases: kill, corrupt and edit runs of the real CLI and see what distill makes of them.

    python tools/faults.py                     # 44 cases (11-14 min on 2 busy cores); a table, then one JSON line
    python tools/faults.py --quick             # 9 of them (~3 min)
    python tools/faults.py --only kill-tmp,crafted-pt2 --keep     # some cases; keep the temp dir
    PYTHONPATH=/path/to/checkout python tools/faults.py            # test that checkout's distill

Every command is ``python -m distill.cli ...`` in a subprocess that leads its own process group (killed
whole when it ends, times out or is killed on purpose), with the ``PYTHONPATH`` this script was given
(default: this checkout) and ``RAY_TMPDIR``/``TMPDIR`` inside the script's temp dir, so nothing is
written outside it. The data: the first 48 samples of three demo train shards (``shards/demo/train``),
the demo teacher (``shards/demo/teacher.pt``) at 32 px, ``pipelines/demo.toml``'s ``[policy]``, 2
epochs, top-5. First a reference cache is built undisturbed (and, for the train-student kill, an
undisturbed student run); each case then works on its own fresh copy in its own folder.

Outcome of a case (the worst of its steps, in this order of badness):

* survived identical -- the disturbed run, or its rerun / resume, exits 0 and its result is the
  reference's: every ``.arrow`` file byte for byte and the manifest's ``shards`` and ``totals`` equal
  (a student run: the same weights in ``last.pt`` and the same ``metrics.jsonl`` apart from timings).
* refused cleanly -- the command exits with its refusal status (2; ``distill verify``: 1 = it found
  problems, or 2; ``cache-teacher``: 1 = failed shards reported, or 2) with a short message: no
  Python traceback, at most MAX_STDERR_LINES lines on stderr; and no later consumer in the case
  accepted the damaged data.
* crashed -- a traceback, a death by a signal, a hang (past ``--timeout``), an exit status that is
  neither 0 nor the command's refusal status, or a refusal that prints more than a few lines.
* silently wrong -- exit 0 with a result that differs from the reference, or a consumer
  (``verify``, ``train-student --epochs 1``, ``inspect``) exits 0 on damaged data, or a file outside
  the command's output was written (hostile names), or a crafted teacher archive ran its pickle.

* not run -- the case could not set its fault up here (no tmpfs mount without root, the run ended
  before the kill point): it says nothing either way and is counted apart.

Silently wrong is the worst: it is the outcome a user cannot see. ``failures`` in the JSON line names
the silently-wrong and crashed cases; the exit status is 1 when there is any. A fault of this script
itself (an exception in a case) is reported as crashed with "FAULT SCRIPT ERROR" in its detail.

Cases are small functions registered with ``@case(name, what, expected, quick=...)``; each gets the
shared ``Ctx`` and its own empty folder and returns its steps' verdicts ``[(outcome, note), ...]``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "shards" / "demo"
TEACHER = DEMO / "teacher.pt"
V1_CACHE = REPO / "tests" / "data" / "v1-cache"
SHARDS = ("train-000000.tar", "train-000001.tar", "train-000002.tar")
HEAD = 48                   # samples taken from the start of each demo shard
EPOCHS, TOPK = 2, 5
MAX_STDERR_LINES = 5        # a refusal says what is wrong in a few lines

IDENT, REFUSED, CRASHED, WRONG = "survived identical", "refused cleanly", "crashed", "silently wrong"
NOTRUN = "not run"            # the case could not set up its fault here (e.g. no tmpfs, the run ended first)
BADNESS = {NOTRUN: -1, IDENT: 0, REFUSED: 1, CRASHED: 2, WRONG: 3}
Verdict = tuple[str, str]   # (outcome, note)


# ----------------------------------------------------------------------------- running the CLI

@dataclass
class Run:
    what: str                # the subcommand, for notes
    rc: int | None
    out: str = ""
    err: str = ""
    wall: float = 0.0
    timed_out: bool = False


@dataclass
class Ctx:
    tmp: Path
    env: dict
    timeout: float
    shards: Path = Path()    # reference shards (read-only for the cases)
    policy: Path = Path()
    cache: Path = Path()     # reference cache
    log: list = field(default_factory=list)

    def cli(self, *args, cwd: Path | None = None, timeout: float | None = None) -> Run:
        """``python -m distill.cli ARGS`` in its own process group; the group is killed when it ends."""
        argv = [sys.executable, "-m", "distill.cli", *map(str, args)]
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                             cwd=cwd or self.tmp, start_new_session=True)
        timed_out = False
        try:
            out, err = p.communicate(timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(p)
            out, err = p.communicate(timeout=60)
        finally:
            _kill_group(p)
        run = Run(str(args[0]), p.returncode, out, err, time.perf_counter() - t0, timed_out)
        self.log.append(f"$ distill {' '.join(map(str, args))}\n-> exit {run.rc} in {run.wall:.1f}s\n"
                        f"--- stdout\n{out[-3000:]}--- stderr\n{err[-3000:]}")
        return run

    def cli_killed(self, args, when: Callable[[float], bool], cwd: Path | None = None, poll: float = 0.001,
                   limit: float | None = None) -> tuple[bool, float]:
        """Start the command and SIGKILL its whole process group as soon as ``when(elapsed_s)`` is true.
        Returns (killed, at_s): killed is False when the command ended (or ``limit`` passed) first."""
        argv = [sys.executable, "-m", "distill.cli", *map(str, args)]
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env,
                             cwd=cwd or self.tmp, start_new_session=True)
        killed = False
        try:
            while p.poll() is None and time.perf_counter() - t0 < (limit or self.timeout):
                if when(time.perf_counter() - t0):
                    _kill_group(p)
                    killed = True
                    break
                time.sleep(poll)
        finally:
            _kill_group(p)
            p.wait()
        at = time.perf_counter() - t0
        self.log.append(f"$ distill {' '.join(map(str, args))}\n-> {'killed' if killed else 'not killed'} "
                        f"at {at:.2f}s (exit {p.returncode})")
        return killed, at

    # the commands of the cases, with the reference's settings
    def cache_args(self, out, shards=None, *extra) -> list:
        return ["cache-teacher", "--shards", shards or self.shards, "--teacher", TEACHER, "--out", out,
                "--teacher-input-size", "32", "--epochs", EPOCHS, "--topk", TOPK, "--policy", self.policy,
                "--workers", "1", "--threads", "1", "--quiet", *extra]

    def train_args(self, cache, out, shards=None, *extra) -> list:
        return ["train-student", "--shards", shards or self.shards, "--cache", cache, "--out", out,
                "--model", "tinyvit-tiny", "--image-size", "32", "--batch-size", "32", "--epochs", "1",
                "--threads", "1", "--quiet", *extra]


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- judging one step

def _message(run: Run) -> str:
    """The refusal's own words: distill's error line, else verify's first problem, else the last line."""
    lines = [x.strip() for x in run.err.splitlines() if x.strip()]
    for x in lines:
        if x.startswith("distill: error:") or x.startswith("distill:"):
            return _short(x)
    out = [x.strip() for x in run.out.splitlines() if x.strip()]
    problems = [x for x in out if not x.startswith("files and replayed views")]
    if run.what == "verify" and problems:
        return _short(problems[0])
    return _short((lines or out or ["(no message)"])[-1])


def _short(text: str, n: int = 150) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def crash(run: Run) -> str | None:
    """Why the run counts as a crash, or None."""
    if run.timed_out:
        return f"{run.what} hung (killed after the {run.wall:.0f}s limit)"
    if run.rc is not None and run.rc < 0:
        return f"{run.what} died of signal {-run.rc}"
    both = run.err + run.out
    if "Traceback (most recent call last)" in both:
        last = [x for x in run.err.splitlines() if x.strip()] or ["?"]
        return f"{run.what} exit {run.rc} with a traceback: {_short(last[-1].strip())}"
    for sign in ("Fatal Python error", "Segmentation fault", "core dumped"):
        if sign in both:
            return f"{run.what}: {sign}"
    return None


REFUSAL_CODES = {"verify": (1, 2), "cache-teacher": (1, 2)}


def must_refuse(run: Run, codes: tuple[int, ...] | None = None) -> Verdict:
    """The step gave the command damaged data: a clean refusal is right, exit 0 is silently wrong."""
    codes = codes or REFUSAL_CODES.get(run.what, (2,))
    c = crash(run)
    if c:
        return CRASHED, c
    if run.rc == 0:
        return WRONG, f"{run.what} exit 0 (accepted)"
    return _refusal(run, codes)


def _refusal(run: Run, codes: tuple[int, ...]) -> Verdict:
    lines = [x for x in run.err.splitlines() if x.strip()]
    if run.rc not in codes:
        return CRASHED, f"{run.what} exit {run.rc} (not a refusal status): {_message(run)}"
    if len(lines) > MAX_STDERR_LINES:
        return CRASHED, f"{run.what} exit {run.rc} but {len(lines)} lines on stderr: {_message(run)}"
    return REFUSED, f"{run.what} exit {run.rc}: {_message(run)}"


def must_match(run: Run, out: Path, ref: Path) -> Verdict:
    """The step should end with the reference cache (or refuse); exit 0 with another result is wrong."""
    c = crash(run)
    if c:
        return CRASHED, c
    if run.rc == 0:
        d = cache_diff(out, ref)
        return (IDENT, f"{run.what} exit 0, identical") if d is None else (WRONG, f"{run.what} exit 0 but {d}")
    return _refusal(run, REFUSAL_CODES.get(run.what, (2,)))


def worst(verdicts: list[Verdict]) -> str:
    return max((v[0] for v in verdicts), key=BADNESS.__getitem__)


# ----------------------------------------------------------------------------- files

def cache_diff(out: Path, ref: Path, ignore=("source",)) -> str | None:
    """None when ``out`` holds the reference cache: the same .arrow files byte for byte and the same
    manifest (its shard entries, totals and every other key but ``ignore``: ``source`` names the
    shards' folder); else what differs."""
    if not (out / "manifest.json").is_file():
        return "no manifest.json"
    try:
        m, r = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    except ValueError as e:
        return f"manifest.json unreadable ({e})"
    have, want = (sorted(p.name for p in d.glob("*.arrow")) for d in (out, ref))
    if have != want:
        return f".arrow files {have} != reference {want}"
    for name in want:
        if (out / name).read_bytes() != (ref / name).read_bytes():
            return f"{name} differs from the reference's"
    keys = sorted(k for k in set(m) | set(r) if k not in ignore and m.get(k) != r.get(k))
    if keys:
        return f"manifest {', '.join(keys)} differ(s) from the reference's"
    return None


def records_diff(out: Path, ref: Path) -> str | None:
    """None when two caches hold the same logical records (distill's reader), else what differs."""
    from distill.cache import open_cache
    a, b = open_cache(out).to_table(), open_cache(ref).to_table()
    return None if a.equals(b) else f"records differ ({a.num_rows} vs {b.num_rows} rows)"


def copy_cache(ctx: Ctx, dst: Path) -> Path:
    shutil.copytree(ctx.cache, dst, ignore=shutil.ignore_patterns(".distill.*"))
    return dst


def edit_manifest(cache: Path, fn: Callable[[dict], None]) -> None:
    m = json.loads((cache / "manifest.json").read_text())
    fn(m)
    (cache / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def flip_bit(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict:
    """{relative path: (size, mtime_ns, sha256)} of every file under ``root`` outside ``skip``
    (``.distill.*`` marks left out: they come and go with runs)."""
    snap = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith(".distill.") and not any(p.is_relative_to(s) for s in skip):
            st = p.stat()
            snap[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def snapshot_diff(before: dict, after: dict) -> str | None:
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if not changed:
        return None
    what = ["new " + k if k not in before else "removed " + k if k not in after else "changed " + k for k in changed]
    return "outside its output: " + ", ".join(what[:4]) + (f" (+{len(what) - 4})" if len(what) > 4 else "")


def listing(d: Path) -> str:
    return ", ".join(sorted(p.name for p in d.iterdir())) if d.is_dir() else "(no directory)"


# ----------------------------------------------------------------------------- building data

def write_head(dst: Path, n: int, names=SHARDS, bad: dict[str, int] | None = None) -> Path:
    """The first ``n`` samples of each named demo train shard, as shards of the same names with their
    index.json (distill's own writer); ``bad`` = {shard: position}: an undecodable JPEG (the first
    60 bytes of a real one) is put there as sample ``broken_<shard index>``."""
    from itertools import islice

    from distill.data.shards import Sample, iter_shard, write_shards
    from distill.format import ShardIndex
    classes = ShardIndex.read(DEMO / "train").classes
    samples = []
    for i, name in enumerate(names):
        got = list(islice((x for x in iter_shard(DEMO / "train" / name) if isinstance(x, Sample)), n))
        if bad and name in bad:
            got = got[:n - 1]
            got.insert(bad[name], Sample(f"broken_{i}", got[0].data[:60], "jpg", 0))
        samples += got
    index = write_shards(samples, dst, "train", n, classes)
    assert [e.name for e in index.shards] == list(names), index.shards
    return dst


def write_policy(path: Path) -> Path:
    """pipelines/demo.toml's [policy] table as a --policy file."""
    pol = tomllib.loads((REPO / "pipelines" / "demo.toml").read_text())["policy"]
    path.write_text("[policy]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in pol.items()))
    return path


def image_member(tar: Path, index: int) -> tarfile.TarInfo:
    """The image member of the ``index``-th sample of a shard (its ``offset_data`` is where its bytes start)."""
    with tarfile.open(tar) as t:
        images = [m for m in t.getmembers() if m.name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp")]
    return images[index]


def entropy_byte(data: bytes) -> int:
    """An offset near the middle of a JPEG whose low bit can flip without making or breaking a marker."""
    for i in range(len(data) // 2, len(data) - 2):
        if data[i - 1] != 0xFF and data[i] not in (0xFF, 0xFE) and data[i + 1] != 0x00:
            return i
    raise AssertionError("no byte to flip")


def pixels_changed(a: bytes, b: bytes) -> int | None:
    """How many pixels differ between two encodings of an image; None when ``b`` does not decode."""
    import numpy as np
    from PIL import Image

    def px(data):
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    try:
        pb = px(b)
    except Exception:
        return None
    pa = px(a)
    return int((pa != pb).any(-1).sum()) if pa.shape == pb.shape else int(pa.shape[0] * pa.shape[1])


def export_tiny_teacher(path: Path) -> Path:
    """A tiny 10-class CNN, exported with torch.export at 32 px (dynamic batch) and saved as .pt2."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    prog = torch.export.export(Tiny().eval(), (torch.zeros(2, 3, 32, 32),),
                               dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(prog, path)
    return path


class _WritesMarker:
    """Pickles as a call of ``open(path, "w")``: unpickling it creates the marker file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def rezip(src: Path, dst: Path, replace: dict[str, bytes]) -> list[str]:
    """Copy a zip archive member by member (stored, in order), with the members whose names end with
    a key of ``replace`` replaced. Returns the names replaced."""
    done = []
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            data = z.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
                    done.append(info.filename)
            out.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), data)
    return done


# ----------------------------------------------------------------------------- the cases

@dataclass
class Case:
    name: str
    what: str
    expected: str
    fn: Callable[[Ctx, Path], list[Verdict]]
    quick: bool


CASES: list[Case] = []


def case(name: str, what: str, expected: str, quick: bool = False):
    def register(fn):
        CASES.append(Case(name, what, expected, fn, quick))
        return fn
    return register


# -- 1. kills of cache-teacher, then the same command again

def _kill_and_rerun(ctx: Ctx, d: Path, when: Callable[[Path, float], bool], point: str,
                    tries: int = 1, wanted: Callable[[Path], bool] | None = None) -> list[Verdict]:
    """Kill the reference command at ``when(out, elapsed)``, then rerun it on the same output. With
    ``wanted``, up to ``tries`` kills (each on a fresh output) until one leaves what it asks for."""
    for i in range(tries):
        out = d / f"cache{i}"
        args = ctx.cache_args(out)
        killed, at = ctx.cli_killed(args, lambda t: when(out, t))
        if not killed or wanted is None or wanted(out):
            break
    left = listing(out)
    note = f"killed {point} at {at:.1f}s (left: {left})" if killed else f"NOT killed: the run ended first ({left})"
    if killed and wanted is not None and not wanted(out):
        note += f" [NOTE: {tries} tries, none left the state wanted]"
    v = must_match(ctx.cli(*args), out, ctx.cache)
    return [(v[0], f"{note}; rerun: {v[1]}")]


def _files(out: Path) -> list[str]:
    try:
        return os.listdir(out)
    except OSError:
        return []


def _arrow_tmp(out: Path) -> bool:
    return any(n.endswith(".tmp") and ".arrow." in n for n in _files(out))


@case("kill-early", "SIGKILL cache-teacher 0.5 s after start, rerun the same command", "identical")
def kill_early(ctx, d):
    return _kill_and_rerun(ctx, d, lambda out, t: t >= 0.5, "after 0.5 s")


@case("kill-run-json", "SIGKILL cache-teacher as soon as run.json appears, rerun", "identical")
def kill_run_json(ctx, d):
    return _kill_and_rerun(ctx, d, lambda out, t: "run.json" in _files(out), "when run.json appeared")


@case("kill-first-arrow", "SIGKILL cache-teacher when its first .arrow file appears, rerun", "identical", quick=True)
def kill_first_arrow(ctx, d):
    return _kill_and_rerun(ctx, d, lambda out, t: any(n.endswith(".arrow") for n in _files(out)),
                           "when the first .arrow appeared")


@case("kill-tmp", "SIGKILL cache-teacher while a .arrow .tmp file exists (mid-write), rerun", "identical")
def kill_tmp(ctx, d):
    # the window is the write and fsync of one file (milliseconds): up to 3 tries for a kill inside it
    v = _kill_and_rerun(ctx, d, lambda out, t: _arrow_tmp(out), "while a .arrow.*.tmp existed", tries=3,
                        wanted=_arrow_tmp)
    left = [n for out in d.iterdir() for n in _files(out) if n.endswith(".tmp")]
    return [(v[0][0], v[0][1] + (f" (the rerun left {', '.join(left)} in place)" if left else ""))]


@case("kill-manifest", "SIGKILL cache-teacher just after manifest.json appears, rerun", "identical")
def kill_manifest(ctx, d):
    return _kill_and_rerun(ctx, d, lambda out, t: "manifest.json" in _files(out), "when manifest.json appeared")


# -- 1b. a train-student kill, then --resume

@case("kill-train-resume", f"SIGKILL train-student ({EPOCHS} epochs, --drop-path 0.1) when epoch 1 is in metrics.jsonl, "
      "rerun with --resume; an undisturbed run alongside", "identical weights, metrics, summary")
def kill_train_resume(ctx, d):
    def one_epoch(run):
        try:
            return (run / "metrics.jsonl").read_text().count("\n") >= 1
        except OSError:
            return False
    return _kill_train(ctx, d, one_epoch, "when epoch 1 was in metrics.jsonl")


# -- 2. a bit flipped in a finished cache's .arrow file

def _flipped_copy(ctx: Ctx, d: Path) -> Path:
    cache = copy_cache(ctx, d / "cache")
    f = cache / "train-000001.arrow"
    flip_bit(f, f.stat().st_size // 2)
    return cache


@case("arrow-flip-rerun", "flip one bit in the middle of train-000001.arrow, rerun cache-teacher, then verify",
      "shard redone -> identical (verify ok), or refusal")
def arrow_flip_rerun(ctx, d):
    cache = _flipped_copy(ctx, d)
    first = must_match(ctx.cli(*ctx.cache_args(cache)), cache, ctx.cache)
    v = ctx.cli("verify", cache)
    if crash(v):
        return [first, (CRASHED, crash(v))]
    differs = cache_diff(cache, ctx.cache)
    if v.rc == 0 and differs:
        return [first, (WRONG, f"verify exit 0 although {differs}")]
    if v.rc == 0:
        return [first, (IDENT, "verify exit 0")]
    if not differs:
        return [first, (WRONG, f"verify exit {v.rc} on the reference's bytes: {_message(v)}")]
    return [first, _refusal(v, (1, 2))]


@case("arrow-flip-train", "flip one bit in the middle of train-000001.arrow, train-student --epochs 1",
      "refusal (exit 2)", quick=True)
def arrow_flip_train(ctx, d):
    cache = _flipped_copy(ctx, d)
    return [must_refuse(ctx.cli(*ctx.train_args(cache, d / "run")))]


@case("arrow-flip-verify", "flip one bit in the middle of train-000001.arrow, distill verify", "exit != 0")
def arrow_flip_verify(ctx, d):
    cache = _flipped_copy(ctx, d)
    return [must_refuse(ctx.cli("verify", cache))]


# -- 3. manifest edits, each followed by train-student and verify

def _manifest_case(name: str, what: str, edit: Callable[[dict], None], quick: bool = False):
    @case(name, f"manifest.json: {what}; train-student --epochs 1, verify", "refusal from both", quick)
    def fn(ctx, d):
        cache = copy_cache(ctx, d / "cache")
        edit_manifest(cache, edit)
        return [must_refuse(ctx.cli(*ctx.train_args(cache, d / "run"))), must_refuse(ctx.cli("verify", cache))]
    return fn


def _set(path: tuple, fn):
    def edit(m):
        obj = m
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = fn(obj[path[-1]])
    return edit


def _delete(path: tuple):
    def edit(m):
        obj = m
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]
    return edit


def _totals(m):
    m["totals"]["samples"] += 1
    m["totals"]["records"] += EPOCHS


_manifest_case("manifest-samples-lowered", "shards[1].samples lowered by 1", _set(("shards", 1, "samples"), lambda v: v - 1),
               quick=True)
_manifest_case("manifest-epochs-lowered", "epochs lowered by 1", _set(("epochs",), lambda v: v - 1))
_manifest_case("manifest-topk-changed", "topk 5 -> 3", _set(("topk",), lambda v: 3))
_manifest_case("manifest-records-changed", f"shards[1].records raised by {EPOCHS}",
               _set(("shards", 1, "records"), lambda v: v + EPOCHS))
_manifest_case("manifest-totals-changed", f"totals.samples +1 and totals.records +{EPOCHS}", _totals)
_manifest_case("manifest-no-classes", "key classes deleted", _delete(("classes",)))
_manifest_case("manifest-no-file-sha256", "key shards[1].file_sha256 deleted", _delete(("shards", 1, "file_sha256")))
_manifest_case("manifest-no-shards", "key shards deleted", _delete(("shards",)))
_manifest_case("manifest-samples-abc", 'shards[1].samples = "abc"', _set(("shards", 1, "samples"), lambda v: "abc"))
_manifest_case("manifest-cache-seed", "cache_seed 0 -> 1", _set(("cache_seed",), lambda v: 1))


# -- 4. a shard changed in place after caching

def _shard_edit(ctx: Ctx, d: Path, keep_mtime: bool) -> list[Verdict]:
    shards = d / "train"
    shutil.copytree(ctx.shards, shards)                  # copy2: the mtimes the cache recorded
    tar = shards / "train-000001.tar"
    m = image_member(tar, HEAD - 8)                      # not one of the first two (fingerprinted) samples
    with open(tar, "rb") as f:
        f.seek(m.offset_data)
        img = f.read(m.size)
    at = entropy_byte(img)
    st = tar.stat()
    flip_bit(tar, m.offset_data + at)
    if keep_mtime:
        os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    with open(tar, "rb") as f:
        f.seek(m.offset_data)
        changed = pixels_changed(img, f.read(m.size))
    note = f"flipped a bit of {m.name} (byte {at} of {m.size}; " + (
        "no longer decodes)" if changed is None else f"still decodes, {changed} pixels changed)")
    v = must_refuse(ctx.cli(*ctx.train_args(ctx.cache, d / "run", shards)))
    return [(v[0], f"{note}; {v[1]}")]


@case("shard-edited", "flip one bit in a later image of train-000001.tar (index.json kept), train-student --epochs 1",
      "refusal (exit 2)", quick=True)
def shard_edited(ctx, d):
    return _shard_edit(ctx, d, keep_mtime=False)


@case("shard-edited-mtime-kept", "as shard-edited, the tar's mtime set back to the cached one", "refusal (exit 2)")
def shard_edited_mtime_kept(ctx, d):
    return _shard_edit(ctx, d, keep_mtime=True)


# -- 5. an incomplete shard

@case("incomplete-shard", "shards without index.json, train-000001.tar cut at 60%: cache-teacher, then "
      "train-student, verify, inspect on its output", "cache-teacher exit 1; the rest refuse", quick=True)
def incomplete_shard(ctx, d):
    shards = d / "train"
    shards.mkdir()
    for name in SHARDS[:2]:
        shutil.copy2(ctx.shards / name, shards / name)
    tar = shards / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size * 6 // 10])
    out = d / "cache"
    verdicts = [must_refuse(ctx.cli(*ctx.cache_args(out, shards)))]
    verdicts.append(must_refuse(ctx.cli(*ctx.train_args(out, d / "run", shards))))
    verdicts.append(must_refuse(ctx.cli("verify", out)))
    r = ctx.cli("inspect", out)
    if r.rc == 0 and not crash(r):        # inspect may describe the cache, if it says it is incomplete
        text = r.out.replace(str(d), "").lower()       # (the case's own folder is named incomplete-shard)
        said = any(w in text for w in ("incomplete", "failed", "truncated", "not complete"))
        verdicts.append((REFUSED, "inspect exit 0, names the incomplete shard") if said else
                        (WRONG, "inspect exit 0 without a word about the incomplete shard"))
    else:
        verdicts.append(must_refuse(r))
    return verdicts


# -- 6. hostile file names in a manifest

def _hostile_v2(ctx: Ctx, d: Path, absolute: bool) -> list[Verdict]:
    """The only copy of train-000000.arrow moved outside the cache and the manifest pointed at it."""
    cache = copy_cache(ctx, d / "cache")
    if absolute:
        target = d / "elsewhere" / "abs.arrow"
        target.parent.mkdir()
        name = str(target)
    else:
        target, name = d / "x.arrow", "../x.arrow"
    os.replace(cache / "train-000000.arrow", target)
    edit_manifest(cache, _set(("shards", 0, "file"), lambda v: name))
    before = snapshot(d, skip=(d / "run",))
    verdicts = [must_refuse(ctx.cli("verify", cache)), must_refuse(ctx.cli(*ctx.train_args(cache, d / "run")))]
    moved = snapshot_diff(before, snapshot(d, skip=(d / "run",)))
    if moved:
        verdicts.append((WRONG, "wrote " + moved))
    return verdicts


@case("file-absolute", "manifest shards[0].file = an absolute path to a valid copy outside the cache: verify, "
      "train-student", "refusal from both; nothing written outside")
def file_absolute(ctx, d):
    return _hostile_v2(ctx, d, absolute=True)


@case("file-dotdot", 'manifest shards[0].file = "../x.arrow" (a valid copy there): verify, train-student',
      "refusal from both; nothing written outside", quick=True)
def file_dotdot(ctx, d):
    return _hostile_v2(ctx, d, absolute=False)


def _hostile_convert(ctx: Ctx, d: Path, absolute: bool) -> list[Verdict]:
    """convert-cache OLD NEW of tests/data/v1-cache with a hostile file name: OLD in d/a, NEW in d/b."""
    old, new = d / "a" / "old", d / "b" / "new"
    shutil.copytree(V1_CACHE, old)
    new.parent.mkdir()
    if absolute:             # read from there and written back there (NEW / an absolute path)
        src = d / "a" / "abs.arrow"
        name = str(src)
    else:                    # read from d/a/x.arrow, written to d/b/x.arrow (a decoy there)
        src, name = d / "a" / "x.arrow", "../x.arrow"
        (d / "b" / "x.arrow").write_bytes(b"decoy: convert-cache must not write here\n")
    os.replace(old / "train-000000.arrow", src)
    edit_manifest(old, _set(("shards", 0, "file"), lambda v: name))
    before = snapshot(d, skip=(new,))
    verdicts = [must_refuse(ctx.cli("convert-cache", old, new))]
    moved = snapshot_diff(before, snapshot(d, skip=(new,)))
    if moved:
        verdicts.append((WRONG, "wrote " + moved))
    return verdicts


@case("convert-absolute", "v1 cache, manifest shards[0].file = an absolute path (its file moved there): "
      "convert-cache OLD NEW", "refusal; nothing written outside NEW")
def convert_absolute(ctx, d):
    return _hostile_convert(ctx, d, absolute=True)


@case("convert-dotdot", 'v1 cache, manifest shards[0].file = "../x.arrow": convert-cache OLD NEW (decoy at NEW/../x.arrow)',
      "refusal; the decoy untouched")
def convert_dotdot(ctx, d):
    return _hostile_convert(ctx, d, absolute=False)


# -- 7. a crafted .pt2 teacher

@case("crafted-pt2", "a torch.export .pt2 whose sample-inputs pickle writes a marker file when loaded: "
      "cache-teacher --teacher crafted.pt2", "refusal; marker absent", quick=True)
def crafted_pt2(ctx, d):
    import torch
    clean = export_tiny_teacher(d / "clean.pt2")
    marker = d / "MARKER-the-pickle-ran"
    payload = io.BytesIO()
    torch.save(_WritesMarker(str(marker)), payload)
    crafted = d / "crafted.pt2"
    replaced = rezip(clean, crafted, {"data/sample_inputs/model.pt": payload.getvalue()})
    control = d / "control.pt2"               # the same rewrite with the original member: must still load
    rezip(clean, control, {})
    try:
        torch.export.load(control)
    except Exception as e:
        return [(CRASHED, f"FAULT SCRIPT ERROR: the rewritten (unchanged) archive does not load: {e}")]
    if len(replaced) != 1 or marker.exists():
        return [(CRASHED, f"FAULT SCRIPT ERROR: sample-inputs member not replaced cleanly ({replaced})")]
    args = ctx.cache_args(d / "cache")
    args[args.index("--teacher") + 1] = crafted
    r = ctx.cli(*args)
    if marker.exists():
        return [(WRONG, f"marker written: the archive's pickle ran (cache-teacher exit {r.rc})")]
    if r.rc == 0 and not crash(r):            # loaded without running it: the cache must be the clean teacher's
        args[args.index("--teacher") + 1] = clean
        args[args.index("--out") + 1] = d / "clean-cache"
        ref = ctx.cli(*args)
        if ref.rc != 0:
            return [(CRASHED, f"clean .pt2 teacher failed: {_message(ref)}")]
        diff = records_diff(d / "cache", d / "clean-cache")   # (the teacher's identity differs: so do the bytes)
        return [(IDENT, "marker absent; cache-teacher exit 0, the clean teacher's records") if diff is None else
                (WRONG, f"marker absent; cache-teacher exit 0 but {diff} from the clean teacher's")]
    v = must_refuse(r, (2,))
    return [(v[0], "marker absent; " + v[1])]


# -- 8. determinism: views in the worker's thread vs view loader processes over a shard with an undecodable image

@case("view-workers", "shards with one undecodable image: cache-teacher by default and with --view-workers 2",
      "byte-identical caches")
def view_workers(ctx, d):
    shards = write_head(d / "train", HEAD, SHARDS[:2], bad={"train-000000.tar": 10})
    a, b = d / "threads", d / "processes"
    ra = ctx.cli(*ctx.cache_args(a, shards))
    c = crash(ra)
    if c or ra.rc != 0:
        return [(CRASHED, c or f"default run exit {ra.rc}: {_message(ra)}")]
    m = json.loads((a / "manifest.json").read_text())
    skipped = [s["key"] for e in m["shards"] for s in e["skipped"]]
    note = f"skipped {skipped}" if skipped == ["broken_0"] else f"NOTE: skipped {skipped}, expected ['broken_0']"
    v = must_match(ctx.cli(*ctx.cache_args(b, shards, "--view-workers", "2")), b, a)
    return [(v[0], f"{note}; --view-workers 2: {v[1]}")]


# -- 9. runs that end right: kills at each checkpoint write, SIGTERM, bad numbers, bad teachers,
#       other people's files, a full disk, a held lock

def _train_args(ctx: Ctx, out: Path, *extra) -> list:
    """train-student for EPOCHS epochs with drop path on (the model draws random numbers every step)
    and the demo's val shards (so best.pt, best.json and class_stats.npz are written)."""
    a = ctx.train_args(ctx.cache, out, None, "--drop-path", "0.1", "--val-shards", DEMO / "val", *extra)
    a[a.index("--epochs") + 1] = str(EPOCHS)
    return a


def _run_files(p: Path) -> dict:
    """What a finished student run holds: last.pt weights, metrics rows (timings left out), the summary's
    final/best, best.pt's epoch, whether class_stats.npz exists."""
    import torch
    drop = ("img_s", "time_s")
    out = {"weights": torch.load(p / "last.pt", map_location="cpu", weights_only=True)["model"],
           "metrics": [{k: v for k, v in json.loads(x).items() if k not in drop}
                       for x in (p / "metrics.jsonl").read_text().splitlines() if x.strip()],
           "class_stats": (p / "class_stats.npz").is_file()}
    s = json.loads((p / "summary.json").read_text())
    out["summary"] = {k: s.get(k) for k in ("final_top1", "final_top5", "best_top1", "best_epoch", "epochs", "images_seen")}
    out["best_pt_epoch"] = torch.load(p / "best.pt", map_location="cpu", weights_only=True).get("epoch") \
        if (p / "best.pt").is_file() else None
    return out


def _run_diff(a: dict, b: dict) -> str | None:
    import torch
    wa, wb = a["weights"], b["weights"]
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        return "weights differ"
    for k in ("metrics", "summary", "best_pt_epoch", "class_stats"):
        if a[k] != b[k]:
            return f"{k} differ(s): {_short(str(b[k]), 100)} vs the undisturbed {_short(str(a[k]), 100)}"
    return None


def _train_reference(ctx: Ctx) -> tuple[Path | None, Verdict | None]:
    ref = ctx.tmp / "ref-train"
    if (ref / "summary.json").is_file():
        return ref, None
    r = ctx.cli(*_train_args(ctx, ref))
    if r.rc != 0:
        return None, (CRASHED, f"FAULT SCRIPT ERROR: the undisturbed student run failed (exit {r.rc}): {_message(r)}")
    return ref, None


def _kill_train(ctx: Ctx, d: Path, when: Callable[[Path], bool], point: str, tries: int = 3) -> list[Verdict]:
    """SIGKILL train-student at ``when(run_dir)`` (up to ``tries`` runs until one is killed there), then
    ``--resume`` until it completes: the result must equal the undisturbed run's."""
    ref, err = _train_reference(ctx)
    if err:
        return [err]
    for i in range(tries):
        run = d / f"run{i}"
        killed, at = ctx.cli_killed(_train_args(ctx, run), lambda t: when(run))
        if killed:
            break
    if not killed:
        return [(NOTRUN, f"NOT killed {point}: the run ended first ({tries} tries)")]
    note = f"killed {point} at {at:.1f}s (left: {listing(run)})"
    r = ctx.cli(*_train_args(ctx, run), "--resume")
    c = crash(r)
    if c:
        return [(CRASHED, f"{note}; {c}")]
    if r.rc != 0:
        v = _refusal(r, (2,))
        return [(v[0], f"{note}; resume: {v[1]}")]
    try:
        diff = _run_diff(_run_files(ref), _run_files(run))
    except (OSError, ValueError, KeyError) as e:
        diff = f"the resumed run's files are incomplete ({type(e).__name__}: {e})"
    return [(IDENT, f"{note}; --resume exit 0, same weights, metrics, summary, best.pt") if diff is None
            else (WRONG, f"{note}; --resume exit 0 but {diff}")]


def _tmp_of(run: Path, name: str) -> bool:
    return any(n.startswith(f".{name}.") and n.endswith(".tmp") for n in _files(run))


def _last_epoch(run: Path) -> int:
    try:
        return int(json.loads((run / "last.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@case("kill-train-last-json", "train-student --drop-path 0.1: SIGKILL right after epoch 1's last.json, --resume",
      "identical to the undisturbed run (weights, metrics rows, summary, best.pt)")
def kill_train_last_json(ctx, d):
    return _kill_train(ctx, d, lambda run: _last_epoch(run) >= 1, "when last.json said epoch 1")


@case("kill-train-best", f"train-student --drop-path 0.1: SIGKILL while epoch {EPOCHS}'s best.pt is being written, --resume",
      "identical to the undisturbed run")
def kill_train_best(ctx, d):
    return _kill_train(ctx, d, lambda run: _tmp_of(run, "best.pt") and _last_epoch(run) >= EPOCHS,
                       f"while epoch {EPOCHS}'s best.pt was written")


@case("kill-train-summary", "train-student --drop-path 0.1: SIGKILL while summary.json is being written, --resume",
      "identical to the undisturbed run")
def kill_train_summary(ctx, d):
    return _kill_train(ctx, d, lambda run: _tmp_of(run, "summary.json"), "while summary.json was written")


def _term(ctx: Ctx, args: list, when: Callable[[], bool], limit: float = 120) -> tuple[Run, bool]:
    """Start the command; once ``when()`` send SIGTERM to its main process only (as a scheduler stops a
    job), then wait for it to exit."""
    argv = [sys.executable, "-m", "distill.cli", *map(str, args)]
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ctx.env,
                         cwd=ctx.tmp, start_new_session=True)
    sent = False
    try:
        while p.poll() is None and time.perf_counter() - t0 < limit:
            if when():
                p.send_signal(signal.SIGTERM)
                sent = True
                break
            time.sleep(0.005)
        try:
            out, err = p.communicate(timeout=60)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(p)
            out, err = p.communicate(timeout=60)
            timed_out = True
    finally:
        _kill_group(p)
    run = Run(str(args[0]), p.returncode, out, err, time.perf_counter() - t0, timed_out)
    ctx.log.append(f"$ distill {' '.join(map(str, args))}  (SIGTERM {'sent' if sent else 'not sent'})\n"
                   f"-> exit {run.rc}\n--- stderr\n{err[-3000:]}")
    return run, sent


def _terminated(run: Run, sent: bool, out: Path) -> Verdict:
    """A SIGTERM'd command: a clean exit (130 or 143) with the resume command, no lock left."""
    if not sent:
        return NOTRUN, "NOT terminated: the run ended first"
    c = crash(run)
    if c:
        return CRASHED, f"SIGTERM: {c}"
    lines = [x for x in run.err.splitlines() if x.strip()]
    left = [n for n in _files(out) if n.startswith(".distill.lock")]
    if run.rc not in (130, 143) or "rerun" not in run.err or len(lines) > MAX_STDERR_LINES or left:
        return CRASHED, (f"SIGTERM: exit {run.rc}, {len(lines)} stderr line(s), "
                         f"{'lock left, ' if left else ''}last: {_short(lines[-1] if lines else '(none)')}")
    return IDENT, f"SIGTERM: exit {run.rc}: {_message(run)}"


@case("sigterm-cache", "SIGTERM cache-teacher's main process when its first .arrow appears, rerun the same command",
      "clean exit with the resume command; rerun identical")
def sigterm_cache(ctx, d):
    out = d / "cache"
    args = ctx.cache_args(out)
    run, sent = _term(ctx, args, lambda: any(n.endswith(".arrow") for n in _files(out)))
    return [_terminated(run, sent, out), must_match(ctx.cli(*args), out, ctx.cache)]


@case("sigterm-train", "SIGTERM train-student (--drop-path 0.1) once last.json says epoch 1, then --resume",
      "clean exit with the resume command; resume identical")
def sigterm_train(ctx, d):
    ref, err = _train_reference(ctx)
    if err:
        return [err]
    run = d / "run"
    r, sent = _term(ctx, _train_args(ctx, run), lambda: _last_epoch(run) >= 1)
    first = _terminated(r, sent, run)
    marks = [n for n in _files(ctx.cache) if n.startswith(".distill.reader")]
    if marks:
        first = (CRASHED, f"{first[1]}; reader mark(s) left in the cache: {', '.join(marks)}")
    res = ctx.cli(*_train_args(ctx, run), "--resume")
    c = crash(res)
    if c or res.rc != 0:
        return [first, (CRASHED, c) if c else _refusal(res, (2,))]
    diff = _run_diff(_run_files(ref), _run_files(run))
    return [first, (IDENT, "--resume exit 0, identical") if diff is None else (WRONG, f"--resume exit 0 but {diff}")]


def _before_start(ctx: Ctx, d: Path, args: list, out: Path) -> list[Verdict]:
    """A bad value: refused (exit 2) before anything is written (``out`` not created)."""
    v = must_refuse(ctx.cli(*args), (2,))
    if out.exists():
        return [(WRONG if v[0] == IDENT else v[0], f"{v[1]}; and {out.name}/ was created ({listing(out)})")]
    return [v]


@case("nan-temperature", "cache-teacher --temperature nan", "refusal (exit 2) before anything is written", quick=True)
def nan_temperature(ctx, d):
    out = d / "cache"
    return _before_start(ctx, d, ctx.cache_args(out, None, "--temperature", "nan"), out)


@case("inf-lr", "train-student --lr inf", "refusal (exit 2) before anything is written")
def inf_lr(ctx, d):
    out = d / "run"
    return _before_start(ctx, d, ctx.train_args(ctx.cache, out, None, "--lr", "inf"), out)


@case("toml-nan-weight-decay", "distill run PIPELINE.toml with [train-student] weight-decay = nan",
      "refusal (exit 2) before anything is written")
def toml_nan_weight_decay(ctx, d):
    out = d / "run"
    toml = d / "pipeline.toml"
    toml.write_text(f'[data]\ntrain = "{ctx.shards}"\n\n[train-student]\ncache = "{ctx.cache}"\nout = "{out}"\n'
                    f'model = "tinyvit-tiny"\nimage-size = 32\nepochs = 1\nthreads = 1\nweight-decay = nan\n')
    return _before_start(ctx, d, ["run", toml, "--quiet"], out)


def _script_teacher(path: Path, tail: str) -> Path:
    """The demo teacher with ``tail`` applied to its logits (softmax, nan-some), saved as TorchScript."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self, inner, tail: str):
            super().__init__()
            self.inner, self.tail = inner, tail

        def forward(self, x):
            y = self.inner(x)
            if self.tail == "softmax":
                return y.softmax(-1)
            bad = x.mean(dim=(1, 2, 3)) > 0.0               # about half the views: NaN logits
            return torch.where(bad[:, None], torch.full_like(y, float("nan")), y)
    torch.jit.script(Wrapped(torch.jit.load(str(TEACHER)), tail)).save(str(path))
    return path


def _no_nan_records(out: Path) -> str | None:
    import numpy as np
    import pyarrow as pa
    for f in sorted(out.glob("*.arrow")):
        with pa.memory_map(str(f)) as src:
            t = pa.ipc.open_file(src).read_all()
        for name in t.column_names:
            col = t.column(name).combine_chunks()
            if pa.types.is_list(col.type) and pa.types.is_floating(col.type.value_type):
                if not np.isfinite(col.flatten().to_numpy(zero_copy_only=False).astype("float64")).all():
                    return f"{f.name} holds non-finite {name}"
    return None


@case("softmax-teacher", "a TorchScript teacher ending in softmax: cache-teacher", "refusal naming the outputs")
def softmax_teacher(ctx, d):
    args = ctx.cache_args(d / "cache")
    args[args.index("--teacher") + 1] = _script_teacher(d / "softmax.pt", "softmax")
    return [must_refuse(ctx.cli(*args))]


@case("nan-teacher", "a TorchScript teacher giving NaN logits for about half its inputs: cache-teacher, then verify",
      "refusal; no record with a non-finite value")
def nan_teacher(ctx, d):
    out = d / "cache"
    args = ctx.cache_args(out)
    args[args.index("--teacher") + 1] = _script_teacher(d / "nan.pt", "nan")
    v = must_refuse(ctx.cli(*args))
    bad = _no_nan_records(out) if out.is_dir() else None
    return [(WRONG, f"{v[1]}; {bad}") if bad else v]


@case("overwrite-foreign", "cache-teacher --overwrite into a folder holding a user's mydata.arrow and notes.txt",
      "refusal, or a cache beside them; the user's files untouched")
def overwrite_foreign(ctx, d):
    out = d / "mine"
    out.mkdir()
    (out / "mydata.arrow").write_bytes(b"the user's own arrow file")
    (out / "notes.txt").write_text("keep me\n")
    before = snapshot(out)
    r = ctx.cli(*ctx.cache_args(out, None, "--overwrite"))
    after = {k: v for k, v in snapshot(out).items() if k in before}
    if after != before:
        return [(WRONG, f"cache-teacher exit {r.rc}: the user's files changed or were deleted ({listing(out)})")]
    c = crash(r)
    return [(CRASHED, c) if c else (REFUSED, f"cache-teacher exit {r.rc}: {_message(r)}; user's files intact")
            if r.rc else (IDENT, "cache-teacher exit 0 beside the user's files, which are intact")]


def _untouched(ctx: Ctx, args: list, root: Path, what: str) -> list[Verdict]:
    before = snapshot(root)
    v = must_refuse(ctx.cli(*args), (2,))
    changed = snapshot_diff(before, snapshot(root))
    return [(WRONG, f"{v[1]}; {what} changed: {changed}")] if changed else [v]


@case("train-out-filter-dir", "train-student --out a filter-labels output directory", "refusal; the directory unchanged")
def train_out_filter_dir(ctx, d):
    fdir = d / "filter"
    r = ctx.cli("filter-labels", "--shards", ctx.shards, "--scorer", TEACHER, "--scorer-input-size", "32",
                "--out", fdir, "--workers", "1", "--threads", "1", "--quiet")
    if r.rc != 0:
        return [(CRASHED, f"FAULT SCRIPT ERROR: filter-labels failed (exit {r.rc}): {_message(r)}")]
    return _untouched(ctx, ctx.train_args(ctx.cache, fdir), fdir, "the filter directory")


@case("write-shards-input", "filter-labels --write-shards into its own --shards folder",
      "refusal; every input byte and mtime unchanged", quick=True)
def write_shards_input(ctx, d):
    shards = d / "train"
    shutil.copytree(ctx.shards, shards)
    return _untouched(ctx, ["filter-labels", "--shards", shards, "--scorer", TEACHER, "--scorer-input-size", "32",
                            "--out", d / "filter", "--write-shards", shards, "--workers", "1", "--threads", "1",
                            "--quiet"], shards, "the input shards")


@case("train-out-file", "train-student --out an existing file", "refusal (exit 2) in one line")
def train_out_file(ctx, d):
    f = d / "afile"
    f.write_text("x\n")
    return _untouched(ctx, ctx.train_args(ctx.cache, f), d, "the folder")


def _tmpfs(path: Path, size: str) -> str | None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exit {r.returncode}")


@case("disk-full", "cache-teacher --out a 40 KB tmpfs, then the same command with room",
      "one line (no traceback, nothing left under a final name); the rerun identical")
def disk_full(ctx, d):
    small = d / "small"
    why = _tmpfs(small, "40k")
    if why:
        return [(NOTRUN, f"cannot mount a tmpfs here ({_short(why, 80)})")]
    try:
        out = small / "cache"
        r = ctx.cli(*ctx.cache_args(out))
        left = [n for n in _files(out) if n.endswith(".tmp")]
        c = crash(r)
        if c:
            first = (CRASHED, f"full disk: {c}")
        elif r.rc == 0:
            first = (WRONG, "full disk: exit 0")
        else:
            lines = [x for x in r.err.splitlines() if x.strip()]
            first = ((CRASHED, f"full disk: {len(lines)} lines on stderr: {_message(r)}") if len(lines) > MAX_STDERR_LINES
                     else (REFUSED, f"full disk: exit {r.rc}: {_message(r)}"))
        if left:
            first = (CRASHED, f"{first[1]}; temp files left: {', '.join(left)}")
        big = d / "big"
        shutil.copytree(out, big / "cache", symlinks=True) if out.is_dir() else big.mkdir()
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
    out = big / "cache"
    return [first, must_match(ctx.cli(*ctx.cache_args(out)), out, ctx.cache)]


@case("lock-held", "a second cache-teacher on the --out of one still running", "refusal (exit 2) naming the holder, within 10 s")
def lock_held(ctx, d):
    out = d / "cache"
    args = ctx.cache_args(out)
    argv = [sys.executable, "-m", "distill.cli", *map(str, args)]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ctx.env, cwd=ctx.tmp,
                             start_new_session=True)
    try:
        t0 = time.perf_counter()
        while not (out / ".distill.lock").exists() and first.poll() is None and time.perf_counter() - t0 < 60:
            time.sleep(0.01)
        if first.poll() is not None:
            return [(NOTRUN, "the first command ended before its lock was seen")]
        r = ctx.cli(*args)
    finally:
        _kill_group(first)
        first.wait()
    v = must_refuse(r, (2,))
    if v[0] == REFUSED and (r.wall > 10 or str(first.pid) not in r.err):
        return [(CRASHED, f"{v[1]} (after {r.wall:.1f}s; holder pid {first.pid} "
                          f"{'named' if str(first.pid) in r.err else 'not named'})")]
    return [v]


# ----------------------------------------------------------------------------- main

def build_reference(ctx: Ctx) -> None:
    ref = ctx.tmp / "ref"
    ctx.shards = write_head(ref / "train", HEAD)
    ctx.policy = write_policy(ref / "policy.toml")
    ctx.cache = ref / "cache"
    r = ctx.cli(*ctx.cache_args(ctx.cache))
    if r.rc != 0 or crash(r):
        raise SystemExit(f"faults: the reference cache-teacher run failed (exit {r.rc}):\n{r.err[-3000:]}")


def table(rows: list[dict]) -> str:
    lines = ["| case | what was done | expected | outcome | detail |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['what']} | {r['expected']} | **{r['outcome']}** | {r['detail']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the cases marked quick (~2 min on 2 cores)")
    ap.add_argument("--only", help="comma-separated case names (see --list)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (printed) with every case's files and a log")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one command may run before it counts as a hang")
    a = ap.parse_args(argv)
    if a.list:
        for c in CASES:
            print(f"{c.name:<26} {'quick ' if c.quick else '      '}{c.what} -> {c.expected}")
        return 0
    cases = [c for c in CASES if c.quick] if a.quick else list(CASES)
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {c.name for c in CASES}]
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}; --list shows them")
        cases = [c for c in CASES if c.name in names]

    t_all = time.perf_counter()
    sys.dont_write_bytecode = True                      # no __pycache__ written into the checkout either
    pythonpath = os.environ.get("PYTHONPATH") or str(REPO)
    pythonpath = os.pathsep.join(str(Path(p).resolve()) for p in pythonpath.split(os.pathsep) if p)
    for p in reversed(pythonpath.split(os.pathsep)):    # this process builds data with the same distill
        sys.path.insert(0, p)
    tmp = Path(tempfile.mkdtemp(prefix="dfaults-"))
    (tmp / "t").mkdir()
    env = dict(os.environ, PYTHONPATH=pythonpath, RAY_TMPDIR=str(tmp / "t"), TMPDIR=str(tmp / "t"),
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    ctx = Ctx(tmp=tmp, env=env, timeout=a.timeout)
    print(f"faults: distill from {pythonpath}; temp dir {tmp}", flush=True)
    rows = []
    try:
        build_reference(ctx)
        print(f"   reference cache built in {time.perf_counter() - t_all:.0f}s", flush=True)
        ref_before = snapshot(tmp / "ref")        # the cases share it: none may change it
        for c in cases:
            d = tmp / "cases" / c.name
            d.mkdir(parents=True)
            t0 = time.perf_counter()
            ctx.log.append(f"===== {c.name}")
            try:
                verdicts = c.fn(ctx, d)
            except Exception as e:
                traceback.print_exc()
                verdicts = [(CRASHED, f"FAULT SCRIPT ERROR: {type(e).__name__}: {e}")]
            outcome = worst(verdicts)
            rows.append({"name": c.name, "what": c.what, "expected": c.expected, "outcome": outcome,
                         "detail": "; ".join(v[1] for v in verdicts).replace("|", "/"),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"   {c.name:<26} {outcome:<19} {time.perf_counter() - t0:5.0f}s", flush=True)
        ref_changed = snapshot_diff(ref_before, snapshot(tmp / "ref"))
        if ref_changed:        # every verdict compared against it is in doubt
            rows.append({"name": "reference-unchanged", "what": "the shared reference shards and cache",
                         "expected": "unchanged by the cases", "outcome": CRASHED,
                         "detail": "FAULT SCRIPT ERROR: the reference changed: " + ref_changed.split(": ", 1)[1]})
    finally:
        if a.keep:
            (tmp / "faults.log").write_text("\n\n".join(ctx.log) + "\n")
            print(f"kept {tmp} (commands and their output: {tmp / 'faults.log'})", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    count = {o: sum(r["outcome"] == o for r in rows) for o in BADNESS}
    print()
    print(table(rows))
    print()
    res = {"cases": len(rows), "survived_identical": count[IDENT], "refused_cleanly": count[REFUSED],
           "silently_wrong": count[WRONG], "crashed": count[CRASHED], "not_run": count[NOTRUN], "wall_s": round(time.perf_counter() - t_all, 1),
           "failures": [r["name"] for r in rows if r["outcome"] in (WRONG, CRASHED)],
           "rows": rows}
    print(json.dumps(res), flush=True)
    return 1 if count[WRONG] + count[CRASHED] else 0


if __name__ == "__main__":
    sys.exit(main())

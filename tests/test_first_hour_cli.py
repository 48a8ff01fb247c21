"""The first hour of a new user: CLI messages, truthful progress, interrupts, mismatch messages,
the README's test command and a fast start (issue 15, items 1, 5, 6, 7, 9, 10)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_group
from distill.format import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "shards" / "demo"
TEACHER = DEMO / "teacher.pt"
ENV = dict(os.environ, PYTHONPATH=str(REPO))

needs_demo = pytest.mark.skipif(not TEACHER.is_file(), reason="demo shards/teacher not generated")


def distill(*argv, timeout=300, cwd=None):
    return run_group([sys.executable, "-m", "distill.cli", *argv], env=ENV, timeout=timeout, cwd=cwd)


# ----------------------------------------------------------------------------- 1: messages

def test_version_flag():
    from distill import __version__
    r = distill("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"distill {__version__}", (r.stdout, r.stderr)


def test_usage_errors_carry_one_distill_prefix():
    r = distill()
    assert r.returncode == 2 and r.stderr.count("distill") == 1 and "required: COMMAND" in r.stderr, r.stderr
    r = distill("train-student", "--epochs", "x")       # a config flag's bad value: one line, one prefix
    assert r.returncode == 2 and r.stderr.count("distill:") == 1 and r.stderr.count("\n") == 1, r.stderr
    r = distill("verify")                                # a subcommand's argparse error names the subcommand once
    assert r.returncode == 2 and r.stderr.startswith("distill verify: error: ") and r.stderr.count("distill") == 1, r.stderr


def test_missing_required_lists_every_missing_option():
    r = distill("cache-teacher")
    assert r.returncode == 2 and "--shards, --teacher, --out" in r.stderr, r.stderr
    r = distill("filter-labels", "--shards", "x")
    assert r.returncode == 2 and "missing required option(s)" in r.stderr and "--scorer, --out" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- 6: interrupt

@needs_demo
def test_interrupt_says_the_rerun_resumes_and_names_the_command(tmp_path):
    """SIGINT during cache-teacher: exit 130, finished shards kept, and the message names the command
    that resumes."""
    out = tmp_path / "cache"
    argv = ["cache-teacher", "--shards", str(DEMO / "train"), "--teacher", str(TEACHER), "--out", str(out),
            "--epochs", "2", "--topk", "5", "--teacher-input-size", "32", "--workers", "1", "--threads", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(out.glob("*.arrow")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGSTOP)    # held: the run cannot finish between this check and the interrupt
    assert list(out.glob("*.arrow")) and not (out / MANIFEST_NAME).exists(), "no unfinished run to interrupt"
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("distill: interrupted")]
    assert line and "rerun the same command to resume" in line[0], err[-2000:]
    assert line[0].endswith("distill " + " ".join(argv)), line[0]


def test_interrupt_hint_for_train_student_adds_resume():
    from distill.cli import _resume_hint, build_parser
    argv = ["train-student", "--shards", "s", "--cache", "c", "--out", "o"]
    assert _resume_hint(build_parser().parse_args(argv), argv).endswith("distill " + " ".join(argv) + " --resume")


# ----------------------------------------------------------------------------- 5: progress

@pytest.fixture(scope="module")
def excluded_cache(tmp_path_factory):
    """A filter over 2 demo shards with 20% of labels flipped (it drops ~1 in 5), then a cache-teacher
    run with --exclude."""
    root = tmp_path_factory.mktemp("prog")
    flip = subprocess.run([sys.executable, str(REPO / "tools" / "flip_labels.py"), str(DEMO / "train"),
                           str(root / "flipped"), "--frac", "0.2", "--seed", "0"], capture_output=True, text=True)
    assert flip.returncode == 0, flip.stderr
    shards = f"{root}/flipped/train-{{000000..000001}}.tar"      # with its index.json: bar totals known
    common = ["--workers", "1", "--threads", "1"]
    f = distill("filter-labels", "--shards", shards, "--scorer", TEACHER, "--scorer-input-size", "32",
                "--out", root / "filter", "--rule", "confident", "--topk", "5", *common)
    assert f.returncode == 0, f.stderr[-3000:]
    c = distill("cache-teacher", "--shards", shards, "--teacher", TEACHER, "--teacher-input-size", "32",
                "--out", root / "cache", "--epochs", "2", "--topk", "5", "--exclude", root / "filter", *common)
    assert c.returncode == 0, c.stderr[-3000:]
    return root, shards, f, c


def _bar_lines(err: str, label: str) -> list[str]:
    return [x for x in re.split(r"[\r\n]", err) if x.startswith(label + ":")]


@needs_demo
def test_each_bar_names_its_stage_and_ends_at_100_percent(excluded_cache, tmp_path):
    root, shards, f, c = excluded_cache
    flt = _bar_lines(f.stderr, "filter-labels: scoring")
    assert flt and "100%" in flt[-1] and not _bar_lines(f.stderr, "cache-teacher"), f.stderr[-2000:]
    excluded = int(re.search(r"excluded (\d+)", c.stdout).group(1))
    assert excluded > 100, c.stdout                                     # 2 epochs x ~20% of 720
    bars = _bar_lines(c.stderr, "cache-teacher")
    assert bars and "100%" in bars[-1], c.stderr[-2000:]                 # the excluded left the total
    # shards without index.json: the total is unknown while it runs, and 100% at the end
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(DEMO / "train" / "train-000000.tar", bare / "train-000000.tar")
    r = distill("cache-teacher", "--shards", bare, "--teacher", TEACHER, "--teacher-input-size", "32",
                "--out", tmp_path / "c", "--topk", "5", "--workers", "1", "--threads", "1")
    bars = _bar_lines(r.stderr, "cache-teacher")
    assert r.returncode == 0 and bars and "100%" in bars[-1], r.stderr[-2000:]


@needs_demo
def test_a_fully_reused_run_says_so(excluded_cache):
    root, shards, _, _ = excluded_cache
    r = distill("cache-teacher", "--shards", shards, "--teacher", TEACHER, "--teacher-input-size", "32",
                "--out", root / "cache", "--epochs", "2", "--topk", "5", "--exclude", root / "filter",
                "--workers", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "all 2 shard(s) reused" in r.stdout and "records/s" not in r.stdout, r.stdout
    assert "all 2 shard(s) reused" in r.stderr and not _bar_lines(r.stderr, "cache-teacher"), r.stderr[-2000:]


# ----------------------------------------------------------------------------- 7: mismatch messages

@needs_demo
def test_shard_cache_mismatch_says_what_differs(excluded_cache, tmp_path):
    root, shards, _, _ = excluded_cache
    cache = root / "cache"
    # another dataset's shards under the same names: no shard is the cached one
    other = tmp_path / "other"
    other.mkdir()
    for mine, theirs in (("train-000000.tar", "train-000002.tar"), ("train-000001.tar", "train-000003.tar")):
        shutil.copy(DEMO / "train" / theirs, other / mine)
    r = distill("train-student", "--shards", other, "--cache", cache, "--out", tmp_path / "r1", "--model",
                "tinyvit-tiny", "--image-size", "32")
    assert r.returncode == 2 and "none of the 2 shard(s)" in r.stderr and "wrong --shards or --cache" in r.stderr, r.stderr
    assert "train-000000.tar has" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # one shard changed: counts and the name
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(root / "flipped" / "train-000000.tar", half / "train-000000.tar")
    shutil.copy(DEMO / "train" / "train-000003.tar", half / "train-000001.tar")
    r = distill("train-student", "--shards", half, "--cache", cache, "--out", tmp_path / "r2", "--model",
                "tinyvit-tiny", "--image-size", "32")
    assert r.returncode == 2 and "1 of the 2 shard(s)" in r.stderr and "train-000001.tar" in r.stderr, r.stderr
    assert "the other 1 match" in r.stderr, r.stderr
    # the demo's own folder (other names): no name matches
    r = distill("train-student", "--shards", DEMO / "train", "--cache", cache, "--out", tmp_path / "r3", "--model",
                "tinyvit-tiny", "--image-size", "32")
    assert r.returncode == 2 and "2 shard name(s) match" in r.stderr and "not in the cache" in r.stderr, r.stderr
    disjoint = tmp_path / "disjoint"
    disjoint.mkdir()
    shutil.copy(DEMO / "train" / "train-000002.tar", disjoint / "part-000000.tar")
    r = distill("train-student", "--shards", disjoint, "--cache", cache, "--out", tmp_path / "r4", "--model",
                "tinyvit-tiny", "--image-size", "32")
    assert r.returncode == 2 and "no shard name matches: wrong --shards or --cache?" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- 9: README test command

def test_readme_test_command_prints_pytests_summary_line(tmp_path):
    """The README's (b) command, run on one small test file: pytest's "N passed" line is printed
    (pyproject's addopts already has -q; a second -q hides it)."""
    readme = (REPO / "README.md").read_text()
    cmd = [line for b in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in b.splitlines()
           if "pytest" in line and not line.startswith("#")][0]
    pytest_part = cmd.split("&&")[-1].split()
    assert pytest_part[:3] == ["python", "-m", "pytest"], pytest_part
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    r = subprocess.run([sys.executable, "-m", "pytest", *pytest_part[3:], "-p", "no:cacheprovider", "test_one.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and re.search(r"\b1 passed\b", r.stdout), r.stdout


# ----------------------------------------------------------------------------- 10: fast start

@pytest.mark.parametrize("argv", [["--help"], ["train-student", "--help"], ["cache-teacher", "--help"]])
def test_help_imports_neither_torch_nor_ray_nor_arrow(argv):
    code = ("import sys\nfrom distill.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'ray', 'pyarrow', 'numpy', 'PIL') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]


@needs_demo
def test_inspect_imports_neither_torch_nor_ray(excluded_cache):
    root, shards, _, _ = excluded_cache
    for path in (root / "cache", root / "filter", DEMO / "train"):
        code = ("import sys\nfrom distill.cli import main\n"
                f"assert main(['inspect', {str(path)!r}]) == 0\n"
                "heavy = [m for m in ('torch', 'ray') if m in sys.modules]\nassert not heavy, heavy\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
        assert r.returncode == 0, (path, r.stderr[-2000:])


def test_make_shards_with_progress_and_a_bar_without_total(tmp_path):
    """A bar without a total (make-shards, shards without index.json) works when not --quiet
    (tqdm's bool() of such a bar raises TypeError)."""
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "src" / c / f"{c}{i}.png")
    r = distill("make-shards", tmp_path / "src", tmp_path / "out")
    assert r.returncode == 0 and "wrote 6 samples" in r.stdout, r.stderr[-2000:]
    assert "make-shards:" in r.stderr, r.stderr

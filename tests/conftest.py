"""Shared test builders: small synthetic images, image-folder trees, hand-made tars, the demo shards.

Builders are plain functions (usable from any test or fixture); fixtures wrap the common cases.
Add new builders under their own heading.
"""
from __future__ import annotations

import faulthandler
import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "shards" / "demo"


# ---------------------------------------------------------------------------------------------
# no test hangs the suite

TEST_LIMIT_S = int(os.environ.get("DISTILL_TEST_LIMIT_S", "600"))


class TimeLimitExceeded(Exception):
    """A test (setup, call and teardown together) ran past TEST_LIMIT_S."""


def _process_table() -> str:
    """Every process but the kernel's threads (pid, parent, group, age in s, state, command)."""
    r = subprocess.run(["ps", "-eo", "pid,ppid,pgid,etimes,stat,args", "--forest"], capture_output=True, text=True)
    rows = [x[:220] for x in r.stdout.splitlines() if x.split()[:2][-1:] != ["2"] and x.split()[:1] != ["2"]]
    return "\n".join(rows)[-6000:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Past TEST_LIMIT_S a test fails with every thread's stack and the process table printed, and the
    suite goes on; should even that not interrupt it, faulthandler ends the run 120 s later. A hang
    then costs one test, with its stacks in the log, not the whole CI budget."""
    def expired(signum, frame):
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(_process_table(), file=sys.stderr)
        raise TimeLimitExceeded(f"{item.nodeid} ran past {TEST_LIMIT_S} s (stacks and processes above)")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_LIMIT_S)
    faulthandler.dump_traceback_later(TEST_LIMIT_S + 120, exit=True)
    try:
        yield
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)


def run_group(argv: list, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True, timeout=...)``, but the command leads its own
    process group, killed whole when it ends or times out: no grandchild (a loader worker, a rank of
    torchrun) can outlive it holding the output pipes, which would make reading them wait forever."""
    p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate(timeout=30)
        raise subprocess.TimeoutExpired(p.args, timeout, out, err) from None
    finally:
        kill_group(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def nan_checkpoint(model, path: Path) -> Path:
    """``model``'s state dict with its first floating-point tensor all NaN, saved with torch.save: a
    corrupted --init / --base-checkpoint whose first training loss is not finite (whatever the lr)."""
    import torch
    state = model.state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    torch.save(state, path)
    return path


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """A CLI run refused with exit 2 and exactly one ``distill: error:`` line (no traceback) holding each
    of ``needles``; returns that line."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    err = [line for line in r.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL to the process group ``p`` leads (started with ``start_new_session=True``)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------
# images

def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (24, 20), seed: int = 0, mode: str = "RGB") -> bytes:
    """A small real image (smooth gradient plus a seeded blob) encoded as JPEG, PNG or WEBP."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    blob = 255 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.2 * max(w, h)) ** 2))
    channels = [(blob * c + (1 - c) * 255 * xx / max(w - 1, 1)) for c in rng.uniform(0.3, 1.0, 3)]
    im = Image.fromarray(np.stack(channels, -1).clip(0, 255).astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# image-folder trees (make-shards input)

def write_image_tree(root: Path, layout: dict[str, list[str]]) -> dict[str, bytes]:
    """Write ``root/<class>/<file>`` for each class; a file's format follows its extension (.png ->
    PNG, .webp -> WEBP, else JPEG). Returns {relative path: bytes written}."""
    written = {}
    for i, (cls, files) in enumerate(sorted(layout.items())):
        for j, name in enumerate(files):
            ext = name.rsplit(".", 1)[-1].lower()
            fmt = {"png": "PNG", "webp": "WEBP"}.get(ext, "JPEG")
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = image_bytes(fmt, seed=100 * i + j)
            path.write_bytes(data)
            written[f"{cls}/{name}"] = data
    return written


SMALL_TREE = {
    "bird": ["b0.jpg", "b1.png", "b2.jpeg"],
    "cat": ["c0.jpg", "c1.JPEG", "c2.png", "c3.webp"],
    "dog": ["d0.png", "d1.jpg"],
}


@pytest.fixture
def image_tree(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A 3-class folder tree (bird, cat, dog; 9 JPEG/PNG/WebP files) and {relative path: bytes}."""
    root = tmp_path / "images"
    return root, write_image_tree(root, SMALL_TREE)


# ---------------------------------------------------------------------------------------------
# hand-made tars (for reader tests: any member names and contents)

def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar with exactly these members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------------
# demo shards (committed under shards/demo; regenerated by tools/make_demo_data.py)

@pytest.fixture
def demo_dir() -> Path:
    if not (DEMO_DIR / "train" / "index.json").is_file():
        pytest.skip("demo shards not generated (python tools/make_demo_data.py)")
    return DEMO_DIR


# ---------------------------------------------------------------------------------------------
# Ray and the demo teacher (stage tests)

DEMO_TEACHER = DEMO_DIR / "teacher.pt"


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole test session: stages reuse it instead of starting their own."""
    import os
    import sys
    import ray
    from distill.engine import EMBEDDED_RAY_CONFIG
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=True,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}},
                 _system_config=EMBEDDED_RAY_CONFIG)      # as distill's embedded Ray
    yield
    ray.shutdown()


def demo_subset(tmp: Path, shards: list[str], split: str = "train") -> Path:
    """Copy some demo shards (by name) plus a matching index.json into tmp/<split>."""
    import shutil
    from distill.format import ShardIndex
    src = DEMO_DIR / split
    dst = tmp / split
    dst.mkdir(parents=True, exist_ok=True)
    index = ShardIndex.read(src)
    for name in shards:
        shutil.copy2(src / name, dst / name)
    ShardIndex(classes=index.classes, shards=[s for s in index.shards if s.name in shards]).write(dst)
    return dst


def demo_head(tmp: Path, n: int, shards: list[str] = ("train-000000.tar",), split: str = "train") -> Path:
    """The first n samples of each named demo shard, written as shards of the same names (they must be
    the split's first ones, in order) plus their index.json (the demo's classes) into tmp/<split>: a
    small real shard for tests whose point is not the data's size."""
    from itertools import islice
    from distill.data.shards import Sample, iter_shard, write_shards
    from distill.format import ShardIndex
    src = DEMO_DIR / split
    dst = tmp / split
    samples = [s for name in shards for s in islice((x for x in iter_shard(src / name) if isinstance(x, Sample)), n)]
    index = write_shards(samples, dst, split, n, ShardIndex.read(src).classes)
    assert [e.name for e in index.shards] == list(shards), [e.name for e in index.shards]
    return dst


def cache_config(shards, out, **kw):
    """A CacheConfig for the demo teacher (32x32 input), small and quiet."""
    from distill.config import CacheConfig
    base = dict(shards=str(shards), teacher=(str(DEMO_TEACHER),), out=str(out), epochs=2, topk=5,
                teacher_input_size=32, batch_size=64, quiet=True, workers=1, threads=1)
    base.update(kw)
    return CacheConfig(**base)


DEMO_POLICY = {"size": 32, "scale": [0.35, 1.0], "hflip": 0.0, "auto_augment": "rand-n1-m5-mstd0.5-inc1", "re_prob": 0.0}


# --- object storage: moto's S3 server on 127.0.0.1, for this test session ----------------------------

S3_SECRET = "sentinel-secret-3f9c2a7be1d04c55"     # no file distill writes may hold it (test_storage)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's standalone server) on 127.0.0.1, with credentials in the environment the
    way a user sets them; torn down at the end of the session."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    sys.path.insert(0, str(REPO / "tools"))
    from s3_server import s3_server as serve
    with serve(S3_SECRET) as url:
        yield url


@pytest.fixture
def bucket(s3_server, request):
    """A fresh, empty bucket: its s3:// URL."""
    import re

    from s3_server import make_bucket
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 10000}"
    return make_bucket(s3_server, name)

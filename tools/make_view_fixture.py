"""Build ``tests/data/view-fixture/``: tiny inputs and the cache cache-teacher wrote from them, the reference
``tests/test_view_fixture.py`` holds every later version of the view producers to (issue 29: "--view-workers
0/1/2 caches stay byte-identical to those of the main this work starts from").

The inputs: 3 webdataset shards of small JPEG/PNG images (an image Pillow cannot identify, a truncated JPEG
whose header parses but whose decode fails, a sample without label, a label out of range, a key that a
filter directory excludes), a TorchScript teacher (its weights are in the file: nothing depends on an RNG)
and a policy that erases and mixes in blocks of 8 (several blocks per shard; teacher batches of 6, so each
block's piece goes to the teacher in two batches). The cache: cache-teacher with 3 epochs and
``--view-workers`` 0, 1 and 2 (all three must agree, else nothing is written), its Arrow files and manifest.

Run it from a checkout of the code the fixture should capture, that checkout on PYTHONPATH and as the
working directory (embedded Ray's workers import distill from the driver's working directory first); the
fixture was made with commit 9c6da6f:

    git worktree add /tmp/base 9c6da6f && cd /tmp/base && PYTHONPATH=/tmp/base python THIS/tools/make_view_fixture.py
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "view-fixture"
POLICY = {"size": 32, "scale": [0.35, 1.0], "hflip": 0.5, "auto_augment": "rand-n1-m5-mstd0.5-inc1",
          "re_prob": 0.5, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 0.8, "mix_block": 8}
CONFIG = {"epochs": 3, "topk": 3, "teacher_input_size": 32, "batch_size": 6, "seed": 7}
EXCLUDED = ["a-drop"]


def image(fmt: str, size: tuple[int, int], seed: int, mode: str = "RGB") -> bytes:
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    blob = 255 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.25 * max(w, h)) ** 2))
    ch = [blob * c + (1 - c) * 255 * (xx if i % 2 else yy) / max(w, h) for i, c in enumerate(rng.uniform(0.3, 1, 3))]
    im = Image.fromarray(np.stack(ch, -1).clip(0, 255).astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def samples(prefix: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        fmt, ext = ("PNG", "png") if i % 5 == 3 else ("JPEG", "jpg")
        data = image(fmt, (28 + 4 * (i % 4), 24 + 2 * (i % 3)), seed + i, "L" if i % 7 == 6 else "RGB")
        out += [(f"{prefix}{i:02d}.{ext}", data), (f"{prefix}{i:02d}.cls", str((seed + i) % 10).encode())]
    return out


def inputs(root: Path) -> None:
    shards = root / "shards"
    shards.mkdir(parents=True)
    cut = image("JPEG", (64, 48), 5)
    a = samples("a", 18, 0)
    write_tar(shards / "s-000000.tar", a[:12] + [("a-garbage.jpg", b"not an image at all"), ("a-garbage.cls", b"1"),
                                                  ("a-cut.jpg", cut[:len(cut) * 4 // 5]), ("a-cut.cls", b"2")]
              + a[12:24] + [("a-drop.jpg", image("JPEG", (30, 30), 99)), ("a-drop.cls", b"4")] + a[24:])
    b = samples("b", 16, 40)
    write_tar(shards / "s-000001.tar", b[:8] + [("b-nolabel.jpg", image("JPEG", (30, 30), 98)),
                                                ("b-range.jpg", image("JPEG", (30, 30), 97)), ("b-range.cls", b"12")]
              + b[8:])
    write_tar(shards / "s-000002.tar", samples("c", 11, 80))
    # a filter-labels output that drops one key (what --exclude reads: summary.json and scores.arrow)
    import pyarrow as pa
    from pyarrow import ipc
    from distill.format import FILTER_FORMAT, FILTER_SCORES_NAME, FILTER_SUMMARY_NAME, FILTER_VERSION
    (root / "filter").mkdir()
    keys = [f"a{i:02d}" for i in range(3)] + EXCLUDED
    table = pa.table({"key": keys, "keep": [k not in EXCLUDED for k in keys]})
    with ipc.new_file(str(root / "filter" / FILTER_SCORES_NAME), table.schema) as w:
        w.write_table(table)
    (root / "filter" / FILTER_SUMMARY_NAME).write_text(json.dumps(
        {"format": FILTER_FORMAT, "version": FILTER_VERSION, "samples": len(keys), "dropped": len(EXCLUDED)}))
    import torch
    sys.path.insert(0, str(OUT.parents[1]))            # tests/: the suite's tiny teacher (seed 0, 10 classes)
    from helpers.tiny_teacher import build
    torch.jit.save(torch.jit.script(build().eval()), str(root / "teacher.pt"))
    (root / "policy.json").write_text(json.dumps(POLICY, indent=1) + "\n")
    (root / "config.json").write_text(json.dumps(CONFIG, indent=1) + "\n")


def run(root: Path, out: Path, view_workers: int):
    """cache-teacher on the fixture's inputs (the call tests/test_view_fixture.py makes too)."""
    from distill.cache import cache_teacher
    from distill.config import CacheConfig
    cfg = json.loads((root / "config.json").read_text())
    res = cache_teacher(CacheConfig(shards=str(root / "shards"), teacher=(str(root / "teacher.pt"),), out=str(out),
                                    exclude=str(root / "filter"), quiet=True, workers=1, threads=1,
                                    view_workers=view_workers, **cfg),
                        json.loads((root / "policy.json").read_text()))
    assert not res.failed, res.failed
    return json.loads((out / "manifest.json").read_text())


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    inputs(OUT)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for n in (0, 1, 2):
            m = run(OUT, Path(tmp) / f"n{n}", n)
            files[n] = {e["file"]: (Path(tmp) / f"n{n}" / e["file"]).read_bytes() for e in m["shards"]}
        assert files[0] == files[1] == files[2], "the caches of --view-workers 0, 1, 2 differ"
        (OUT / "cache").mkdir()
        for name, data in files[0].items():
            (OUT / "cache" / name).write_bytes(data)
        shutil.copy2(Path(tmp) / "n0" / "manifest.json", OUT / "cache" / "manifest.json")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{OUT}: {size / 1024:.0f} KiB; skipped per shard:",
          [[s["key"] for s in e["skipped"]] for e in m["shards"]], file=sys.stderr)


if __name__ == "__main__":
    main()

"""Regenerate the demo shards ``shards/demo/{train,val}`` byte for byte.

Source: scikit-learn's 1,797 handwritten digit scans (8x8 pixels, 16 grey levels; the file
``sklearn/datasets/data/digits.csv.gz`` read by ``sklearn.datasets.load_digits``). scikit-learn is a
dependency of this tool only, not of distill: ``pip install scikit-learn``.

Each scan is scaled to 0..255 (bright ink on a black background, as in the source), upscaled to
64x64 with Pillow's bicubic filter and stored as a grayscale ('L') JPEG, quality 90, optimised
Huffman tables: ~0.9 KB an image. Readers must convert to RGB, as for any grayscale JPEG.
Split: stratified by class with a fixed seed, 20% of each class to ``val`` (2 shards), the rest to
``train`` (4 shards); samples in source order; keys ``digits_NNNNN`` (the source index); classes
``digit_0``..``digit_9``. Labels are the clean source labels.

The output is identical on every run for a given Pillow build (its libjpeg version);
``tests/test_shards.py`` checks it against the committed index.

    python tools/make_demo_data.py [--out shards/demo]
"""
from __future__ import annotations

import argparse
import io
import math
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from distill.format import SHARD_INDEX_NAME  # noqa: E402
from distill.data.shards import Sample, write_shards  # noqa: E402

SEED = 20240501
VAL_FRACTION = 0.2
SHARDS = {"train": 4, "val": 2}
SIZE = 64
QUALITY = 90
CLASSES = [f"digit_{i}" for i in range(10)]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        sys.exit("make_demo_data needs scikit-learn (a tool-only dependency): pip install scikit-learn")
    digits = sk_load_digits()
    return digits.images, digits.target.astype(int)


def encode(scan: np.ndarray) -> bytes:
    """One 8x8 scan (values 0..16) -> 64x64 grayscale JPEG bytes."""
    pixels = np.rint(scan * (255 / 16)).astype(np.uint8)
    image = Image.fromarray(pixels, "L").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=QUALITY, optimize=True)
    return buf.getvalue()


def split(labels: np.ndarray) -> dict[str, list[int]]:
    """Stratified split: per class, a seeded permutation; the first 20% (rounded) go to val."""
    rng = np.random.default_rng(SEED)
    val: list[int] = []
    for c in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == c))
        val += members[: round(VAL_FRACTION * len(members))].tolist()
    val_set = set(val)
    return {"train": [i for i in range(len(labels)) if i not in val_set], "val": sorted(val_set)}


def write_split(out: Path, name: str, indices: list[int], scans: np.ndarray, labels: np.ndarray) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    ours = re.compile(rf"^{name}-[0-9]{{6}}\.tar$")
    for p in folder.iterdir():  # only what an earlier run wrote
        if p.name == SHARD_INDEX_NAME or ours.match(p.name):
            p.unlink()
    samples = (Sample(f"digits_{i:05d}", encode(scans[i]), "jpg", int(labels[i])) for i in indices)
    index = write_shards(samples, folder, name, math.ceil(len(indices) / SHARDS[name]), CLASSES)
    size = sum(s.bytes for s in index.shards)
    print(f"{folder}: {index.num_samples} samples in {len(index.shards)} shards, {size / 1e6:.2f} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "shards" / "demo", help="demo folder (default: shards/demo)")
    args = parser.parse_args(argv)
    scans, labels = load_digits()
    for name, indices in split(labels).items():
        write_split(args.out, name, indices, scans, labels)


if __name__ == "__main__":
    main()

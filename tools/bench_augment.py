"""Benchmark distill.data.augment against a plain Pillow pipeline, per core.

    python tools/bench_augment.py [--quick] [--sizes 224,128] [--repeats 9] [--image-size 500x375]

Three pipelines over the same ImageNet-sized JPEGs (500x375, quality 90, photo-like, generated
deterministically into a temp dir), one thread, every view decoded from the encoded bytes:

  (a) plain   Pillow + Python ``random``: full decode, RandomResizedCrop, flip, RandAugment-like
              2 ops (timm rand-m9-mstd0.5-inc1 semantics), to tensor, normalise, RandomErasing;
  (b) seeded  distill.augment: derive_seed + decode + view, draft mode forced off;
  (c) draft   the same with JPEG draft mode (the default).

(b)/(a) is the cost of the seeded, replayable design; (c)/(b) is the draft-mode speedup. Passes of the
three pipelines are interleaved and medians taken, so machine noise hits all of them alike.
"""
from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.data import augment as aug  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FILL = (124, 116, 104)


def make_jpegs(folder: Path, n: int, w: int = 500, h: int = 375) -> list[bytes]:
    """Photo-like JPEGs at quality 90: smooth gradients, shapes and sensor-like noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = xx * np.float32(500 / w), yy * np.float32(375 / h)  # scene coordinates: same scene at any size
    out = []
    for i in range(n):
        f = rng.uniform(0.5, 3.0, 6)
        img = np.stack([110 + 80 * np.sin(x / 500 * f[0] * math.pi + f[3]) * np.cos(y / 375 * f[1]),
                        120 + 70 * np.cos(y / 375 * f[2] * math.pi + f[4]),
                        100 + 60 * np.sin((x + y) / 875 * f[5] * math.pi)], -1)
        for _ in range(6):  # discs and boxes with soft-ish edges
            cx, cy, r = rng.uniform(0, 500), rng.uniform(0, 375), rng.uniform(15, 120)
            colour = rng.uniform(0, 255, 3)
            if rng.random() < 0.5:
                mask = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
            else:
                mask = (abs(x - cx) < r) & (abs(y - cy) < r * rng.uniform(0.3, 1.0))
            img[mask] = 0.3 * img[mask] + 0.7 * colour
        img += rng.normal(0, 6, img.shape)
        path = folder / f"img{i:03d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        out.append(path.read_bytes())
    return out


# ----------------------------------------------------------------------------- (a) plain Pillow

def _affine(im, m):
    return im.transform(im.size, Image.Transform.AFFINE, m, Image.Resampling.BICUBIC, fillcolor=FILL)


def _sign(v):
    return -v if random.random() > 0.5 else v


PLAIN_OPS = [  # timm's _RAND_INCREASING_TRANSFORMS with timm's level mappings (m on 0..10)
    lambda im, m: ImageOps.autocontrast(im),
    lambda im, m: ImageOps.equalize(im),
    lambda im, m: ImageOps.invert(im),
    lambda im, m: im.rotate(_sign(m * 3.0), resample=Image.Resampling.BICUBIC, fillcolor=FILL),
    lambda im, m: im.point([i & ~(2 ** (4 + int(m * 0.4)) - 1) & 255 for i in range(256)] * 3),
    lambda im, m: ImageOps.solarize(im, 256 - int(m * 25.6)),
    lambda im, m: im.point([min(255, i + int(m * 11)) if i < 128 else i for i in range(256)] * 3),
    lambda im, m: ImageEnhance.Color(im).enhance(max(0.1, 1 + _sign(m * 0.09))),
    lambda im, m: ImageEnhance.Contrast(im).enhance(max(0.1, 1 + _sign(m * 0.09))),
    lambda im, m: ImageEnhance.Brightness(im).enhance(max(0.1, 1 + _sign(m * 0.09))),
    lambda im, m: ImageEnhance.Sharpness(im).enhance(max(0.1, 1 + _sign(m * 0.09))),
    lambda im, m: _affine(im, (1, _sign(m * 0.03), 0, 0, 1, 0)),
    lambda im, m: _affine(im, (1, 0, 0, _sign(m * 0.03), 1, 0)),
    lambda im, m: _affine(im, (1, 0, _sign(m * 0.045) * im.width, 0, 1, 0)),
    lambda im, m: _affine(im, (1, 0, 0, 0, 1, _sign(m * 0.045) * im.height)),
]


def plain_view(data: bytes, size: int) -> torch.Tensor:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    for _ in range(10):  # torchvision RandomResizedCrop.get_params
        area = w * h * random.uniform(0.08, 1.0)
        ar = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            y0, x0 = random.randint(0, h - ch), random.randint(0, w - cw)
            break
    else:
        cw, ch, x0, y0 = w, h, 0, 0
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.Resampling.BICUBIC)
    if random.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for op in random.choices(PLAIN_OPS, k=2):  # timm RandAugment: with replacement, p=0.5 each
        if random.random() <= 0.5:
            img = op(img, max(0.0, min(10.0, random.gauss(9, 0.5))))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    x.sub_(torch.tensor(MEAN).view(3, 1, 1)).div_(torch.tensor(STD).view(3, 1, 1))
    if random.random() < 0.25:  # timm RandomErasing, one box, per-pixel normal noise
        for _ in range(10):
            area = random.uniform(0.02, 1 / 3) * size * size
            ar = math.exp(random.uniform(math.log(0.3), math.log(1 / 0.3)))
            eh, ew = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if ew < size and eh < size:
                top, left = random.randint(0, size - eh), random.randint(0, size - ew)
                x[:, top:top + eh, left:left + ew] = torch.empty((3, eh, ew)).normal_()
                break
    return x


# ----------------------------------------------------------------------------- timing

def run_pass(kind: str, images: list[bytes], size: int, epoch: int, policy: aug.Policy) -> float:
    """Seconds for one view of every image."""
    random.seed(epoch)
    t0 = time.perf_counter()
    for i, data in enumerate(images):
        if kind == "plain":
            plain_view(data, size)
        else:
            src = aug.SourceImage(data)  # fresh: one decode per view, like the plain pipeline
            params = aug.decode(policy, aug.derive_seed(0, epoch, f"img{i:03d}"), src.width, src.height)
            aug.view(src, params, size, MEAN, STD, draft=(kind == "draft"))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few images and repeats (smoke run)")
    ap.add_argument("--images", type=int, default=64, help="number of generated JPEGs")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved passes per pipeline")
    ap.add_argument("--sizes", default="224,128", help="output sizes, comma-separated")
    ap.add_argument("--image-size", default="500x375", help="generated JPEG size WxH")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 16, 3
    torch.set_num_threads(1)
    policy = aug.Policy()  # rand-m9-mstd0.5-inc1, re_prob 0.25 pixel, hflip 0.5, bicubic
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        iw, ih = (int(v) for v in args.image_size.split("x"))
        images = make_jpegs(Path(tmp), args.images, iw, ih)
    n = len(images)

    t0 = time.perf_counter()
    for s in range(20000):
        aug.decode(policy, s, iw, ih)
    decode_us = (time.perf_counter() - t0) / 20000 * 1e6
    t0 = time.perf_counter()
    for s in range(20000):
        aug.derive_seed(0, 3, "n01440764_10026")
    seed_us = (time.perf_counter() - t0) / 20000 * 1e6
    print(f"{n} JPEGs {iw}x{ih} q90, {args.repeats} interleaved passes, torch threads 1, "
          f"Pillow {Image.__version__}, torch {torch.__version__}")
    print(f"decode(): {decode_us:.1f} us/call, derive_seed(): {seed_us:.2f} us/call")

    kinds = ("plain", "seeded", "draft")
    rows = []
    for size in sizes:
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for k in kinds:  # warm-up
            run_pass(k, images[:4], size, 999, policy)
        for rep in range(args.repeats):
            order = kinds[rep % 3:] + kinds[:rep % 3]  # rotate who goes first
            for k in order:
                times[k].append(run_pass(k, images, size, rep, policy))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = [s / p for s, p in zip(times["seeded"], times["plain"])]
        factors = [aug.draft_factor(aug.decode(policy, aug.derive_seed(0, e, f"img{i:03d}"), iw, ih), size)
                   for e in range(args.repeats) for i in range(n)]
        rows.append((size, n / med["plain"], n / med["seeded"], n / med["draft"],
                     statistics.median(ratios) - 1, med["seeded"] / med["draft"], med["plain"] / med["draft"],
                     sum(f > 1 for f in factors) / len(factors), decode_us * 1e-6 * n / med["seeded"]))
        print(f"size {size}: plain {n / med['plain']:.0f} img/s, seeded {n / med['seeded']:.0f} img/s, "
              f"draft {n / med['draft']:.0f} img/s (per-pass seeded/plain: "
              f"{', '.join(f'{r:.3f}' for r in ratios)})")

    print("\n| size | plain Pillow img/s | seeded (no draft) img/s | seeded + draft img/s "
          "| seeded vs plain time | decode() share | draft speedup | draft vs plain | views using draft |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, a, b, c, over, sp, sp_plain, frac, share in rows:
        print(f"| {size} | {a:.0f} | {b:.0f} | {c:.0f} | {over * 100:+.1f}% | {share * 100:.1f}% "
              f"| x{sp:.2f} | x{sp_plain:.2f} | {frac * 100:.0f}% |")
    print("\nseeded vs plain time: median per-pass time ratio - 1 (negative = ours faster); decode() share: "
          "decode() cost / seeded per-view time; draft speedup: seeded no-draft time / draft time.")


if __name__ == "__main__":
    main()

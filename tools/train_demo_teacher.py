"""Train the demo teacher: a small CNN on the demo TRAIN shards -> ``shards/demo/teacher.pt`` (TorchScript).

Input: an RGB view resized to 32x32 (any size works: the network ends in adaptive pooling), scaled to
[0, 1] and normalised with the ImageNet mean/std; output: logits over the 10 digit classes; any
batch size. Trained on the shards' (clean) labels with views made by Pillow: a random-resized crop
(area 0.35-1, aspect 3/4-4/3) of the image rotated by up to +-15 degrees (fill black or the ImageNet
mean colour, like distill.augment's rotations), resized bicubically to 32x32, so it stays accurate
on augmented views. Reproducible: fixed seeds, one CPU thread, deterministic algorithms and a fixed
PYTHONHASHSEED (the script re-executes itself with it), so teacher.pt is the same bytes every run.

Also writes ``shards/demo/teacher.json``: the preprocessing, the val accuracy on centre views
(the whole image resized) and on augmented views (10 seeded views per val image), and the sha256
of teacher.pt. Needs only torch, numpy and Pillow (no torchvision).

    python tools/train_demo_teacher.py [--demo shards/demo] [--epochs 30]
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from distill.files import atomic_write_json, sha256_file
from distill.data.shards import Sample, iter_shard, resolve_shards  # noqa: E402

SEED = 0
INPUT_SIZE = 32
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE = (0.35, 1.0)
RATIO = (3 / 4, 4 / 3)
MAX_ROTATION = 15.0
FILLS = ((0, 0, 0), (124, 116, 104))  # black (the digits' background) or the ImageNet mean
EVAL_VIEWS = 10


class DigitNet(nn.Module):
    """Five 3x3 conv-BN-ReLU layers (16-16-32-32-64 channels, two 2x2 max-pools), global average pool, linear."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(*block(3, w), *block(w, w), nn.MaxPool2d(2),
                                      *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
                                      *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------
# data: decoded RGB images from the shards, views made with Pillow

def load_split(folder: Path) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    paths, index = resolve_shards(folder)
    images, labels = [], []
    for path in paths:
        for item in iter_shard(path):
            if not isinstance(item, Sample):
                raise SystemExit(f"demo shard {path.name} has a bad sample: {item}")
            with Image.open(io.BytesIO(item.data)) as im:
                images.append(im.convert("RGB"))
            labels.append(item.label)
    return images, np.array(labels), index.classes


def centre_view(im: Image.Image) -> Image.Image:
    return im.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)


def random_view(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotate by up to +-MAX_ROTATION degrees, then a random-resized crop to INPUT_SIZE (torchvision's
    sampling: 10 tries of area and log-aspect, else the whole image)."""
    fill = FILLS[int(rng.integers(len(FILLS)))]
    im = im.rotate(float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), resample=Image.Resampling.BILINEAR, fillcolor=fill)
    w, h = im.size
    box = (0.0, 0.0, float(w), float(h))
    for _ in range(10):
        area = w * h * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if cw <= w and ch <= h:
            x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            box = (x, y, x + cw, y + ch)
            break
    return im.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC, box=box)


def to_tensor(views: list[Image.Image]) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(v) for v in views])).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def accuracy(model: nn.Module, images: list[Image.Image], labels: np.ndarray, rng: np.random.Generator | None) -> float:
    model.eval()
    views = [centre_view(im) if rng is None else random_view(im, rng) for im in images]
    preds = torch.cat([model(to_tensor(views[i:i + 256])).argmax(1) for i in range(0, len(views), 256)])
    return float((preds.numpy() == labels).mean())


# ---------------------------------------------------------------------------------------------

def train(images: list[Image.Image], labels: np.ndarray, epochs: int, batch: int = 64, lr: float = 4e-3) -> nn.Module:
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = DigitNet(num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(images) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    y_all = torch.from_numpy(labels).long()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(images))
        total = 0.0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            x = to_tensor([random_view(images[i], rng) for i in idx])
            loss = F.cross_entropy(model(x), y_all[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(order):.4f}", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    if argv is None and os.environ.get("PYTHONHASHSEED") != "0":
        # TorchScript writes module constants in set order, which follows the string hash seed:
        # fix it so teacher.pt is the same bytes on every run.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=REPO / "shards" / "demo", help="demo folder with train/ and val/")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    train_images, train_labels, classes = load_split(args.demo / "train")
    val_images, val_labels, _ = load_split(args.demo / "val")
    model = train(train_images, train_labels, args.epochs)
    seconds = time.perf_counter() - t0
    val_centre = accuracy(model, val_images, val_labels, None)
    rng = np.random.default_rng(SEED + 1)
    aug = [accuracy(model, val_images, val_labels, rng) for _ in range(EVAL_VIEWS)]
    val_aug = float(np.mean(aug))
    train_centre = accuracy(model, train_images, train_labels, None)

    out = args.demo / "teacher.pt"
    scripted = torch.jit.script(model)
    scripted.save(str(out))
    params = sum(p.numel() for p in model.parameters())
    atomic_write_json(args.demo / "teacher.json", {
        "file": out.name,
        "sha256": sha256_file(out),
        "kind": "torchscript",
        "architecture": f"DigitNet (tools/train_demo_teacher.py), {params} parameters",
        "input_size": INPUT_SIZE,
        "interpolation": "bicubic",
        "mean": list(MEAN),
        "std": list(STD),
        "num_classes": len(classes),
        "classes": classes,
        "trained_on": "shards/demo/train (clean labels)",
        "epochs": args.epochs,
        "seed": SEED,
        "augmentation": f"rotate +-{MAX_ROTATION:g} deg, random-resized crop area {SCALE[0]}-{SCALE[1]} aspect 3/4-4/3",
        "train_accuracy_centre": round(train_centre, 4),
        "val_accuracy_centre": round(val_centre, 4),
        "val_accuracy_augmented": round(val_aug, 4),
    })
    print(f"val accuracy: centre views {val_centre:.4f}, augmented views {val_aug:.4f} "
          f"(train centre {train_centre:.4f}); {params} parameters, {out.stat().st_size / 1e3:.0f} KB; "
          f"trained in {seconds:.0f} s")


if __name__ == "__main__":
    main()

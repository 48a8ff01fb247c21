"""Teachers for the benchmarks (loaded by `--teacher bench_teachers:<name>` with tools/ on the path).

* ``resnet18_like``: a ResNet-18-shaped CNN (1.8 GFLOPs per 224x224 image), random weights: the
  "teacher that costs at least 1 GFLOP per image" of the cache-teacher efficiency benchmark.
* ``vit_b16_like``: a ViT-B/16-sized transformer (17.6 GFLOPs at 224), for GPU runs.
* ``synthetic_records``: top-10 records of a synthetic 21,841-class teacher whose views of one
  image overlap like a real teacher's (about 28 distinct top-10 classes over 90 views).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18Like(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Basic(cin, cout, stride), _Basic(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def resnet18_like(num_classes: int = 1000) -> nn.Module:
    torch.manual_seed(0)
    return ResNet18Like(num_classes).eval()


class ViTLike(nn.Module):
    def __init__(self, dim=768, depth=12, heads=12, patch=16, img=224, num_classes=1000):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit_b16_like(num_classes: int = 1000) -> nn.Module:
    torch.manual_seed(0)
    return ViTLike(num_classes=num_classes).eval()


def synthetic_records(n: int, epochs: int, k: int = 10, num_classes: int = 21841, candidates: int = 48,
                      alpha: float = 0.3, noise: float = 1.0, seed: int = 0):
    """Top-K records of a synthetic teacher over ``epochs`` views of ``n`` images.

    Each image has a fixed set of ``candidates`` plausible classes with Dirichlet(alpha) base
    probabilities; each view perturbs the log-probabilities with N(0, noise) and leaves 1-30% of the
    mass outside the set. With the defaults, 90 views of an image use about 28 distinct top-10
    classes, the overlap measured on a real teacher. A pixel-driven random
    network cannot stand in here: its top classes follow colour statistics that RandAugment
    scrambles, so its views overlap far less than a trained teacher's (measured: ~130-330 distinct
    classes over 90 views)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, epochs, k), np.int64)
    probs = np.zeros((n, epochs, k), np.float32)
    for i in range(n):
        cls = rng.choice(num_classes, candidates, replace=False)
        logits = np.log(rng.dirichlet(np.full(candidates, alpha)) + 1e-4)[None] + rng.normal(0, noise, (epochs, candidates))
        p = np.exp(logits - logits.max(1, keepdims=True))
        p = p / p.sum(1, keepdims=True) * rng.uniform(0.7, 0.99, (epochs, 1))
        order = np.argsort(-p, 1)[:, :k]
        ids[i], probs[i] = cls[order], np.take_along_axis(p, order, 1)
    labels = ids[:, 0, 0]
    return labels, ids, probs, probs[:, :, 0]


def gflops(model: nn.Module, size: int = 224) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    return fc.get_total_flops() / 2e9     # multiply-adds counted as one op each, like model zoos

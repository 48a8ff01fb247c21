"""What every student family shares: stochastic depth and the registry's builder form."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, scale the kept ones."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_layer(p: float) -> nn.Module:
    return DropPath(p) if p > 0.0 else nn.Identity()


def builders(configs: dict[str, dict], cls: type, **defaults) -> dict[str, Callable[..., nn.Module]]:
    """name -> ``builder(num_classes, img_size=224, drop_path_rate=None)`` for each of a family's configs;
    ``drop_path_rate=None`` keeps the config's own rate (or ``defaults``')."""
    def build(name: str, num_classes: int, img_size: int = 224, drop_path_rate: float | None = None) -> nn.Module:
        kwargs = {**defaults, **configs[name]}
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        return cls(num_classes=num_classes, img_size=img_size, **kwargs)
    return {name: functools.partial(build, name) for name in configs}

"""What each registered student costs: parameters, GFLOPs and CPU latency, for ``distill models``.

    rows = describe_models()                    # one dict per model: name, family, params, gflops, paper
    rows = describe_models(latency=True)        # + latency_ms: CPU, batch 1, median of repeats

Conventions, so the numbers compare with the papers':

* ``params``: with a 1,000-class head (both heads for EfficientFormer), counted on the meta device
  (nothing is allocated);
* ``gflops``: multiply-accumulates / 1e9 of one 224 px image (what TinyViT, EfficientFormer, DeiT and
  DAT report as "FLOPs"), counted by ``torch.utils.flop_counter`` on the meta device over matrix
  products, convolutions and attention; element-wise work (norms, activations, ``grid_sample``) is not
  counted, as fvcore does not;
* ``latency_ms``: eval mode, ``torch.inference_mode``, batch 1 at 224 px, the median of ``repeats``
  timed forwards after ``warmup`` untimed ones, with the threads torch has (set them for a fair
  comparison). EfficientFormer's claim is mobile latency; a CPU figure is a proxy, measured here.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

DEFAULT_SIZE = 224
REFERENCE_CLASSES = 1000


def count_gflops(model: nn.Module, img_size: int = DEFAULT_SIZE) -> float:
    """Multiply-accumulates / 1e9 of one forward of one image (the model is moved to the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, img_size, img_size, device="meta"))
    return counter.get_total_flops() / 2e9


def latency_ms(model: nn.Module, img_size: int = DEFAULT_SIZE, repeats: int = 10, warmup: int = 2) -> float:
    """Median CPU time of one batch-1 forward, in milliseconds."""
    model = model.eval()
    x = torch.randn(1, 3, img_size, img_size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def describe_models(names: list[str] | None = None, latency: bool = False, repeats: int = 10) -> list[dict]:
    """One row per model (all registered ones by default): name, family, params, gflops, paper,
    and with ``latency`` the measured ``latency_ms``."""
    from . import MODELS, PAPERS, create_model, list_models

    rows = []
    for name in names or list_models():
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
        with torch.device("meta"):
            model = create_model(name, num_classes=REFERENCE_CLASSES)
        row = {"name": name, "family": name.split("-")[0], "params": sum(p.numel() for p in model.parameters()),
               "gflops": round(count_gflops(model), 3), "image_size": DEFAULT_SIZE, "paper": PAPERS.get(name, "")}
        if latency:
            torch.manual_seed(0)
            row["latency_ms"] = round(latency_ms(create_model(name, num_classes=REFERENCE_CLASSES),
                                                 repeats=repeats), 2)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as the aligned text table ``distill models`` prints."""
    lat = any("latency_ms" in r for r in rows)
    head = ["model", "params", "GFLOPs"] + (["CPU ms"] if lat else []) + ["source"]
    body = [[r["name"], f"{r['params'] / 1e6:.2f}M", f"{r['gflops']:.2f}"]
            + ([f"{r['latency_ms']:.1f}" if "latency_ms" in r else "-"] if lat else []) + [r["paper"]]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {1, 2, 3} if lat else {1, 2}
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head)] + [fmt(b) for b in body])

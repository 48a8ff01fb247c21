"""Does a merged RepAdapter teacher cost what its base costs? And is it the same function as unmerged?

Builds a base ViT (random weights, eval, fp32), puts RepAdapters (r 8, 2 groups, seeded non-zero
weights, as after training) in front of every attention and MLP input linear, and merges a copy. Then:

* max |Δ logit| merged vs unmerged, fp32, on ``--checks`` batches of seeded random inputs (goal <= 1e-4);
* forward time of the base, the merged and the unmerged teacher: ``--repeats`` rounds, each timing one
  forward of each model in a rotating order (interleaved, so load changes hit all alike), after warm-up;
  the ratios of the medians merged ÷ base (goal <= 1.02) and unmerged ÷ base;
* the same for the ``torch.export`` programs cache-teacher runs (``teacher.pt2``), unless ``--no-export``.

Prints a table and, last, one JSON line.

    python tools/bench_adapt.py              # vit-ti16 at 224 px, batch 16
    python tools/bench_adapt.py --quick      # vit-mini at 32 px, batch 64 (seconds)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from distill.adapt.base import CLIP_CONFIGS  # noqa: E402
from distill.adapt.export import export_program  # noqa: E402
from distill.adapt.methods import AdaptedLinear, add_adapters, count_params, merge_adapters  # noqa: E402
from distill.models import vit  # noqa: E402


def build(name: str, size: int, bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(CLIP_CONFIGS.get(name) or vit.CONFIGS[name], drop_path_rate=0.0)
    if not bias:
        cfg["bias"] = False
    return vit.VisionTransformer(num_classes=100, img_size=size, **cfg).eval()


def adapted_pair(base: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    unmerged = copy.deepcopy(base)
    add_adapters(unmerged, r=8, groups=2, scale=1.0, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in unmerged.modules():
            if isinstance(m, AdaptedLinear):
                for p in m.adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    merged = copy.deepcopy(unmerged)
    merge_adapters(merged)
    return unmerged.eval(), merged.eval()


@torch.inference_mode()
def max_diff(a, b, size: int, batch: int, checks: int) -> float:
    g = torch.Generator().manual_seed(2)
    return max(float((a(x) - b(x)).abs().max())
               for x in (torch.randn(batch, 3, size, size, generator=g) for _ in range(checks)))


@torch.inference_mode()
def interleaved(models: dict, x: torch.Tensor, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per forward of each model, timed in rotating order round by round."""
    names = list(models)
    for _ in range(warmup):
        for n in names:
            models[n](x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            models[n](x)
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="vit-mini at 32 px (a smoke run of seconds)")
    ap.add_argument("--model", help="base preset (default: vit-ti16; vit-mini with --quick)")
    ap.add_argument("--size", type=int, help="input size (default 224; 32 with --quick)")
    ap.add_argument("--batch", type=int, help="batch (default 16; 64 with --quick)")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 40; 30 with --quick)")
    ap.add_argument("--checks", type=int, default=4, help="batches compared merged vs unmerged")
    ap.add_argument("--bias-free", action="store_true", help="a bias-free base (ViT-22B style)")
    ap.add_argument("--no-export", action="store_true", help="skip timing the torch.export programs")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    model = a.model or ("vit-mini" if a.quick else "vit-ti16")
    size, batch = a.size or (32 if a.quick else 224), a.batch or (64 if a.quick else 16)
    repeats = a.repeats or (30 if a.quick else 40)
    torch.set_num_threads(a.threads)

    base = build(model, size, not a.bias_free)
    unmerged, merged = adapted_pair(base)
    diff = max_diff(merged, unmerged, size, min(batch, 32), a.checks)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))
    eager = interleaved({"base": base, "merged": merged, "unmerged": unmerged}, x, repeats)
    out = {"model": model, "size": size, "batch": batch, "repeats": repeats, "threads": a.threads,
           "bias_free": a.bias_free, "params": {"base": count_params(base), "merged": count_params(merged),
                                                "unmerged": count_params(unmerged)},
           "max_abs_logit_diff": diff, "eager_s": eager,
           "ratio_merged_over_base": eager["merged"] / eager["base"],
           "ratio_unmerged_over_base": eager["unmerged"] / eager["base"],
           "loadavg": os.getloadavg()[0]}
    if not a.no_export:
        with tempfile.TemporaryDirectory() as tmp:
            progs = {}
            for name, m in (("base", base), ("merged", merged), ("unmerged", unmerged)):
                export_program(m, size, Path(tmp) / f"{name}.pt2")
                progs[name] = torch.export.load(Path(tmp) / f"{name}.pt2").module()
            exported = interleaved(progs, x, repeats)
        out.update(export_s=exported, export_ratio_merged_over_base=exported["merged"] / exported["base"],
                   export_ratio_unmerged_over_base=exported["unmerged"] / exported["base"])
    print(f"{model} at {size} px, batch {batch}, {a.threads} thread(s), {repeats} interleaved rounds (median):")
    print(f"  max |Δ logit| merged vs unmerged: {diff:.2e} (fp32; goal <= 1e-4)")
    print(f"  parameters: base {out['params']['base']:,}, merged {out['params']['merged']:,}, "
          f"unmerged {out['params']['unmerged']:,}")
    print(f"  eager forward: merged ÷ base {out['ratio_merged_over_base']:.3f} (goal <= 1.02), "
          f"unmerged ÷ base {out['ratio_unmerged_over_base']:.3f}")
    if "export_s" in out:
        print(f"  teacher.pt2 forward: merged ÷ base {out['export_ratio_merged_over_base']:.3f}, "
              f"unmerged ÷ base {out['export_ratio_unmerged_over_base']:.3f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

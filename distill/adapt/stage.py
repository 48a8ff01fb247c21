"""``adapt_teacher(cfg)``: fit a pretrained ViT to the shards' classes (attn-only, RepAdapter, linear
probe or full fine-tuning), merge RepAdapter back, write a teacher directory that ``--teacher OUT`` and
``--scorer OUT`` accept.

    OUT/config.json     the resolved AdaptConfig (+ the method's lr and weight decay)
    OUT/last.pt(+.json) checkpoint after every epoch (adapters unmerged); --resume continues from it
    OUT/metrics.jsonl   one row per epoch: train_loss, lr, val_top1, img_s, images, time_s
    OUT/teacher.pt2     the adapted teacher (merged), a torch.export program with a dynamic batch
    OUT/weights.pth     its state dict (timm's names: the base's keys, new head)
    OUT/teacher.json    input size, mean/std, classes, method, base identity, metrics (written last)
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import AdaptConfig, IMAGENET_MEAN, IMAGENET_STD, check_batch_memory, check_run_size, write_resolved
from ..data import augment, views
from ..data.shards import resolve_shards
from ..files import UserError, claim_dir
from ..format import RUN_CONFIG_NAME, read_excluded_keys
from ..progress import note
from ..train.data import auto_workers
from ..train.order import shard_refs
from .base import PRESETS, build_base
from .export import write_teacher
from .methods import METHODS, count_params, count_trained, merge_adapters, set_trainable
from ..train.loop import Validator
from .train import AdaptData, fit

DEFAULT_LR = {"linear": 1e-2, "repadapter": 1e-3, "attn-only": 3e-4, "full": 2e-4}
DEFAULT_WD = {"linear": 1e-4, "repadapter": 1e-4, "attn-only": 0.05, "full": 0.05}


@dataclass
class AdaptResult:
    out: Path
    method: str
    epochs: int
    val_top1: float | None
    trained_params: int
    total_params: int
    wall_s: float
    memory: dict
    teacher: dict                      # teacher.json
    notes: list[str] = field(default_factory=list)
    complete: bool = True              # False: stopped early (stop_after), no teacher written yet

    def summary(self) -> str:
        if not self.complete:
            return f"adapt-teacher: {self.out} ({self.method}): stopped after epoch {self.epochs}: --resume to continue"
        m = self.teacher.get("metrics", {})
        top1 = "n/a" if self.val_top1 is None else f"{self.val_top1:.1f}%"
        lines = [f"adapt-teacher: {self.out} ({self.method}, {self.epochs} epochs): val top-1 {top1}, "
                 f"{self.trained_params:,} of {self.total_params:,} parameters trained, wall {self.wall_s:.1f} s"]
        mem = self.memory
        if mem:
            lines.append(f"  training memory per step (batch {mem['batch']}): {mem['train_step_bytes'] / 2**20:.1f} MiB "
                         f"(activations {mem['activations_bytes'] / 2**20:.1f} MiB, optimizer "
                         f"{mem['optimizer_bytes'] / 2**20:.2f} MiB)"
                         + (f", CUDA peak {mem['cuda_peak_bytes'] / 2**20:.1f} MiB" if "cuda_peak_bytes" in mem else ""))
        if "merge_max_abs_logit_diff" in m:
            lines.append(f"  merged RepAdapter: max |Δ logit| {m['merge_max_abs_logit_diff']:.2e} vs unmerged on "
                         f"{m['merge_checked_images']} val views; {self.teacher['params']:,} parameters (the base's + head)")
        lines.append(f"  teacher: {self.out}/{self.teacher['file']} (use --teacher {self.out} or --scorer {self.out})")
        lines += [f"  NOTE: {n}" for n in self.notes]
        return "\n".join(lines)


def resolve(cfg: AdaptConfig) -> AdaptConfig:
    """Fill the method's defaults (lr, weight decay, loader workers); refuse bad values."""
    if cfg.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    cfg = dataclasses.replace(cfg, lr=DEFAULT_LR[cfg.method] if cfg.lr is None else cfg.lr,
                              weight_decay=DEFAULT_WD[cfg.method] if cfg.weight_decay is None else cfg.weight_decay,
                              loader_workers=auto_workers() if cfg.loader_workers < 0 else cfg.loader_workers)
    check_batch_memory(cfg.batch_size, cfg.image_size, "--image-size")
    return cfg


def prepare_data(cfg: AdaptConfig, policy_table: dict | None) -> AdaptData:
    """Shards, classes (from index.json; the val shards' must be the same) and the view policy."""
    paths, index = resolve_shards(cfg.shards)
    vpaths, vindex = resolve_shards(cfg.val_shards)
    if index is None or vindex is None:
        raise UserError(f"adapt-teacher needs the shards' index.json (class names): none for "
                        f"{cfg.shards if index is None else cfg.val_shards}")
    classes, vclasses = list(index.classes), list(vindex.classes)
    if classes != vclasses:
        diff = next((i for i, (a, b) in enumerate(zip(classes, vclasses)) if a != b), min(len(classes), len(vclasses)))
        raise UserError(f"the training shards' classes differ from the val shards' ({len(classes)} vs "
                        f"{len(vclasses)} classes; first difference at label {diff}: "
                        f"{classes[diff] if diff < len(classes) else '-'} vs {vclasses[diff] if diff < len(vclasses) else '-'})")
    exclude = frozenset(read_excluded_keys(cfg.exclude)) if cfg.exclude else frozenset()
    check_run_size(cfg.epochs, max(0, index.num_samples - len(exclude)), cfg.allow_long_run)
    counts = None if exclude else [{e.name: e.samples for e in index.shards}[p.name] for p in paths]
    policy = augment.load_policy(cfg.policy, policy_table, {"size": cfg.image_size})
    spec = views.ViewSpec(policy)
    identity = {"shards": [p.name for p in paths], "policy_id": policy.id, "classes": classes, "world": 1,
                "excluded": len(exclude)}
    return AdaptData(shard_refs(paths, counts), shard_refs(vpaths), spec, classes, exclude, identity)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return torch.device(name)


def adapt_teacher(cfg: AdaptConfig, policy_table: dict | None = None, *, stop_after: int | None = None) -> AdaptResult:
    """Adapt ``cfg.base`` to the shards' classes with ``cfg.method`` and write the teacher directory.
    ``stop_after``: end this call after that many epochs, before any teacher is written (the run stays
    resumable with ``--resume``; the result's ``complete`` is False)."""
    t0 = time.perf_counter()
    cfg = resolve(cfg)
    with claim_dir(cfg.out, "adapt-teacher", ADAPT_MARKS, inputs=(cfg.base, cfg.base_checkpoint, cfg.shards,
                                                                  cfg.val_shards, cfg.exclude, cfg.policy)):
        return _adapt(cfg, policy_table, stop_after, t0)


# a teacher directory: the resolved config an adapt-teacher run writes first (train-student's lacks these keys)
ADAPT_MARKS = ((RUN_CONFIG_NAME, {"method": None, "base": None}),)


def _adapt(cfg: AdaptConfig, policy_table: dict | None, stop_after: int | None, t0: float) -> AdaptResult:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    data = prepare_data(cfg, policy_table)
    model, base_id, notes = build_base(cfg.base, cfg.base_checkpoint, data.num_classes, cfg.image_size,
                                        vit_like=cfg.method in ("attn-only", "repadapter"))
    adapter = dict(r=cfg.adapter_dim, groups=cfg.adapter_groups, scale=cfg.adapter_scale, dropout=cfg.adapter_dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)                 # adapter init
        masks = set_trainable(model, cfg.method, f"--base {cfg.base}", adapter)
    data.identity["base"] = base_id["weights_sha256"]
    trained, total = count_trained(model, masks), count_params(model)
    for n in notes:
        note(n, cfg.quiet)
    out = Path(cfg.out)
    write_resolved(cfg, out, extra={"trained-params": trained})
    val = Validator(data.val_refs, image_size=cfg.image_size, batch_size=max(cfg.batch_size, 64),
                    num_classes=data.num_classes, workers=cfg.loader_workers, seed=cfg.seed)
    res = fit(cfg, model, masks, data, device, val, stop_after)
    complete = res.state["epoch"] >= cfg.epochs
    teacher = _finish(cfg, model, data, base_id, val, res, trained, total, t0) if complete else {}
    top1 = teacher["metrics"]["val_top1"] if complete else (res.rows[-1]["val_top1"] if res.rows else None)
    return AdaptResult(out, cfg.method, res.state["epoch"], top1, trained, total, time.perf_counter() - t0,
                       res.memory, teacher, [n for n in notes if "random weights" in n], complete)


def _finish(cfg: AdaptConfig, model, data: AdaptData, base_id: dict, val: Validator, res, trained: int, total: int,
            t0: float) -> dict:
    """Merge (repadapter), compare merged with unmerged on the val views, write the teacher files."""
    model = model.cpu().eval()
    top1 = val.evaluate(model)[0]
    metrics = {"val_top1": top1, "best_val_top1": res.state.get("best_top1"), "epochs": res.state["epoch"],
               "trained_params": trained, "params_while_training": total, "train_s": round(res.state["train_s"], 3),
               "memory": res.memory}
    teacher = model
    if cfg.method == "repadapter":
        teacher = copy.deepcopy(model)
        merge_adapters(teacher)
        diff, n = _max_diff(model, teacher, val)
        metrics.update(merge_max_abs_logit_diff=diff, merge_checked_images=n,
                       val_top1_merged=val.evaluate(teacher)[0])
    metrics["wall_s"] = round(time.perf_counter() - t0, 3)
    meta = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "classes": data.classes,
            "num_classes": data.num_classes, "method": cfg.method, "base": base_id, "metrics": metrics,
            "adapter": ({"dim": cfg.adapter_dim, "groups": cfg.adapter_groups, "scale": cfg.adapter_scale}
                        if cfg.method == "repadapter" else None),
            "policy_id": data.spec.policy.id}
    return write_teacher(teacher, Path(cfg.out), cfg.image_size, meta)


@torch.inference_mode()
def _max_diff(a, b, val: Validator) -> tuple[float, int]:
    worst, n = 0.0, 0
    for batch in val.batches():
        x = batch["image"]
        worst = max(worst, float((a(x).float() - b(x).float()).abs().max()))
        n += x.shape[0]
    return worst, n


__all__ = ["AdaptResult", "PRESETS", "adapt_teacher", "resolve"]

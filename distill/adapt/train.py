"""The adaptation loop: train-student's data path and run directory, a plain cross-entropy step.

Views come from ``train.data.DistillDataset`` in its hard-label mode (distill's augmentation policy,
seeds derived from (seed, epoch, key), mixing as the policy says), validation from ``ValStream``'s
centre views; checkpoints (``last.pt`` + sidecar), ``metrics.jsonl`` and resume checks are
``train.checkpoint``'s (``last.pt`` is an epoch's commit point: it holds every metrics row, and
``--resume`` remakes metrics.jsonl and last.json from it; ``seed_epoch`` seeds dropout's numbers);
the lr schedule is ``train.loop.lr_at`` (linear warmup, cosine to zero); the first non-finite loss
stops the run (``train.loop.diverged``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..config import AdaptConfig, to_dict
from ..data import views
from ..files import UserError, atomic_write_json
from ..progress import bar, note
from ..train import checkpoint as ck
from ..models import param_groups
from ..train.data import DistillDataset, DistillLoader, ShardRef, batches_per_epoch, to_device
from ..train.loop import Validator, diverged, lr_at
from ..train.losses import SoftTargetLoss

@dataclass
class AdaptData:
    refs: list[ShardRef]
    val_refs: list[ShardRef]
    spec: views.ViewSpec
    classes: list[str]
    exclude: frozenset
    identity: dict               # what a resumed run must share with its checkpoint

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class FitResult:
    state: dict
    rows: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)


def optimizer(model: nn.Module, masks: dict, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, grouped as train-student's (``models.param_groups``), and no
    decay on partly trained (masked) tensors, whose frozen part must not move."""
    return torch.optim.AdamW(param_groups(model, weight_decay, no_decay=masks), lr=lr)


def fit(cfg: AdaptConfig, model: nn.Module, masks: dict, data: AdaptData, device: torch.device,
        val: Validator, stop_after: int | None = None) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` (from ``OUT/last.pt`` with ``--resume``); a checkpoint and a
    metrics row after every epoch. ``stop_after``: end this call after that many epochs."""
    out = Path(cfg.out)
    model.to(device)
    opt = optimizer(model, masks, cfg.lr, cfg.weight_decay)
    state = {"epoch": 0, "step": 0, "images_seen": 0, "train_s": 0.0, "best_top1": None, "memory": {},
             "rows": []}                      # every metrics row so far (last.pt holds them: _save)
    _resume(cfg, model, opt, state, data, out)
    ds = DistillDataset(data.refs, spec=data.spec, image_size=cfg.image_size, batch_size=cfg.batch_size, seed=cfg.seed,
                        shuffle_buffer=1000, num_classes=data.num_classes, exclude=data.exclude, rank=0, world=1)
    samples = sum(ds.counts)
    if samples < 1:
        raise UserError(f"no training samples in {cfg.shards}" + (" after --exclude" if data.exclude else ""))
    ds.drop_last = samples >= cfg.batch_size
    steps = max(1, batches_per_epoch(samples, 1, cfg.batch_size, cfg.loader_workers))
    batches = DistillLoader(ds, cfg.loader_workers, pin_memory=device.type == "cuda", persistent_workers=True, seed=cfg.seed)
    crit = SoftTargetLoss(data.num_classes, smoothing=cfg.label_smoothing, hard_only=True).parts
    total, warmup = steps * cfg.epochs, int(round(cfg.warmup_epochs * steps))
    for epoch in range(state["epoch"], cfg.epochs if stop_after is None else min(cfg.epochs, state["epoch"] + stop_after)):
        t0 = time.perf_counter()
        ds.set_epoch(epoch)
        ck.seed_epoch(cfg.seed, epoch)
        model.train()
        loss_sum, n = 0.0, 0
        pbar = bar(steps * cfg.batch_size, f"epoch {epoch + 1}/{cfg.epochs}", "img", cfg.quiet)
        for i, b in enumerate(batches):
            lr = lr_at(state["step"], total, warmup, cfg.lr, 0.0)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = _step(model, opt, crit, b, device, state)
            err = diverged(loss, epoch + 1, i + 1, steps, "the labels of --shards")
            if err is not None:
                raise err
            bs = b["label"].shape[0]
            loss_sum, n = loss_sum + loss * bs, n + bs
            if pbar:
                pbar.update(bs)
        if pbar:
            pbar.close()
        train_s = time.perf_counter() - t0
        top1 = val.evaluate(model)[0]
        state.update(epoch=epoch + 1, images_seen=state["images_seen"] + n, train_s=state["train_s"] + train_s)
        if top1 is not None and (state["best_top1"] is None or top1 > state["best_top1"]):
            state["best_top1"] = top1
        state["rows"] = state["rows"] + [{"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1), "lr": lr,
                                          "val_top1": top1, "img_s": n / max(train_s, 1e-9), "images": n,
                                          "time_s": round(time.perf_counter() - t0, 3)}]
        _save(cfg, model, opt, state, data, out)
    return FitResult(state, list(state["rows"]), dict(state.get("memory", {})))


def _step(model: nn.Module, opt, crit, b: dict, device: torch.device, state: dict) -> float:
    b = to_device(b, device)
    first = not state.get("memory")
    if first and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    saved = _SavedBytes() if first else None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        with saved() if saved else contextlib.nullcontext():
            logits = model(b["image"])
        loss, _ = crit(logits, b)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    state["step"] += 1
    if first:
        state["memory"] = _memory(model, opt, saved, device, b["image"].shape[0])
    return float(loss.detach())


class _SavedBytes:
    """Bytes of the distinct tensors autograd saves for the backward pass of one forward."""

    def __init__(self):
        self.seen: dict[tuple, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def __call__(self):
        return self.hooks

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.device.type != "meta":
            st = t.untyped_storage()
            self.seen[(st.data_ptr(), t.device.type)] = st.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _memory(model: nn.Module, opt, saved: "_SavedBytes", device: torch.device, batch: int) -> dict:
    """Training memory of one step: parameters, gradients, optimiser state, activations saved for the
    backward pass (measured with saved-tensor hooks), and on CUDA the allocator's peak."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trained)
    optim = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    mem = {"batch": batch, "params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optim,
           "activations_bytes": saved.total}
    mem["train_step_bytes"] = params + grads + optim + saved.total
    if device.type == "cuda":
        mem["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return mem


def _resume(cfg: AdaptConfig, model: nn.Module, opt, state: dict, data: AdaptData, out: Path) -> None:
    """Load ``OUT/last.pt`` into the model, optimiser and state with --resume, and remake the files made
    from it (``_publish``); a new run starts with an empty metrics.jsonl."""
    last = out / ck.LAST
    if last.exists() and not cfg.resume:
        raise UserError(f"{out} already holds an adapt-teacher run ({ck.LAST}); pass --resume to continue it or "
                        "choose another --out")
    if cfg.resume and last.exists():
        ckpt = ck.load(last)
        ck.check_resume(ckpt, to_dict(cfg), data.identity, last)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state.update(ckpt["state"])
        if "rows" not in ckpt["state"]:           # a checkpoint of an older distill: the rows were in the file
            state["rows"] = [r for r in ck.read_metrics(out) if r["epoch"] <= state["epoch"]]
        note(f"resuming {out} after epoch {state['epoch']} of {cfg.epochs}", cfg.quiet)
    _publish(cfg, state, data, out)


def _save(cfg: AdaptConfig, model: nn.Module, opt, state: dict, data: AdaptData, out: Path) -> None:
    """After an epoch: last.pt, the epoch's commit point (its state holds every metrics row), then the
    files made from it (``_publish``), then the epoch's line."""
    ck.save(out / ck.LAST, {"model": model.state_dict(), "optimizer": opt.state_dict(), "state": dict(state),
                            "config": to_dict(cfg), "data": data.identity, "epoch": state["epoch"],
                            "step": state["step"]})
    _publish(cfg, state, data, out)
    row = state["rows"][-1]
    if not cfg.quiet:
        acc = f", val top-1 {row['val_top1']:.2f}%" if row["val_top1"] is not None else ""
        note(f"epoch {row['epoch']}/{cfg.epochs}: loss {row['train_loss']:.4f}, lr {row['lr']:.2e}{acc}, "
             f"{row['img_s']:,.0f} img/s")


def _publish(cfg: AdaptConfig, state: dict, data: AdaptData, out: Path) -> None:
    """The files made from last.pt's state: metrics.jsonl (every row) and last.json. After each checkpoint,
    and on --resume before training on, so a run killed after last.pt was written ends as if it had not been."""
    rows = state["rows"]
    ck.write_metrics(out, rows)
    if rows:
        atomic_write_json((out / ck.LAST).with_suffix(".json"), {
            "epoch": state["epoch"], "epochs": cfg.epochs, "step": state["step"], "images_seen": state["images_seen"],
            "val_top1": rows[-1]["val_top1"], "method": cfg.method, "base": cfg.base, "num_classes": data.num_classes,
            "image_size": cfg.image_size})

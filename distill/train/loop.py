"""``train_student(cfg)``: train a TinyViT student from a teacher cache (or from hard labels).

AdamW (no weight decay on norms, biases, attention-bias tables), linear warmup then cosine decay per
step, gradient clipping, bf16 autocast on CUDA, optional ``torch.compile``, a checkpoint every epoch
(``--resume`` continues from it exactly, wherever a kill interrupted the run: ``checkpoint``), centre-view
validation every epoch; the first non-finite training loss stops the run (``diverged``). Under ``torchrun``
(WORLD_SIZE > 1) it runs DDP (nccl on CUDA, gloo on CPU); rank 0 writes the files.

Under DDP the ranks agree at fixed points (``_sync``: one all-reduce of two ints on a gloo group):
before every step (a rank whose batch could not be made, in its stream or a loader worker, or whose
previous step's loss was not finite, ends every rank at once: it raises its error, the others ``rank R
failed: ...``; a rank out of data ends the epoch on every rank at that step), after rank 0 takes the
run directory's lock and writes its first files, around validation and after each checkpoint. An error
inside a step itself (forward, backward) ends its rank only; torchrun then stops the others (on gloo
their next collective fails at once).

The teacher is never loaded: soft targets come from the cache, views are replayed from its seeds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import hooks, recipes
from ..config import TrainConfig, to_dict, write_resolved
from ..files import ReaderMark, UserError, atomic_write_bytes, atomic_write_json, check_out, claim_dir, sweep_temps
from ..format import RUN_CLASS_STATS_NAME, RUN_CONFIG_NAME
from ..models import create_model, load_init, param_groups
from ..progress import bar, note
from . import checkpoint as ck
from .data import DistillDataset, DistillLoader, ValStream, auto_workers, batches_per_epoch, finish, loader, to_device
from .losses import SoftTargetLoss, topk_correct
from .prepare import Data, prepare_data, validate
from .relations import ClassStats, relation_classes

VAL_CACHE_BYTES = 512 << 20   # keep the validation views in memory between epochs below this size
VAL_SKIPS_SHOWN = 5           # skipped validation keys (with reasons) a summary names


# ----------------------------------------------------------------------------- result

@dataclass
class TrainResult:
    run_dir: Path
    model: str
    source: str                      # "cache" or "hard labels"
    epochs: int                      # epochs completed
    images_seen: int
    wall_s: float
    img_s: float
    final_top1: float | None = None
    final_top5: float | None = None
    best_top1: float | None = None
    best_top5: float | None = None
    best_epoch: int | None = None
    complete: bool = True
    hard_labels: "TrainResult | None" = None   # the --compare-hard-labels run
    notes: list[str] = field(default_factory=list)
    schedule: dict = field(default_factory=dict)   # steps taken and planned, steps per epoch, last and min lr
    temperature: float | None = None               # T of the soft loss (the cache's); None: hard labels
    val: dict | None = None                        # images scored and skipped by the last validation
    rank: int = 0                                  # the DDP rank that made this result (only rank 0 reports)

    def to_dict(self) -> dict:
        d = {"run_dir": str(self.run_dir), "model": self.model, "source": self.source, "epochs": self.epochs,
             "complete": self.complete, "images_seen": self.images_seen, "wall_s": round(self.wall_s, 3),
             "img_s": round(self.img_s, 1),
             "final": {"val_top1": self.final_top1, "val_top5": self.final_top5}, "val": self.val,
             "best": {"val_top1": self.best_top1, "val_top5": self.best_top5, "epoch": self.best_epoch},
             "temperature": self.temperature, "schedule": self.schedule, "notes": self.notes}
        if self.hard_labels is not None:
            d["hard_labels"] = self.hard_labels.to_dict()
        return d

    def summary(self) -> str:
        lines = [f"train-student: {self.run_dir} ({self.model} from {self.source}, {self.epochs} epochs"
                 + (f", soft loss at T = {self.temperature:g}" if self.temperature not in (None, 1.0) else "")
                 + ("" if self.complete else ", stopped early: --resume to continue") + ")"]
        if self.final_top1 is not None:
            lines.append(f"  val top-1 {_pct(self.final_top1)} (best {_pct(self.best_top1)} at epoch {self.best_epoch}), "
                         f"top-5 {_pct(self.final_top5)}")
        if self.val is not None:
            v = self.val
            why = "; ".join(f"{e['key']}: {e['reason']}" for e in v["skipped_examples"])
            lines.append(f"  val: {v['scored']:,} images scored, {v['skipped']:,} skipped" + (f" (first: {why})" if why else ""))
        lines.append(f"  {self.images_seen:,} images seen, {self.img_s:,.0f} img/s, wall {_hms(self.wall_s)}")
        lines += [f"  NOTE: {n}" for n in self.notes]
        h = self.hard_labels
        if h is not None and self.final_top1 is not None and h.final_top1 is not None:
            lines.append(f"  student from cache: {_pct(self.final_top1)}, from hard labels: {_pct(h.final_top1)} "
                         f"(val top-1 after {self.epochs} epochs; {self.final_top1 - h.final_top1:+.1f} points)")
            lines.append(f"    {'':<18}{'top-1':>8}{'best':>8}{'top-5':>8}")
            for name, r in (("from cache", self), ("from hard labels", h)):
                lines.append(f"    {name:<18}{_pct(r.final_top1):>8}{_pct(r.best_top1):>8}{_pct(r.final_top5):>8}")
        return "\n".join(lines)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1f}%"


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False           # we initialised the process group (and tear it down)
    flags: object = None          # the gloo group of ``_sync`` (None: the default group, already gloo)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_dist(cfg: TrainConfig) -> Dist:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: CUDA is not available on this machine")
    if want not in ("cpu", "cuda") and not want.startswith("cuda:"):
        raise UserError(f"--device must be cpu, cuda, cuda:N or auto, got {cfg.device!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device(want))
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    owned = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owned = True
    flags = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")   # CPU flags, no GPU sync
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owned=owned, flags=flags)


def _all_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def _gather(d: Dist):
    """None on one process; else a function list -> the concatenation of every rank's lists."""
    if d.world == 1:
        return None
    import torch.distributed as dist

    def gather(items: list) -> list:
        out: list = [None] * d.world
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]
    return gather


def _one_line(e: BaseException) -> str:
    """An error's message on one line (a DataLoader worker's error carries its traceback: the last line)."""
    text = str(e).strip()
    if "Original Traceback" in text:                 # re-raised by the DataLoader from a worker
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if isinstance(e, UserError) and ": " in last else last
    text = text.splitlines()[0] if text else ""
    return text if isinstance(e, UserError) else f"{type(e).__name__}: {text}".rstrip(": ")


def _reraise(err: BaseException):
    """Raise ``err``; a UserError from a DataLoader worker as its one-line message (not its traceback)."""
    if isinstance(err, UserError) and "Original Traceback" in str(err):
        raise UserError(_one_line(err)) from None
    raise err


def _sync(d: Dist, err: BaseException | None = None, dry: bool = False) -> bool:
    """Every rank calls this at the same point: one all-reduce (MAX) of [failed, out of data]. When a
    rank passes ``err``, every rank raises: that one its error, the others ``UserError("rank R failed:
    ...")`` (the message travels in one more collective). Returns whether any rank is out of data."""
    if d.world == 1:
        if err is not None:
            _reraise(err)
        return dry
    import torch.distributed as dist
    flag = torch.tensor([int(err is not None), int(dry)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.flags)
    failed, dry_any = flag.tolist()
    if failed:
        msgs: list = [None] * d.world
        dist.all_gather_object(msgs, None if err is None else _one_line(err), group=d.flags)
        if err is not None:
            _reraise(err)
        r = next(i for i, m in enumerate(msgs) if m is not None)
        raise UserError(f"rank {r} failed: {msgs[r]}")
    return bool(dry_any)


def _synced(batches, d: Dist, check=lambda final: None):
    """This rank's batches, in step with the other ranks: before each step all agree (``_sync``)
    whether a rank could not make its batch or ``check(final)`` returns an error (then all stop) or ran
    out (then the epoch ends on all). ``check`` runs once the next batch is made, and with ``final``
    once the data ran out: a check of the losses so far rides on this collective."""
    it = iter(batches)
    while True:
        b, err = None, None
        try:
            b = next(it)
        except StopIteration:
            pass
        except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it
            err = e
        err = err or check(b is None and err is None)
        if _sync(d, err, dry=b is None and err is None):
            return
        yield b


class LossWatch:
    """The first non-finite training loss of an epoch, noted on the loss's device (no host sync per
    step) and read every ``every`` steps (1 on CPU; on CUDA a read waits for the queued steps, so it is
    rare) and when the data runs out: the run stops within ``every`` steps, naming the first bad one."""

    def __init__(self, device: torch.device, every: int):
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=torch.float32, device=device)
        self.every, self.n = every, 0

    def add(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self.first < 0)
        self.first = torch.where(bad, step, self.first)
        self.value = torch.where(bad, loss.detach().float(), self.value)
        self.n += 1

    def error(self, final: bool, epoch: int, steps: int, targets: str) -> UserError | None:
        if not self.n or (not final and self.n % self.every):
            return None
        first = int(self.first)
        return None if first < 0 else diverged(float(self.value), epoch, first, steps, targets)


def diverged(loss: float, epoch: int, step: int, steps: int, targets: str) -> UserError | None:
    """None for a finite training loss; else the error that ends the run: the loss of ``step`` (of
    ``steps``) of ``epoch`` (1-based) is NaN or infinite, with what to check (``targets``: the data)."""
    if math.isfinite(loss):
        return None
    return UserError(f"the training loss is {loss} (not finite) at epoch {epoch}, step {step} of {steps}: training "
                     f"diverged; check the learning rate (--lr), the weight decay (--weight-decay) and {targets}")


# ----------------------------------------------------------------------------- schedule

def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float, warmup_lr: float = 0.0) -> float:
    """The lr of optimiser step ``step`` (0-based) of ``total``: linear warmup from ``warmup_lr`` (step 0)
    towards lr over ``warmup`` steps (timm's CosineLRScheduler warmup, as TinyViT uses it), then cosine
    from lr down to ``min_lr``, reached exactly at the last step (``total - 1``). (TinyViT's timm
    scheduler runs its cosine over all steps and would reach min lr one step after the last.)"""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- the API

# a run directory: the resolved config a train-student run writes first (adapt-teacher's lacks these keys)
TRAIN_MARKS = ((RUN_CONFIG_NAME, {"model": None, "cache": None}),)


def _inputs(cfg: TrainConfig) -> tuple:
    """What the run reads: --out may hold, contain or be inside none of these."""
    return cfg.shards, cfg.cache, cfg.val_shards, cfg.exclude, cfg.init, cfg.policy


def train_student(cfg: TrainConfig, policy_table: dict | None = None, *, stop_after: int | None = None) -> TrainResult:
    """Train ``cfg.model`` into ``cfg.out``. ``stop_after``: end this call after that many epochs
    (the run stays resumable with ``--resume``). With ``cfg.compare_hard_labels``, also train the
    same student from hard labels on the cache's views (same samples, epochs, steps, schedule and
    seed) into ``RUN_DIR/hard-labels``. Rank 0 holds the run directory's lock. Options the config leaves unset (None)
    take the values of its recipe (``distill.recipes``)."""
    cfg, overridden = recipes.resolve_train(cfg)
    validate(cfg)
    check_out(cfg.out, "train-student", TRAIN_MARKS, inputs=_inputs(cfg))     # before anything slow
    if cfg.loader_workers < 0:           # resolved here, so config.json (and --resume's check) hold the number
        cfg = dataclasses.replace(cfg, loader_workers=auto_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    d = _setup_dist(cfg)
    try:
        with contextlib.ExitStack() as held:
            err = None
            if d.main:                   # the lock first: a second run on --out is refused before anything slow
                try:
                    held.enter_context(claim_dir(cfg.out, "train-student", TRAIN_MARKS, inputs=_inputs(cfg)))
                except Exception as e:  # noqa: BLE001 - the other ranks must not wait for rank 0
                    err = e
            _sync(d, err)
            # every refusal, before anything is written; each rank checks 1/world of the cache files
            data = prepare_data(cfg, policy_table, world=d.world, rank=d.rank, gather=_gather(d))
            note(recipes.describe(cfg, d.world, overridden), cfg.quiet or not d.main)
            if recipes.get(cfg.recipe).fine_tune and not cfg.init and not cfg.resume:
                note(f"warning: recipe {cfg.recipe} fine-tunes a pretrained student; without --init it starts "
                     f"from random weights", cfg.quiet or not d.main)
            _policy_note(cfg, data, cfg.quiet or not d.main)
            held.enter_context(_reading(data, d, cfg.quiet))
            res = _run(cfg, data, d, stop_after)
            if cfg.compare_hard_labels and not cfg.hard_labels and res.complete:
                hcfg = dataclasses.replace(cfg, hard_labels=True, compare_hard_labels=False, alpha=0.0,
                                           out=str(Path(cfg.out) / ck.BASELINE))
                note(f"--compare-hard-labels: training the same student from hard labels on the cache's views "
                     f"into {hcfg.out}", cfg.quiet or not d.main)
                hdata = dataclasses.replace(data, source="hard labels", identity=dict(data.identity, source="hard labels"))
                res.hard_labels = _run(hcfg, hdata, d, stop_after)
                if d.main:
                    atomic_write_json(Path(cfg.out) / ck.SUMMARY, res.to_dict())
        return res
    finally:
        if d.owned:
            import torch.distributed as dist
            dist.destroy_process_group()


def _policy_note(cfg: TrainConfig, data: Data, quiet: bool) -> None:
    """Say when the cache's views were cut with another augmentation policy than the recipe's."""
    if data.cache is None or not recipes.get(cfg.recipe).policy:
        return
    diff = recipes.policy_differences(cfg.recipe, data.policy)
    if diff:
        note(f"note: the cache's views were cut with another augmentation policy than recipe {cfg.recipe}'s "
             f"({', '.join(diff)} differ); the student replays the cache's views (cache-teacher --recipe "
             f"{cfg.recipe} cuts the recipe's)", quiet)


@contextlib.contextmanager
def _reading(data: Data, d: Dist, quiet: bool):
    """Rank 0 marks the cache as being read, so that cache-teacher --overwrite will not delete it (a
    cache in an object store is not marked: a store has no such marks)."""
    if data.cache is None or not d.main or data.cache.remote:
        yield
        return
    with ReaderMark(data.cache.path, "train-student") as mark:
        if not mark.marked:
            note(f"cannot mark {data.cache.path} as in use (not writable): a cache-teacher --overwrite there "
                 f"would not see this run", quiet)
        yield


@dataclass
class _Session:
    """A run being trained: model (and its DDP/compiled forward), optimiser, loss, state, schedule."""
    cfg: TrainConfig
    data: Data
    d: Dist
    model: torch.nn.Module
    fwd: torch.nn.Module
    opt: torch.optim.Optimizer
    crit: SoftTargetLoss
    state: dict
    per_step: int                 # images of one batch over all ranks
    batches: int                  # batches per rank and epoch (what the loader yields)
    steps_per_epoch: int          # optimiser steps per epoch: batches / accumulation-steps, rounded up
    warmup: int                   # warmup optimiser steps
    plan: recipes.LrPlan          # lr, min lr and warmup lr scaled by the global batch
    ddp: torch.nn.Module | None = None   # the DDP wrapper (its no_sync skips all-reduces while accumulating)

    @property
    def device_views(self) -> bool:
        """uint8 views from the loader, finished on the training device (``--device-views``; default on CUDA)."""
        v = self.cfg.device_views
        return self.d.device.type == "cuda" if v is None else bool(v)

    def lr(self, epoch: int, step: int) -> float:
        """The lr of step ``step`` of ``epoch``: every epoch starts at its planned place in the schedule."""
        p = self.plan
        return lr_at(epoch * self.steps_per_epoch + step, self.steps_per_epoch * self.cfg.epochs, self.warmup,
                     p.peak, p.min_lr, p.warmup_lr)


def _open(cfg: TrainConfig, data: Data, d: Dist) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """A new model (or --init), or the checkpoint of a --resume; returns (model, optimiser, state)."""
    out, quiet = Path(cfg.out), cfg.quiet or not d.main
    last = out / ck.LAST
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if last.exists() and not cfg.resume:
        raise UserError(f"{out} already holds a run ({ck.LAST}); pass --resume to continue it or choose another --out")
    torch.manual_seed(cfg.seed)
    try:
        model = create_model(cfg.model, data.num_classes, img_size=cfg.image_size, drop_path_rate=cfg.drop_path)
    except ValueError as e:
        raise UserError(f"--model {cfg.model}: {e}") from None
    if hasattr(model, "set_distilled_training"):       # a distillation head learns from the cached teacher
        model.set_distilled_training(not cfg.hard_labels)
    ckpt = None
    if cfg.resume and last.exists():
        ckpt = ck.load(last)
        split_note = ck.check_resume(ckpt, to_dict(cfg), data.identity, last, cfg.allow_resplit)
        model.load_state_dict(ckpt["model"])
    elif cfg.init:
        try:
            rep = load_init(model, cfg.init)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f"--init: {e}") from None
        note(f"--init {cfg.init}: {rep.summary()}", quiet)
    elif cfg.resume:
        note(f"--resume: no {ck.LAST} in {out}; starting a new run", quiet)
    model.to(d.device)
    try:
        groups = param_groups(model, cfg.weight_decay, cfg.layer_lr_decay)
    except ValueError as e:
        raise UserError(f"--layer-lr-decay: {e}") from None
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    state = {"epoch": 0, "step": 0, "planned": 0, "images_seen": 0, "train_s": 0.0, "wall_s": 0.0,
             "best_top1": None, "best_top5": None, "best_epoch": None, "notes": [],
             "rows": [], "class_stats": None}     # every metrics row so far; the last epoch's class_stats.npz
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        state.update(ckpt["state"])
        if "rows" not in ckpt["state"]:           # a checkpoint of an older distill: the rows were in the file
            state["rows"] = [r for r in ck.read_metrics(out) if r["epoch"] <= state["epoch"]]
        if split_note:
            state["notes"] = list(state.get("notes", [])) + [split_note]
            note(split_note, quiet)
        part = state.get("partial")
        where = f"in epoch {part['epoch'] + 1} after step {part['taken']}" if part else f"after epoch {state['epoch']}"
        note(f"resuming {out} {where} of {cfg.epochs} epochs", quiet)
    return model, opt, state


def _session(cfg: TrainConfig, data: Data, d: Dist) -> _Session:
    batches = max(1, batches_per_epoch(data.samples, d.world, cfg.batch_size, cfg.loader_workers))
    steps = -(-batches // cfg.accumulation_steps)
    plan, warmup = recipes.lr_plan(cfg, d.world), int(round(cfg.warmup_epochs * steps))
    err = None
    try:
        model, opt, state = _open(cfg, data, d)
        if d.main:
            out = Path(cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            write_resolved(cfg, out, extra={"schedule": dict(plan.to_dict(), **{
                "steps-per-epoch": steps, "batches-per-epoch": batches, "warmup-steps": warmup,
                "steps": steps * cfg.epochs, "processes": d.world})})
            sweep_temps(out)                     # (claim_dir swept RUN_DIR; this also covers RUN_DIR/hard-labels)
            _publish(cfg, data, model, state)    # a resumed run: what its last checkpoint had left to write
    except Exception as e:  # noqa: BLE001 - every rank stops (_sync)
        err = e
    _sync(d, err)
    fwd, ddp = model, None
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = ddp = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                        broadcast_buffers=cfg.broadcast_buffers)
    if cfg.compile:
        fwd = torch.compile(fwd)
    crit = criterion(cfg, data)
    return _Session(cfg, data, d, model, fwd, opt, crit, state, cfg.batch_size * d.world, batches, steps,
                    warmup, plan, ddp)


def criterion(cfg: TrainConfig, data: Data) -> SoftTargetLoss:
    """The run's loss (``SoftTargetLoss``, the public one): soft CE on the cache's targets at the cache's
    temperature (T² · CE at T), plus alpha times the hard-label CE; the hard term alone in a --hard-labels
    run; labels for one head and the cache for the other of a student with a distillation head."""
    try:
        return SoftTargetLoss(data.num_classes, alpha=cfg.alpha, fill=cfg.target_fill, smoothing=cfg.label_smoothing,
                              hard_only=cfg.hard_labels, temperature=data.temperature or 1.0,
                              dist_target=cfg.dist_head_target)
    except ValueError as e:
        raise UserError(f"loss options (--alpha, --target-fill, --dist-head-target): {e}") from None


def _stream(s: _Session) -> DistillLoader:
    """This rank's ``DistillLoader`` (persistent workers) over the run's ``DistillDataset``: the public
    data path, nothing else."""
    cfg, data, d = s.cfg, s.data, s.d
    if data.samples < d.world:
        raise UserError(f"{data.samples} training sample(s) for {d.world} processes: every process needs at least one")
    ds = DistillDataset(data.refs, data.cache, spec=data.spec, image_size=cfg.image_size, batch_size=cfg.batch_size,
                        seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, num_classes=data.num_classes,
                        exclude=data.exclude, rank=d.rank, world=d.world, drop_last=data.samples >= s.per_step,
                        finish="none" if s.device_views else "cpu")
    workers = max(1, cfg.loader_workers)
    if ds.drop_last and s.batches < workers:
        note(f"warning: {s.batches} batch(es) per process and epoch for {workers} loader workers: "
             f"some workers idle", not d.main)
    return DistillLoader(ds, cfg.loader_workers, pin_memory=d.device.type == "cuda", persistent_workers=True,
                         seed=cfg.seed)


def _train_mode(s: _Session) -> None:
    """Training mode; BatchNorm layers stay in eval mode (frozen statistics) under ``eval_bn``."""
    s.model.train()
    if s.cfg.eval_bn:
        for m in s.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _step(s: _Session) -> None:
    if s.cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.clip_grad)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    s.state["step"] += 1
    if hooks.ACTIVE:
        hooks.fire("train-step", step=s.state["step"])


def _train_epoch(s: _Session, train_loader: DistillLoader, epoch: int) -> tuple[list[float], list[str], float]:
    """One epoch of steps: returns (all-reduced [loss sum, n, part sums...], part names, last lr).
    With accumulation, each optimiser step sums the gradients of ``accumulation_steps`` batches (the
    epoch's last step those left), each batch's loss divided by their number; under DDP only the last
    batch of a step all-reduces (``no_sync``). Every ``--checkpoint-every`` steps inside the epoch
    last.pt takes the loader's resume point and every rank's sums (``_save_partial``), and the RNGs are
    seeded afresh from (seed, epoch, rank, step), so a run resumed there goes on exactly."""
    cfg, d = s.cfg, s.d
    accum, every = cfg.accumulation_steps, cfg.checkpoint_every
    cuda = d.device.type == "cuda"
    part = s.state.get("partial")
    part = part if part is not None and part["epoch"] == epoch else None
    train_loader.dataset.set_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    part_sums: dict[str, torch.Tensor] = {}
    n, taken, micro, lr = 0, 0, 0, s.lr(epoch, 0)
    if part is not None:
        train_loader.load_state_dict(part["loader"])
        mine = _my_sums(part["sums"], d)
        loss_sum += mine["loss"]
        part_sums = {k: torch.tensor(v, dtype=torch.float64, device=d.device) for k, v in mine["parts"].items()}
        n, taken = int(mine["n"]), int(part["taken"])
    ck.seed_epoch(*((cfg.seed, epoch, d.rank) + ((taken,) if taken else ())))
    _train_mode(s)
    s.opt.zero_grad(set_to_none=True)
    pbar = bar(s.batches * s.per_step, f"epoch {epoch + 1}/{cfg.epochs}", "img", cfg.quiet or not d.main)
    if pbar and n:
        pbar.update(n * d.world)
    watch = LossWatch(d.device, 32 if cuda else 1)
    targets = "the labels" if cfg.hard_labels else "the teacher targets (--cache)"

    def check(final: bool) -> UserError | None:
        return watch.error(final, epoch + 1, s.steps_per_epoch, targets)

    for b in _synced(train_loader, d, check):
        b.pop("stats")
        group = max(1, min(accum, s.batches - taken * accum))    # batches of this optimiser step
        if micro == 0:
            lr = s.lr(epoch, taken)
            for g in s.opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
        b = to_device(finish(b, d.device), d.device)    # uint8 views: normalised, erased and mixed on the device
        last = micro + 1 >= group
        with (s.ddp.no_sync() if s.ddp is not None and not last else contextlib.nullcontext()):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = s.fwd(b["image"])
            loss, parts = s.crit.parts(logits, b)
            (loss / group if group > 1 else loss).backward()
        watch.add(loss, taken + 1)
        micro += 1
        bs = b["label"].shape[0]
        n += bs
        loss_sum += loss.detach().double() * bs
        for k, v in parts.items():
            part_sums[k] = part_sums.get(k, 0) + v.double() * bs
        if pbar:
            pbar.update(bs * d.world)
        if last:
            _step(s)
            taken, micro = taken + 1, 0
            if every and taken % every == 0 and taken < s.steps_per_epoch:
                _save_partial(s, train_loader, epoch, taken, loss_sum, n, part_sums, check)
                ck.seed_epoch(cfg.seed, epoch, d.rank, taken)
    if micro:                      # the loader ran out inside a step (samples skipped): step on what it has
        _step(s)
        taken += 1
    if pbar:
        pbar.close()
    if n == 0:     # the same on every rank: they stop at the same step
        raise UserError(f"epoch {epoch + 1}: no training batch could be made (every sample skipped?)")
    s.state.pop("partial", None)
    s.state["planned"] = s.state.get("planned", 0) + s.steps_per_epoch
    if taken != s.steps_per_epoch:
        s.state.setdefault("notes", []).append(
            f"epoch {epoch + 1}: {taken} of {s.steps_per_epoch} planned steps (samples skipped): "
            f"its schedule ended at lr {lr:.3g}")
    keys = sorted(part_sums)
    return _all_sum([float(loss_sum), float(n)] + [float(part_sums[k]) for k in keys], d), keys, lr


def _my_sums(sums: list[dict], d: Dist) -> dict:
    """This rank's running sums of a checkpoint inside an epoch; resumed on another number of ranks
    (--allow-resplit), rank 0 takes all of them (the epoch's row adds up every rank's)."""
    if len(sums) == d.world:
        return sums[d.rank]
    if d.rank:
        return {"loss": 0.0, "n": 0, "parts": {k: 0.0 for k in sums[0]["parts"]}}
    return {"loss": sum(x["loss"] for x in sums), "n": sum(x["n"] for x in sums),
            "parts": {k: sum(x["parts"][k] for x in sums) for k in sums[0]["parts"]}}


def _save_partial(s: _Session, train_loader: DistillLoader, epoch: int, taken: int, loss_sum: torch.Tensor, n: int,
                  part_sums: dict, check) -> None:
    """A checkpoint inside an epoch, after optimiser step ``taken``: last.pt with the loader's resume
    point and every rank's running sums under ``state["partial"]`` (the published files stay those of
    the last whole epoch). Losses so far are checked first (``check``): a diverged run is not checkpointed."""
    d = s.d
    _sync(d, check(True))
    mine = {"loss": float(loss_sum), "n": int(n), "parts": {k: float(v) for k, v in part_sums.items()}}
    gather = _gather(d)
    sums = gather([mine]) if gather is not None else [mine]
    err = None
    if d.main:
        try:
            s.state["partial"] = {"epoch": epoch, "taken": taken, "loader": train_loader.state_dict(), "sums": sums}
            _write_last(s)
        except Exception as e:  # noqa: BLE001 - the other ranks must not wait for rank 0
            err = e
    _sync(d, err)


def _end_epoch(s: _Session, epoch: int, tot: list[float], keys: list[str], lr: float, t_epoch: float,
               val: "Validator | None") -> None:
    """Validate, add the epoch's metrics row to the state, write the checkpoint and the files made from it (rank 0)."""
    data, d, state = s.data, s.d, s.state
    n_all = int(tot[1])
    train_s = time.perf_counter() - t_epoch
    stats = ClassStats(relation_classes(data.num_classes), d.device) if val and epoch + 1 == s.cfg.epochs else None
    top1, top5 = val.evaluate(s.model, stats) if val else (None, None)
    state["epoch"] = epoch + 1
    state["images_seen"] += n_all
    state["train_s"] += train_s
    row = {"epoch": epoch + 1, "train_loss": tot[0] / max(n_all, 1), "lr": lr, "val_top1": top1, "val_top5": top5,
           "img_s": n_all / max(train_s, 1e-9), "images": n_all, "time_s": round(time.perf_counter() - t_epoch, 3)}
    row.update({f"{k}_loss": tot[2 + i] / max(n_all, 1) for i, k in enumerate(keys)})
    if val is not None and val.report is not None:
        rep = val.report
        row.update(val_images=rep["scored"], val_skipped=rep["skipped"], val_skipped_examples=rep["skipped_examples"])
    if data.cache is not None:
        row["cache_epoch"] = epoch % data.cache.epochs
    if top1 is not None and (state["best_top1"] is None or top1 > state["best_top1"]):
        state.update(best_top1=top1, best_top5=top5, best_epoch=epoch + 1)
    state["rows"] = state["rows"] + [row]
    state["class_stats"] = _npz(stats.arrays()) if stats is not None and stats.n > 1 else None
    state["wall_s"] += time.perf_counter() - t_epoch
    err = None
    if d.main:
        try:
            _save(s)
        except Exception as e:  # noqa: BLE001 - the other ranks must not wait for rank 0
            err = e
    _sync(d, err)


def _npz(arrays: dict) -> torch.Tensor:
    """The bytes of an .npz of ``arrays``, as a uint8 tensor (a checkpoint loads it with weights_only)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _save(s: _Session) -> None:
    """Rank 0, after an epoch: last.pt, the epoch's commit point (model, optimiser and the state, which
    holds everything the other files are made of), then those files (``_publish``), then the epoch's line."""
    cfg, state = s.cfg, s.state
    _write_last(s)
    _publish(cfg, s.data, s.model, state)
    row = state["rows"][-1]
    if not cfg.quiet:
        top1, top5 = row["val_top1"], row["val_top5"]
        acc = f", val top-1 {top1:.2f}% top-5 {top5:.2f}%" if top1 is not None else ""
        note(f"epoch {row['epoch']}/{cfg.epochs}: loss {row['train_loss']:.4f}, lr {row['lr']:.2e}{acc}, "
             f"{row['img_s']:,.0f} img/s")


def _write_last(s: _Session) -> None:
    state = s.state
    ck.save(Path(s.cfg.out) / ck.LAST, {"model": s.model.state_dict(), "optimizer": s.opt.state_dict(),
                                        "state": dict(state), "config": to_dict(s.cfg), "data": s.data.identity,
                                        "epoch": state["epoch"], "step": state["step"]})


def _publish(cfg: TrainConfig, data: Data, model: torch.nn.Module, state: dict) -> None:
    """Rank 0: the files made from last.pt's contents (``model`` and ``state`` as it holds them):
    metrics.jsonl (every row), last.json, best.pt and best.json when last.pt's epoch is the best,
    class_stats.npz of the last epoch. After each checkpoint, and on --resume before training on, so a
    run killed after last.pt was written (the files behind it old or missing) ends as if it had not been."""
    out, rows = Path(cfg.out), state["rows"]
    ck.write_metrics(out, rows)
    if not rows:
        return
    top1, top5 = rows[-1]["val_top1"], rows[-1]["val_top5"]
    side = {"epoch": state["epoch"], "epochs": cfg.epochs, "step": state["step"], "images_seen": state["images_seen"],
            "val_top1": top1, "val_top5": top5, "model": cfg.model, "num_classes": data.num_classes,
            "image_size": cfg.image_size}
    atomic_write_json((out / ck.LAST).with_suffix(".json"), side)
    if state["best_epoch"] == state["epoch"] and state.get("partial") is None:   # (mid-epoch weights are not the best's)
        ck.save(out / ck.BEST, {"model": model.state_dict(), "config": to_dict(cfg), "data": data.identity,
                                "epoch": state["epoch"], "val_top1": top1, "val_top5": top5}, side)
    if state.get("class_stats") is not None:
        atomic_write_bytes(out / RUN_CLASS_STATS_NAME, state["class_stats"].numpy().tobytes())


def _run(cfg: TrainConfig, data: Data, d: Dist, stop_after: int | None) -> TrainResult:
    s = _session(cfg, data, d)
    train_loader = _stream(s)
    val = Validator(data.val_refs, image_size=cfg.image_size, batch_size=max(cfg.batch_size, 64), num_classes=data.num_classes,
                    d=d, workers=cfg.loader_workers, seed=cfg.seed) if data.val_refs else None
    quiet = cfg.quiet or not d.main
    done_here = 0
    for epoch in range(s.state["epoch"], cfg.epochs):
        if stop_after is not None and done_here >= stop_after:
            break
        if data.cache is not None and epoch == max(data.cache.epochs, s.state["epoch"]) and epoch >= data.cache.epochs:
            note(f"warning: epoch {epoch + 1} > the cache's {data.cache.epochs} epochs: reusing cached views "
                 f"(training epoch e uses cached epoch e mod {data.cache.epochs})", not d.main)
        t_epoch = time.perf_counter()
        tot, keys, lr = _train_epoch(s, train_loader, epoch)
        _end_epoch(s, epoch, tot, keys, lr, t_epoch, val)
        done_here += 1
    if data.excluded:
        note(f"--exclude: {data.excluded} sample(s) per epoch left out"
             + (f" (cache-teacher had already left out {data.cache.manifest['totals'].get('excluded', 0)})"
                if data.cache is not None else ""), quiet)
    state = s.state
    final = state["rows"][-1] if state["rows"] else {}
    res = TrainResult(run_dir=Path(cfg.out), model=cfg.model, source=data.source, epochs=state["epoch"],
                      images_seen=state["images_seen"], wall_s=state["wall_s"],
                      img_s=state["images_seen"] / max(state["train_s"], 1e-9),
                      final_top1=final.get("val_top1"), final_top5=final.get("val_top5"),
                      best_top1=state["best_top1"], best_top5=state["best_top5"], best_epoch=state["best_epoch"],
                      val=({"scored": final["val_images"], "skipped": final["val_skipped"],
                            "skipped_examples": final["val_skipped_examples"]} if "val_images" in final else None),
                      rank=d.rank, complete=state["epoch"] >= cfg.epochs, temperature=None if cfg.hard_labels else data.temperature,
                      notes=list(data.notes) + list(state.get("notes", [])),
                      schedule={"steps": state["step"], "steps_planned": state.get("planned"),
                                "steps_per_epoch": s.steps_per_epoch, "last_lr": final.get("lr"),
                                "min_lr": s.plan.min_lr, "peak_lr": s.plan.peak, "global_batch": s.plan.global_batch,
                                "recipe": cfg.recipe})
    if d.main and res.complete:
        atomic_write_json(Path(cfg.out) / ck.SUMMARY, res.to_dict())
    return res


class Validator:
    """Top-1/top-5 on the centre views of the validation shards (kept in memory when small), on the
    model's device; each of ``d``'s ranks scores its part. train-student's and adapt-teacher's."""

    def __init__(self, refs, *, image_size: int, batch_size: int, num_classes: int, d: Dist | None = None,
                 workers: int = 0, seed: int = 0):
        self.d = d or Dist()
        self.ds = ValStream(refs, image_size=image_size, batch_size=batch_size, num_classes=num_classes,
                            rank=self.d.rank, world=self.d.world)
        self.loader = loader(self.ds, workers, pin_memory=self.d.device.type == "cuda", seed=seed)
        self.kept: list | None = None
        self.keep = True
        self.report: dict | None = None   # the last evaluation's images scored and skipped (every rank's)

    def batches(self):
        if self.kept is not None:
            yield from self.kept
            return
        kept, size = [], 0
        for b in self.loader:
            if self.keep:
                size += b["image"].numel() * 4
                if size > VAL_CACHE_BYTES:
                    self.keep, kept = False, []
                else:
                    kept.append(b)
            yield b
        if self.keep:
            self.kept = kept

    def evaluate(self, model, stats: ClassStats | None = None) -> tuple[float, float]:
        """(top-1, top-5) in percent over every rank's part; a rank's error ends every rank (``_sync``).
        ``report`` then holds the images scored and skipped, with the first few skipped keys and reasons.
        ``stats``, when given, gathers every rank's class-relation sums (``relations.py``)."""
        err, counts, skipped = None, [0, 0, 0, 0], []
        try:
            counts, skipped = self._count(model, stats)
        except Exception as e:  # noqa: BLE001 - every rank stops
            err = e
        _sync(self.d, err)
        if stats is not None and self.d.world > 1:
            import torch.distributed as dist
            dist.all_reduce(stats.sum_p)
            dist.all_reduce(stats.sum_pp)
            stats.n = int(_all_sum([float(stats.n)], self.d)[0])
        c1, c5, n, k = _all_sum(counts, self.d)
        gather = _gather(self.d)
        first = (gather(skipped) if gather else skipped)[:VAL_SKIPS_SHOWN]
        self.report = {"scored": int(n), "skipped": int(k),
                       "skipped_examples": [{"key": key, "reason": why} for key, why in first]}
        return (100.0 * c1 / n, 100.0 * c5 / n) if n else (None, None)

    @torch.inference_mode()
    def _count(self, model, stats: ClassStats | None = None) -> tuple[list, list]:
        """([top-1 hits, top-5 hits, samples, samples skipped], the first skipped (key, reason)) of this rank."""
        was, device = model.training, next(model.parameters()).device
        model.eval()
        c1 = c5 = n = k = 0
        first: list = []
        for b in self.batches():
            k += len(b["skipped"])
            first += b["skipped"][:VAL_SKIPS_SHOWN - len(first)]
            if not b["label"].shape[0]:
                continue
            x, y = b["image"].to(device, non_blocking=True), b["label"].to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x)
            a, b5 = topk_correct(logits.float(), y, (1, 5))
            if stats is not None:
                stats.add(logits)
            c1, c5, n = c1 + a, c5 + b5, n + y.shape[0]
        model.train(was)
        return [c1, c5, n, k], first

"""Stage configs: frozen dataclasses, loaded from pipeline TOML tables and CLI flags alike.

One field = one TOML key (``topk``, ``teacher-input-size``) = one CLI flag (``--topk``,
``--teacher-input-size``). Flags win over the file. Unknown keys are refused. No torch, no Ray.

A pipeline file has a ``[data]`` table (``train``, ``val`` shard specs), an optional ``[policy]``
table (augmentation, see ``distill.data.augment.Policy``) and one table per stage, named like the
subcommand (``[adapt-teacher]``, ``[filter-labels]``, ``[cache-teacher]``, ``[train-student]``), run in
that order.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import UserError, atomic_write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGE_ORDER = ("adapt-teacher", "filter-labels", "cache-teacher", "train-student")


def opt(default: Any = dataclasses.MISSING, help: str = "", metavar: str | None = None, required: bool = False,
        range: str | None = None, choices: tuple = (), **kw) -> Any:
    """A config field with the help text its CLI flag shows. ``required``: a repeatable option (default
    empty) that must be given at least once; ``build`` names it among the missing ones. ``range``: the
    interval its number (each number, for a tuple) must lie in, as ``"[1, 100000]"`` or ``"(0, 100]"``
    (an empty bound: none); ``choices``: the values it may take. Floats must be finite."""
    md = {"help": help, "metavar": metavar, "required": required, "range": range and _interval(range),
          "choices": tuple(choices)}
    if isinstance(default, (list, dict, tuple)) and default != ():
        return field(default_factory=lambda: default, metadata=md, **kw)
    return field(default=default, metadata=md, **kw)


def _interval(text: str) -> tuple:
    """``"(0, 100]"`` -> (text, 0.0, 100.0, low open, high open); an empty bound is None."""
    lo, hi = (x.strip() for x in text[1:-1].split(","))
    return (text, float(lo) if lo else None, float(hi) if hi else None, text[0] == "(", text[-1] == ")")


def _within(v: float, interval: tuple) -> bool:
    _, lo, hi, lo_open, hi_open = interval
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))


def _check_value(name: str, value: Any, md: dict) -> None:
    """Refuse a field's value outside its declared range or choices, or a float that is not finite."""
    flag = "--" + name.replace("_", "-")
    for v in value if isinstance(value, tuple) else (value,):
        if md.get("choices") and v not in md["choices"]:
            raise UserError(f"{flag} must be one of {', '.join(map(str, md['choices']))}, got {v!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise UserError(f"{flag} must be a finite number, got {v}")
        if md.get("range") and not _within(v, md["range"]):
            raise UserError(f"{flag} must be in {md['range'][0]}, got {v}")


def check(cfg) -> None:
    """Every field of a stage config within its declared range and choices (``opt``); floats finite.
    Run by each config's ``__post_init__``: a config that exists holds sane numbers, however it was made."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is not None:
            _check_value(f.name, value, f.metadata)


# what a run may do without --allow-long-run: epochs, and views (epochs x samples) computed or trained on
LONG_RUN_EPOCHS = 1000
LONG_RUN_VIEWS = 2_000_000_000
MAX_IMAGE_SIZE = 2048          # the largest input size (px) any stage takes
TEACHER_OUTPUTS = ("logits", "probs", "log-probs")


def check_run_size(epochs: int, samples: int | None, allowed: bool) -> None:
    """Refuse more than LONG_RUN_EPOCHS epochs, or more than LONG_RUN_VIEWS views (epochs x samples), unless
    ``allowed`` (--allow-long-run). ``samples`` None: not known before reading the shards (epochs only)."""
    views = epochs * (samples or 0)
    if allowed or (epochs <= LONG_RUN_EPOCHS and views <= LONG_RUN_VIEWS):
        return
    over = f" over {samples:,} samples is {views:,} views" if samples else ""
    raise UserError(f"--epochs {epochs:,}{over}: beyond the budget of {LONG_RUN_EPOCHS:,} epochs and "
                    f"{LONG_RUN_VIEWS:,} views a run takes without asking; pass --allow-long-run if you mean it")


def check_batch_memory(batch_size: int, size: int, what: str, memory: int | None = None) -> None:
    """Refuse an input batch (batch x 3 x size x size float32) larger than a quarter of this machine's
    memory (``memory`` bytes; default: physical)."""
    memory = memory or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = batch_size * 3 * size * size * 4
    if need > memory // 4:
        raise UserError(f"--batch-size {batch_size} at {what} {size} px is {need / 2**30:.1f} GiB per input batch "
                        f"(float32), more than a quarter of this machine's {memory / 2**30:.0f} GiB: lower either")


# ----------------------------------------------------------------------------- stage configs

@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    shards: str = opt(help="directory of .tar shards or a brace pattern (dir/train-{000000..000009}.tar)", metavar="SHARDS")
    teacher: tuple[str, ...] = opt((), help="teacher spec: TorchScript file, .pt2 export, module.path:callable, or timm:<name>; repeat for an ensemble", metavar="SPEC", required=True)
    out: str = opt(help="cache directory to write", metavar="CACHE_DIR")
    epochs: int = opt(1, help="augmented views (epochs) per sample", range="[1, 1000000]")
    allow_long_run: bool = opt(False, help="run more than 1,000 epochs or 2e9 views (epochs x samples), the budget a run takes without asking")
    topk: int = opt(10, help="classes stored per record", range="[1, 100000]")
    seed: int = opt(0, help="cache seed: every (sample, epoch) seed derives from it", range="[0, 9223372036854775807]")
    batch_size: int = opt(64, help="teacher batch size", range="[1, 65536]")
    device: str = opt("auto", help="cpu, cuda, or auto (cuda when available)")
    workers: int = opt(0, help="Ray workers (0: one per GPU, or one on CPU)", range="[0, 4096]")
    threads: int = opt(0, help="torch intra-op threads per CPU worker (0: cores / workers)", range="[0, 4096]")
    decode_threads: int = opt(0, help="ignored, kept for old command lines: views are rendered by --view-workers processes, or, with 0, in the worker's thread", range="[0, 4096]")
    view_workers: int = opt(-1, help="view loader processes per teacher worker (a DataLoader's spawned workers: each decodes an image once and cuts all its epoch views; uint8 to the teacher's device); 0: views rendered in the worker's thread, in turn with the teacher; -1: the node's cores per GPU - 1 on GPU (at most 16), 0 on CPU", range="[-1, 4096]")
    exclude: str | None = opt(None, help="filter-labels output directory: its dropped samples are left out", metavar="FILTER_DIR")
    ray_address: str | None = opt(None, help="join this Ray cluster (default: $RAY_ADDRESS, else an embedded local Ray)", metavar="ADDR")
    overwrite: bool = opt(False, help="replace an existing cache built with other settings")
    teacher_checkpoint: tuple[str, ...] = opt((), help="weights for timm: and module:callable teachers (one per --teacher, in order)", metavar="PATH")
    teacher_random_weights: bool = opt(False, help="allow a timm: teacher without checkpoint (seeded random weights; tests and benchmarks only)")
    teacher_num_classes: int = opt(0, help="classes a timm: teacher is created with, as its checkpoint has them (0: the shards' class count from index.json, else timm's default)", range="[0, 10000000]")
    teacher_input_size: int = opt(0, help="teacher input resolution (0: the size the teacher declares, e.g. a .pt2 program's or timm's; else 224 with a warning)", range="[0, 2048]")
    teacher_precision: str = opt("auto", help="teacher forward precision: fp32, bf16, fp16, or auto (bf16 on CUDA, fp32 on CPU)", choices=("auto", "fp32", "bf16", "fp16"))
    teacher_mean: tuple[float, ...] = opt((), help="teacher normalisation mean, comma-separated (default: timm's default config for timm: teachers, else ImageNet's 0.485,0.456,0.406)", range="[0, 1]")
    teacher_std: tuple[float, ...] = opt((), help="teacher normalisation std, comma-separated (default: timm's default config for timm: teachers, else ImageNet's 0.229,0.224,0.225)", range="(0, 1]")
    temperature: float = opt(1.0, help="softmax temperature applied to teacher logits", range="(0, 100]")
    teacher_outputs: str = opt("logits", help="what the teacher returns: logits (softmax(logits / T) is stored), probs (already probabilities: softmax(log p / T), no second softmax) or log-probs; a teacher returning probabilities is refused unless this says so", choices=TEACHER_OUTPUTS)
    prob_dtype: str = opt("float16", help="stored probability dtype: float16 or float32", choices=("float16", "float32"))
    policy: str | None = opt(None, help="TOML file with a [policy] table (default: the pipeline's [policy], else timm-like defaults)", metavar="FILE")
    recipe: str | None = opt(None, help="take the augmentation policy of this training recipe (tinyvit-22k-distill, tinyvit-1k, tinyvit-22kto1k: the views TinyViT's save_logits.py cuts); policy keys you give override it", metavar="NAME")
    retries: int = opt(2, help="times a shard is retried after its worker dies", range="[0, 100]")
    quiet: bool = opt(False, help="no progress bar")

    def __post_init__(self) -> None:
        check(self)


# ----------------------------------------------------------------------------- loading

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a TOML or CLI value to the field's type, or raise UserError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(name, value, inner)
    try:
        if origin is tuple:
            item = args[0]
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()] if item is not str else [value]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(_coerce(name, v, item) for v in value)
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise UserError(f"bad value for {name.replace('_', '-')}: {value!r} (expected {getattr(tp, '__name__', tp)})")


def build(cls, *layers: dict[str, Any], where: str = "config"):
    """Merge layers of {key: value} (later wins; None values are ignored) into a frozen ``cls``."""
    types = _field_types(cls)
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            name = key.replace("-", "_")
            if name not in types:
                valid = ", ".join(sorted(k.replace("_", "-") for k in types))
                raise UserError(f"unknown key {key!r} in {where} (valid: {valid})")
            if value is not None:
                merged[name] = _coerce(name, value, types[name])
    missing = [f.name for f in dataclasses.fields(cls)
               if (f.name not in merged and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
               or (f.metadata.get("required") and not merged.get(f.name))]
    if missing:
        raise UserError(f"missing required option(s) in {where}: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    try:
        return cls(**merged)
    except UserError as e:
        raise UserError(f"{e} (in {where})" if where != "flags" else str(e)) from None


def load_toml(path: str | os.PathLike) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"config path is a directory, not a TOML file: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"cannot parse {path}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    path: Path
    data: dict
    policy: dict | None
    stages: dict[str, dict]
    storage: dict = dataclasses.field(default_factory=dict)     # [storage] options: the store's, never written

    def stage_layer(self, stage: str) -> dict:
        """The stage's table, with [data] filling the shard options it does not set itself."""
        layer: dict[str, Any] = {}
        if "train" in self.data:
            layer["shards"] = self.data["train"]
        if "val" in self.data and stage in ("train-student", "adapt-teacher"):
            layer["val-shards"] = self.data["val"]
        layer.update(self.stages.get(stage, {}))
        return layer


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    raw = load_toml(path)
    allowed = {"data", "policy", "storage", *STAGE_ORDER}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(f"unknown table(s) {unknown} in {path} (valid: {sorted(allowed)})")
    data = raw.get("data", {})
    bad = sorted(set(data) - {"train", "val"})
    if bad:
        raise UserError(f"unknown key(s) {bad} in [data] of {path} (valid: train, val)")
    store = raw.get("storage", {})
    if set(store) - {"options"} or not isinstance(store.get("options", {}), dict):
        raise UserError(f"[storage] of {path} takes one key, options (a table of the store's filesystem options)")
    return Pipeline(path=Path(path), data=data, policy=raw.get("policy"),
                    stages={k: raw[k] for k in STAGE_ORDER if k in raw}, storage=dict(store.get("options", {})))


def to_dict(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name.replace("_", "-")] = list(v) if isinstance(v, tuple) else v
    return out


def write_resolved(cfg, directory: str | os.PathLike, name: str | None = None, extra: dict | None = None) -> None:
    """Write the resolved config next to a stage's output (plus ``extra`` keys: values derived from it)."""
    from .format import RUN_CONFIG_NAME          # (format loads numpy and pyarrow: not at import, for --help)
    atomic_write_json(Path(directory) / (name or RUN_CONFIG_NAME), dict(to_dict(cfg), **(extra or {})))


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    shards: str = opt(help="directory of .tar shards or a brace pattern", metavar="SHARDS")
    scorer: tuple[str, ...] = opt((), help="scorer spec (same forms as --teacher); repeat for an ensemble", metavar="SPEC", required=True)
    out: str = opt(help="filter directory to write", metavar="FILTER_DIR")
    rule: str = opt("confident", help="topk:N (keep when the label is among the N most probable), confident (confident learning on top-K), both[:N] (topk:N and confident), noise-rate / by-class / both-prune (cleanlab's prune_by_noise_rate / prune_by_class / both on the top-K confident joint)")
    topk: int = opt(10, help="classes recorded per sample", range="[1, 100000]")
    max_drop_frac: float = opt(0.5, help="never drop more than this fraction of a class", range="[0, 1]")
    min_per_class: int = opt(1, help="always keep at least this many samples of a class", range="[0, 1000000000]")
    write_shards: str | None = opt(None, help="also write cleaned shards (flagged samples removed) here", metavar="DIR")
    scorer_checkpoint: tuple[str, ...] = opt((), help="weights for timm: scorers", metavar="PATH")
    scorer_random_weights: bool = opt(False, help="allow a timm: scorer without checkpoint (tests and benchmarks only)")
    scorer_num_classes: int = opt(0, help="classes a timm: scorer is created with, as its checkpoint has them (0: the shards' class count from index.json, else timm's default)", range="[0, 10000000]")
    scorer_input_size: int = opt(0, help="scorer input resolution (0: the size the scorer declares, else 224 with a warning)", range="[0, 2048]")
    scorer_precision: str = opt("auto", help="scorer forward precision: fp32, bf16, fp16, or auto (bf16 on CUDA, fp32 on CPU)", choices=("auto", "fp32", "bf16", "fp16"))
    scorer_mean: tuple[float, ...] = opt((), help="scorer normalisation mean, comma-separated (default: timm's default config for timm: scorers, else ImageNet's 0.485,0.456,0.406)", range="[0, 1]")
    scorer_std: tuple[float, ...] = opt((), help="scorer normalisation std, comma-separated (default: timm's default config for timm: scorers, else ImageNet's 0.229,0.224,0.225)", range="(0, 1]")
    crop_pct: float = opt(0.875, help="centre crop fraction of the deterministic scoring view", range="(0, 1]")
    temperature: float = opt(1.0, help="softmax temperature", range="(0, 100]")
    scorer_outputs: str = opt("logits", help="what the scorer returns: logits (softmax(logits / T) is stored), probs (already probabilities: softmax(log p / T), no second softmax) or log-probs; a scorer returning probabilities is refused unless this says so", choices=TEACHER_OUTPUTS)
    batch_size: int = opt(64, help="scorer batch size", range="[1, 65536]")
    device: str = opt("auto", help="cpu, cuda, or auto")
    workers: int = opt(0, help="Ray workers (0: one per GPU, or one on CPU)", range="[0, 4096]")
    threads: int = opt(0, help="torch threads per CPU worker (0: cores / workers)", range="[0, 4096]")
    ray_address: str | None = opt(None, help="join this Ray cluster (default: $RAY_ADDRESS, else embedded)", metavar="ADDR")
    overwrite: bool = opt(False, help="replace an existing filter directory")
    retries: int = opt(2, help="times a shard is retried after its worker dies", range="[0, 100]")
    quiet: bool = opt(False, help="no progress bar")

    def __post_init__(self) -> None:
        check(self)



@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    shards: str = opt(help="training shards (directory or brace pattern)", metavar="SHARDS")
    out: str = opt(help="run directory (checkpoints, metrics.jsonl, summary.json)", metavar="RUN_DIR")
    cache: str | None = opt(None, help="teacher cache directory (omit with --hard-labels)", metavar="CACHE_DIR")
    model: str = opt("tinyvit-5m", help="student model (`distill models` lists them): tinyvit-*, efficientformer-l1/l3/l7, vit-*, dat-tiny/small/base")
    epochs: int = opt(1, help="training epochs (epoch e uses cached epoch e mod E)", range="[1, 1000000]")
    allow_long_run: bool = opt(False, help="run more than 1,000 epochs or 2e9 views (epochs x samples), the budget a run takes without asking")
    val_shards: str | None = opt(None, help="validation shards, evaluated every epoch", metavar="VAL")
    image_size: int = opt(224, help="student input size (divisible by 32)", range="[32, 2048]")
    batch_size: int = opt(128, help="batch size per process", range="[1, 65536]")
    recipe: str | None = opt(None, help="training recipe: tinyvit-22k-distill, tinyvit-1k, tinyvit-22kto1k or none (default: tinyvit-22k-distill from a cache, tinyvit-1k with --hard-labels); every option below marked 'recipe' takes the recipe's value unless given", metavar="NAME")
    lr: float | None = opt(None, help="base learning rate (AdamW), per --lr-base-batch images of global batch (recipe)", range="(0, 10]")
    min_lr: float | None = opt(None, help="final learning rate of the cosine schedule, scaled like --lr (recipe)", range="[0, 10]")
    warmup_lr: float | None = opt(None, help="learning rate the linear warmup starts from, scaled like --lr (recipe)", range="[0, 10]")
    warmup_epochs: float | None = opt(None, help="linear warmup length in epochs (recipe)", range="[0, 1000000]")
    lr_base_batch: int | None = opt(None, help="--lr, --min-lr and --warmup-lr are per this many images of global batch (batch-size x processes x accumulation-steps) and scaled linearly; 0: used as given (recipe: 512, none: 0)", range="[0, 100000000]")
    weight_decay: float | None = opt(None, help="AdamW weight decay, not on norms, biases, attention biases (recipe)", range="[0, 10]")
    clip_grad: float | None = opt(None, help="gradient norm clip, 0: off (recipe)", range="[0, 1000000]")
    accumulation_steps: int | None = opt(None, help="batches whose gradients are summed per optimiser step (recipe: 1)", range="[1, 65536]")
    layer_lr_decay: float | None = opt(None, help="layer-wise lr decay: block i of D gets lr x decay^(D-1-i), the head 1 (recipe)", range="(0, 1]")
    eval_bn: bool | None = opt(None, help="true: keep BatchNorm statistics frozen (eval mode) while training (recipe)", metavar="true|false")
    broadcast_buffers: bool | None = opt(None, help="true: DDP broadcasts buffers (BatchNorm statistics) from rank 0 every step (recipe)", metavar="true|false")
    alpha: float = opt(0.0, help="weight of the hard-label loss mixed with the soft-target loss", range="[0, 1]")
    dist_head_target: str = opt("soft", help="students with a distillation head (efficientformer-*): it learns from the cached top-K (soft) or the teacher's top-1 (hard); the class head learns from the labels", choices=("soft", "hard"))
    target_fill: str = opt("uniform", help="dense target from top-K: uniform (rest spread over other classes) or renorm", choices=("uniform", "renorm"))
    label_smoothing: float | None = opt(None, help="label smoothing of the hard-label loss (recipe)", range="[0, 1)")
    hard_labels: bool = opt(False, help="train from the shards' labels, no cache (the baseline)")
    compare_hard_labels: bool = opt(False, help="also train the same student from hard labels and report both")
    policy: str | None = opt(None, help="TOML [policy] for --hard-labels runs (cache runs replay the cache's policy)", metavar="FILE")
    exclude: str | None = opt(None, help="filter-labels output: its dropped samples are left out", metavar="FILTER_DIR")
    init: str | None = opt(None, help="initial weights (a timm TinyViT checkpoint or ours)", metavar="PATH")
    drop_path: float | None = opt(None, help="stochastic depth rate (recipe, per model size; else the model's default)", range="[0, 1)")
    resume: bool = opt(False, help="continue from RUN_DIR/last.pt")
    seed: int = opt(0, help="training seed (shuffling, init)", range="[0, 9223372036854775807]")
    shuffle_buffer: int = opt(1000, help="sample shuffle buffer", range="[0, 100000000]")
    loader_workers: int = opt(-1, help="DataLoader worker processes per training process; -1: its share of the CPU cores less one (persistent across epochs)", range="[-1, 4096]")
    checkpoint_every: int = opt(1000, help="also write RUN_DIR/last.pt every N optimiser steps inside an epoch (0: at epoch ends only); --resume goes on from there", range="[0, 1000000000]", metavar="N")
    device_views: bool | None = opt(None, help="true: loader workers ship uint8 views, normalised, erased and mixed on the training device (default: true on CUDA, false on CPU)", metavar="true|false")
    device: str = opt("auto", help="cpu, cuda, or auto")
    compile: bool = opt(False, help="torch.compile the model")
    threads: int = opt(0, help="torch intra-op threads (0: default)", range="[0, 4096]")
    allow_replay_drift: bool = opt(False, help="train although recorded views replay differently here (other Pillow/libjpeg-turbo); noted in the summary")
    allow_resplit: bool = opt(False, help="--resume although the world size or --loader-workers changed (the data split and the lr schedule are recomputed; noted in the summary)")
    quiet: bool = opt(False, help="no progress bar")

    def __post_init__(self) -> None:
        check(self)



@dataclass(frozen=True, kw_only=True)
class AdaptConfig:
    base: str = opt(help="base ViT: a preset (vit-mini, vit-ti16, vit-s16, vit-b16, vit-s16-18x2, vit-b16-22b, vit-b16-clip, vit-l14-clip) or module.path:callable returning a ViT-like nn.Module", metavar="SPEC")
    base_checkpoint: str | None = opt(None, help="timm-format ViT state dict (.safetensors or .pth) loaded into the base (its head is dropped, pos_embed resampled to --image-size)", metavar="PATH")
    shards: str = opt(help="training shards (directory or brace pattern); their index.json names the classes", metavar="SHARDS")
    val_shards: str = opt(help="validation shards: same classes as the training shards", metavar="VAL")
    method: str = opt("repadapter", help="attn-only (attention weights, head, pos_embed), repadapter (adapters before the attention and MLP input linears, merged after training), linear (head only) or full")
    out: str = opt(help="output directory: teacher.pt2 + teacher.json (pass it as --teacher / --scorer), checkpoints, metrics.jsonl", metavar="OUT")
    epochs: int = opt(10, help="training epochs", range="[1, 1000000]")
    allow_long_run: bool = opt(False, help="run more than 1,000 epochs or 2e9 views (epochs x samples), the budget a run takes without asking")
    batch_size: int = opt(64, help="batch size", range="[1, 65536]")
    lr: float | None = opt(None, help="peak learning rate (AdamW; linear warmup, cosine decay); default per method: linear 1e-2, repadapter 1e-3, attn-only 3e-4, full 2e-4", range="(0, 10]")
    weight_decay: float | None = opt(None, help="AdamW weight decay (not on norms, biases, pos_embed); default per method: repadapter and linear 1e-4, attn-only and full 0.05", range="[0, 10]")
    warmup_epochs: float = opt(1.0, help="linear warmup length in epochs", range="[0, 1000000]")
    label_smoothing: float = opt(0.1, help="label smoothing of the cross-entropy", range="[0, 1)")
    image_size: int = opt(224, help="input size the teacher is trained and exported at (a multiple of the base's patch)", range="[8, 2048]")
    adapter_dim: int = opt(8, help="RepAdapter hidden dimension r", range="[1, 65536]")
    adapter_groups: int = opt(2, help="RepAdapter groups of its B projection", range="[1, 65536]")
    adapter_scale: float = opt(1.0, help="RepAdapter scale s (x + s * B A x)", range="[0, 1000]")
    adapter_dropout: float = opt(0.1, help="RepAdapter dropout between A and B (training only)", range="[0, 1)")
    exclude: str | None = opt(None, help="filter-labels output directory: its dropped samples are left out", metavar="FILTER_DIR")
    policy: str | None = opt(None, help="TOML file with a [policy] table (default: the pipeline's [policy], else timm-like defaults)", metavar="FILE")
    seed: int = opt(0, help="seed (views, shuffling, head and adapter init)", range="[0, 9223372036854775807]")
    loader_workers: int = opt(-1, help="DataLoader worker processes; -1: the CPU cores less one", range="[-1, 4096]")
    threads: int = opt(0, help="torch intra-op threads (0: default)", range="[0, 4096]")
    device: str = opt("auto", help="cpu, cuda, cuda:N or auto")
    resume: bool = opt(False, help="continue from OUT/last.pt")
    quiet: bool = opt(False, help="no progress bar")

    def __post_init__(self) -> None:
        check(self)


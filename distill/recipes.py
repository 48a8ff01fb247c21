"""Named training recipes: TinyViT's published settings, resolved into a stage config.

A recipe fills every option the user did not set (flag, pipeline key or policy key); what the user
set wins. Values are the reference implementation's (microsoft/Cream, ``TinyViT/``): ``config.py``
gives the defaults, each ``configs/<recipe>/tiny_vit_*.yaml`` what it changes. Epochs and batch size
are the user's (they follow the data and the GPU), everything else is the recipe's:

* ``lr``, ``min-lr`` and ``warmup-lr`` are TinyViT's ``BASE_LR``, ``MIN_LR`` and ``WARMUP_LR``, given
  per ``lr-base-batch`` (512) images of global batch and scaled linearly by ``batch-size x processes x
  accumulation-steps / 512``, as ``main.py`` does (``linear_scaled_lr``). The ``none`` recipe keeps
  distill's own defaults and uses the lr as given (``lr-base-batch = 0``).
* The schedule is timm's ``CosineLRScheduler`` as TinyViT builds it: linear warmup from the warmup lr
  over ``warmup-epochs``, then cosine to the min lr, per optimiser step.
* Drop path is per model size (``MODEL.DROP_PATH_RATE`` of each yaml).

``cache-teacher --recipe`` takes the recipe's augmentation policy (``AUG`` keys of the same files):
the views TinyViT's ``save_logits.py`` cuts for the teacher. The student replays the cache's views,
so for train-student the policy part matters only in cache-less (``--hard-labels``) runs.

No torch, no Ray.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .files import UserError

DEFAULT_CACHE_RECIPE = "tinyvit-22k-distill"   # train-student from a cache
DEFAULT_HARD_RECIPE = "tinyvit-1k"             # train-student --hard-labels (TinyViT's from-scratch recipe)

# TinyViT config.py ``_C.AUG`` (shared by every recipe unless a yaml changes it). timm 0.4.12's
# create_transform applies colour jitter only when RandAugment is off, and so does distill's policy:
# COLOR_JITTER 0.4 is set (as the reference sets it) and has no effect beside AUTO_AUGMENT.
_AUG = {
    "auto_augment": "rand-m9-mstd0.5-inc1",   # AUG.AUTO_AUGMENT
    "color_jitter": 0.4,                      # AUG.COLOR_JITTER
    "re_prob": 0.25,                          # AUG.REPROB
    "re_mode": "pixel",                       # AUG.REMODE
    "re_count": 1,                            # AUG.RECOUNT
    "mixup_alpha": 0.8,                       # AUG.MIXUP
    "cutmix_alpha": 1.0,                      # AUG.CUTMIX
    "mix_prob": 1.0,                          # AUG.MIXUP_PROB
    "switch_prob": 0.5,                       # AUG.MIXUP_SWITCH_PROB
    "interpolation": "bicubic",               # DATA.INTERPOLATION
    "hflip": 0.5,                             # timm create_transform default (hflip=0.5)
    "scale": (0.08, 1.0),                     # timm create_transform default (RandomResizedCrop scale)
    "ratio": (3 / 4, 4 / 3),                  # timm create_transform default
}

# TinyViT config.py ``_C.TRAIN`` and ``_C.MODEL``
_TRAIN = {
    "lr": 5e-4,                  # TRAIN.BASE_LR
    "min_lr": 5e-6,              # TRAIN.MIN_LR
    "warmup_lr": 5e-7,           # TRAIN.WARMUP_LR
    "warmup_epochs": 20.0,       # TRAIN.WARMUP_EPOCHS
    "weight_decay": 0.05,        # TRAIN.WEIGHT_DECAY
    "clip_grad": 5.0,            # TRAIN.CLIP_GRAD
    "accumulation_steps": 1,     # TRAIN.ACCUMULATION_STEPS
    "layer_lr_decay": 1.0,       # TRAIN.LAYER_LR_DECAY
    "eval_bn": False,            # TRAIN.EVAL_BN_WHEN_TRAINING
    "label_smoothing": 0.1,      # MODEL.LABEL_SMOOTHING
    "broadcast_buffers": False,  # main.py: DistributedDataParallel(..., broadcast_buffers=False)
    "lr_base_batch": 512,        # main.py: linear_scaled_lr = BASE_LR * BATCH_SIZE * world_size / 512
}


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str                                  # where the values come from
    train: dict                                  # TrainConfig field -> value
    drop_path: dict = field(default_factory=dict)   # model -> drop path rate (others: the model's default)
    policy: dict = field(default_factory=dict)   # augmentation policy keys (cache-teacher, cache-less runs)
    fine_tune: bool = False                      # starts from pretrained weights (--init)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("tinyvit-22k-distill", "TinyViT configs/22k_distill/tiny_vit_{5m,11m,21m}_22k_distill.yaml",
           # TRAIN.BASE_LR 2.5e-4, WARMUP_EPOCHS 5, WEIGHT_DECAY 0.01; AUG.MIXUP 0.0, AUG.CUTMIX 0.0
           dict(_TRAIN, lr=2.5e-4, warmup_epochs=5.0, weight_decay=0.01),
           {"tinyvit-5m": 0.0, "tinyvit-11m": 0.0, "tinyvit-21m": 0.1},     # MODEL.DROP_PATH_RATE
           dict(_AUG, mixup_alpha=0.0, cutmix_alpha=0.0)),
    Recipe("tinyvit-1k", "TinyViT configs/1k/tiny_vit_{5m,11m,21m}.yaml (training from scratch on ImageNet-1k)",
           dict(_TRAIN),                                                      # config.py defaults throughout
           {"tinyvit-5m": 0.0, "tinyvit-11m": 0.1, "tinyvit-21m": 0.2},     # MODEL.DROP_PATH_RATE
           dict(_AUG)),
    Recipe("tinyvit-22kto1k", "TinyViT configs/22kto1k/tiny_vit_{5m,11m,21m}_22kto1k.yaml (fine-tuning a pretrained student)",
           # TRAIN.BASE_LR 2.5e-4, WARMUP_EPOCHS 5, WEIGHT_DECAY 1e-8, MIN_LR 1e-5, LAYER_LR_DECAY 0.8,
           # EVAL_BN_WHEN_TRAINING True; AUG.MIXUP 0.0, AUG.CUTMIX 0.0
           dict(_TRAIN, lr=2.5e-4, warmup_epochs=5.0, weight_decay=1e-8, min_lr=1e-5, layer_lr_decay=0.8,
                eval_bn=True),
           {"tinyvit-5m": 0.0, "tinyvit-11m": 0.0, "tinyvit-21m": 0.1},     # MODEL.DROP_PATH_RATE
           dict(_AUG, mixup_alpha=0.0, cutmix_alpha=0.0), fine_tune=True),
    Recipe("none", "distill's own defaults: no scaling, no warmup, no recipe policy",
           {"lr": 1e-3, "min_lr": 1e-5, "warmup_lr": 0.0, "warmup_epochs": 0.0, "weight_decay": 0.05,
            "clip_grad": 5.0, "accumulation_steps": 1, "layer_lr_decay": 1.0, "eval_bn": False,
            "label_smoothing": 0.1, "broadcast_buffers": True, "lr_base_batch": 0}),
)}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_name(cfg) -> str:
    """The recipe a TrainConfig runs: its ``recipe``, else the default for its source."""
    if cfg.recipe:
        return cfg.recipe
    return DEFAULT_HARD_RECIPE if cfg.hard_labels and not cfg.cache else DEFAULT_CACHE_RECIPE


def resolve_train(cfg):
    """``cfg`` with ``recipe`` named and every recipe option it leaves unset (None) filled in.
    Returns (config, the options the user set to other values than the recipe's)."""
    r = get(recipe_name(cfg))
    wanted = dict(r.train)
    if cfg.model in r.drop_path:
        wanted["drop_path"] = r.drop_path[cfg.model]
    fill = {name: value for name, value in wanted.items() if getattr(cfg, name) is None}
    overridden = [name for name, value in wanted.items() if getattr(cfg, name) not in (None, value)]
    return dataclasses.replace(cfg, recipe=r.name, **fill), overridden


def policy_table(recipe: str | None, table: dict | None) -> dict | None:
    """The policy keys a run uses: the recipe's, overridden key by key by the user's table."""
    if not recipe:
        return table
    base = dict(get(recipe).policy)
    base.update(table or {})
    return base


def policy_differences(recipe: str, policy) -> list[str]:
    """The recipe's policy keys on which ``policy`` (an ``augment.Policy``, e.g. a cache's) differs."""
    from .data.augment import Policy
    keys = set(get(recipe).policy)
    want = Policy.from_dict(dict(get(recipe).policy, size=policy.size)).canonical()
    have = policy.canonical()
    if want["auto_augment"] and have["auto_augment"]:
        keys.discard("color_jitter")            # no effect beside RandAugment (timm, and here)
    if not (want["mixup_alpha"] or want["cutmix_alpha"] or have["mixup_alpha"] or have["cutmix_alpha"]):
        keys -= {"mix_prob", "switch_prob"}     # no mixing on either side
    return sorted(k for k in keys if want.get(k) != have.get(k))


@dataclass(frozen=True)
class LrPlan:
    """The learning rates a run actually uses, after scaling by its global batch."""
    scale: float                 # global batch / lr_base_batch (1: as given)
    global_batch: int            # batch-size x processes x accumulation-steps
    peak: float
    min_lr: float
    warmup_lr: float

    def to_dict(self) -> dict:
        return {"global-batch": self.global_batch, "lr-scale": self.scale, "peak-lr": self.peak,
                "min-lr": self.min_lr, "warmup-lr": self.warmup_lr}


def lr_plan(cfg, world: int) -> LrPlan:
    """Scale lr, min lr and warmup lr by the global batch over ``lr_base_batch`` (TinyViT's main.py)."""
    global_batch = cfg.batch_size * world * cfg.accumulation_steps
    scale = global_batch / cfg.lr_base_batch if cfg.lr_base_batch else 1.0
    return LrPlan(scale, global_batch, cfg.lr * scale, cfg.min_lr * scale, cfg.warmup_lr * scale)


def describe(cfg, world: int, overridden: list[str]) -> str:
    """One line: the recipe and the values it resolved to (printed at the start of train-student)."""
    p = lr_plan(cfg, world)
    lr = (f"lr {cfg.lr:.3g} x {p.global_batch:,}/{cfg.lr_base_batch} = {p.peak:.3g}" if cfg.lr_base_batch
          else f"lr {p.peak:.3g}")
    bits = [lr, f"warmup {cfg.warmup_epochs:g} epoch(s) from {p.warmup_lr:.3g}", f"min lr {p.min_lr:.3g}",
            f"weight decay {cfg.weight_decay:g}", f"drop path {'model default' if cfg.drop_path is None else f'{cfg.drop_path:g}'}",
            f"clip {cfg.clip_grad:g}", f"label smoothing {cfg.label_smoothing:g}",
            f"accumulation {cfg.accumulation_steps}", f"layer lr decay {cfg.layer_lr_decay:g}",
            f"BN {'frozen (eval)' if cfg.eval_bn else 'training'}", f"broadcast_buffers {cfg.broadcast_buffers}"]
    over = f"; set by you: {', '.join('--' + n.replace('_', '-') for n in overridden)}" if overridden else ""
    return f"recipe {cfg.recipe}: " + ", ".join(bits) + over

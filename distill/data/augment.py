"""Augmentation as data: a policy, a 32-bit seed per (sample, epoch), and a replayable view.

The teacher runs once; the student replays its views later. Both sides call the same two steps:

1. ``decode(policy, seed, width, height) -> params``: pure Python, microseconds, no image needed.
   ``params`` is plain JSON-able data that a person can read::

       {"v": POLICY_VERSION,
        "crop": [x0, y0, x1, y1],          # ints, full-resolution pixels, inside the image, non-empty
        "interp": "bicubic",               # resampling of the crop -> output resize
        "flip": False,                     # horizontal flip after the crop
        "ops": [{"op": "Rotate", "magnitude": -12.5}, ...],   # RandAugment ops that fire, in order,
                                           # final signed arguments in each op's own units
        "jitter": None | {"order": [...], "brightness": f, "contrast": f, "saturation": f, "hue": h},
        "erase": [[x0, y0, x1, y1], ...],  # RandomErasing boxes, fractions of the output side
        "erase_mode": "pixel",             # const | rand | pixel (timm meaning)
        "erase_seed": 123}                 # seeds the torch.Generator for the erase noise

2. ``view(SourceImage(bytes), params, size, mean, std) -> tensor``: crop + resize to size x size,
   flip, ops, jitter, to float, normalise, erase. Geometry is resolution-free (relative translate,
   rotate/shear in degrees/ratios, erase boxes as fractions), so a 224-pixel teacher view and a
   32-pixel student view of one seed show the same content.

Randomness comes from a small splitmix64 generator written here (never ``random``/numpy
distributions, whose streams may change between versions). Each component (crop, flip, RandAugment,
jitter, erase, mix pair) draws from its own stream, keyed by (seed, component), in a fixed order, so
one component's settings never shift another component's draws. Floats in params are rounded to 6
decimals so that last-bit differences between C maths libraries do not leak into the cache.

``POLICY_VERSION`` must be bumped whenever ``decode`` (or ``mix_plan``) output changes for a fixed
(policy, seed, width, height); tests pin golden vectors so an accidental change fails CI.

Draft rule (JPEG DCT-domain downscaling): a view of ``size`` pixels is cut from the JPEG decoded at
1/f scale, f the largest of 8, 4, 2 such that the crop box divided by f still has at least ``size``
pixels on both sides, else f = 1 (``draft_factor``). The rule depends only on (params, size), so
the teacher and any replay at the same size decode identical pixels. Non-JPEG sources ignore f.

Mixing (Mixup/CutMix) pairs samples inside a shard: ``mix_plan(policy, seeds)`` over the seeds of one
shard's samples for one epoch, in shard order; see its docstring.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import operator
import re
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ..config import MAX_IMAGE_SIZE
from ..files import UserError

POLICY_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FILL = (124, 116, 104)  # fill colour of rotate/shear/translate: ImageNet mean in 0..255, as timm


class PolicyError(UserError, ValueError):
    """An invalid augmentation policy (one clear sentence)."""


# ----------------------------------------------------------------------------- random numbers

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class _Rng:
    """splitmix64: tiny, fast in pure Python, and its stream is fixed by this code alone."""

    __slots__ = ("s",)

    def __init__(self, *keys: int):
        s = 0x5EED
        for k in keys:
            s = _mix64(((s ^ (k & _MASK)) + _GAMMA) & _MASK)
        self.s = s

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        self.s = s = (self.s + _GAMMA) & _MASK
        return lo + (hi - lo) * ((_mix64(s) >> 11) * 1.1102230246251565e-16)  # 53 bits / 2**53

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi], both inclusive."""
        return lo + min(int(self.uniform() * (hi - lo + 1)), hi - lo)

    def normal(self, mu: float = 0.0, sigma: float = 1.0) -> float:
        u1, u2 = 1.0 - self.uniform(), self.uniform()  # Box-Muller, u1 in (0, 1]
        return mu + sigma * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)

    def gamma(self, a: float) -> float:
        if a < 1.0:  # boost: G(a) = G(a + 1) * U**(1/a)
            return self.gamma(a + 1.0) * (1.0 - self.uniform()) ** (1.0 / a)
        d = a - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        while True:  # Marsaglia-Tsang
            x = self.normal()
            v = (1.0 + c * x) ** 3
            if v <= 0.0:
                continue
            u = 1.0 - self.uniform()
            if u < 1.0 - 0.0331 * x ** 4 or math.log(u) < 0.5 * x * x + d * (1.0 - v + math.log(v)):
                return d * v

    def beta(self, a: float) -> float:
        """Beta(a, a), the Mixup/CutMix lambda distribution."""
        x, y = self.gamma(a), self.gamma(a)
        return 0.5 if x + y == 0.0 else x / (x + y)


# stream keys: one per component, so components never shift each other's draws
_CROP, _FLIP, _RAND, _JITTER, _ERASE, _PAIR = 1, 2, 3, 4, 5, 6


def _r(x: float) -> float:
    return round(float(x), 6)


def load_policy(path: str | None = None, table: dict | None = None, default: dict | None = None,
                base: dict | None = None) -> "Policy":
    """The policy of a ``--policy FILE`` (its [policy] table), else ``table`` (a pipeline's [policy]),
    else ``default`` (else timm-like defaults), each key over ``base`` (a recipe's policy). Errors are
    one-line UserErrors."""
    if path:
        from ..config import load_toml
        raw = load_toml(path)
        table = raw.get("policy", raw)
    try:
        return Policy.from_dict(dict(base or {}, **(table or default or {})))
    except (ValueError, TypeError) as e:
        raise UserError(f"bad augmentation policy: {e}") from None


def derive_seed(cache_seed: int, epoch: int, key: str) -> int:
    """The uint32 augmentation seed of (sample key, epoch) in a cache: blake2b, stable everywhere."""
    if not isinstance(key, str) or isinstance(cache_seed, bool) or isinstance(epoch, bool):
        raise TypeError("derive_seed(cache_seed: int, epoch: int, key: str)")
    msg = b"distill-seed\0%d\0%d\0" % (int(cache_seed), int(epoch)) + key.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(msg, digest_size=4).digest(), "little")


# ----------------------------------------------------------------------------- RandAugment spec

_RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
             "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
             "TranslateYRel")
_RAND_INC_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                 "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                 "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                 "TranslateYRel")
# timm's scale: magnitudes m and mmax 0..10, n of the 15 ops per image; mstd >= 0 (> 100: uniform in [0, m])
_RAND_MAX = {"n": len(_RAND_OPS), "m": 10.0, "mmax": 10.0, "inc": 1}
_RAND_RANGES = "n 0-15, m 0-10, mmax 0-10, mstd >= 0, inc 0 or 1"
_RAND_TOKEN = re.compile(r"^(mstd|mmax|inc|m|n|w)(.*)$")


@dataclass(frozen=True)
class _RandSpec:
    n: int = 2
    m: float = 10.0
    mstd: float = 0.0
    mmax: float = 10.0
    inc: bool = False

    def __str__(self) -> str:
        return f"rand-m{self.m:g}-n{self.n}-mstd{self.mstd:g}-mmax{self.mmax:g}-inc{int(self.inc)}"


@lru_cache(maxsize=64)
def _parse_rand(spec: str) -> _RandSpec:
    """Parse a timm RandAugment string (``rand-m9-mstd0.5-inc1``); defaults as timm (n2, m10)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise PolicyError(f"policy: auto_augment {spec!r} is not a RandAugment string (it must start with 'rand').")
    kw: dict[str, Any] = {}
    for tok in parts[1:]:
        match = _RAND_TOKEN.match(tok)
        try:
            key, val = match.groups() if match else (tok, "")
            num = float(val)
        except ValueError:
            raise PolicyError(f"policy: auto_augment {spec!r} has an unknown token {tok!r} "
                              "(known: n<int>, m<num>, mstd<num>, mmax<num>, inc<0|1>).") from None
        if key == "w":
            raise PolicyError(f"policy: auto_augment {spec!r}: weighted op choice ('w') is not supported.")
        if key == "mstd" and num > 100:
            num = math.inf  # timm: mstd > 100 means uniform magnitude in [0, m]
        elif not (0 <= num <= _RAND_MAX.get(key, math.inf) and num < math.inf) or (key in ("n", "inc") and num != int(num)):
            raise PolicyError(f"policy: auto_augment {spec!r}: token {tok!r} is out of range ({_RAND_RANGES}).")
        if key in kw:
            raise PolicyError(f"policy: auto_augment {spec!r} sets {key!r} twice.")
        kw[key] = int(num) if key == "n" else bool(num) if key == "inc" else num
    return _RandSpec(**kw)


def _signed(level: float, u: float) -> float:
    return -level if u > 0.5 else level


def _level(name: str, m: float, u: float) -> tuple[str, float | int | None]:
    """timm's magnitude -> argument mappings (m on the 0..10 scale); returns (base op, argument)."""
    f = m / 10.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return name, None
    if name == "Rotate":
        return name, _r(_signed(30.0 * f, u))
    if name in ("ShearX", "ShearY"):
        return name, _r(_signed(0.3 * f, u))
    if name in ("TranslateXRel", "TranslateYRel"):
        return name, _r(_signed(0.45 * f, u))
    if name == "Posterize":
        return name, min(8, max(0, int(4 * f)))
    if name == "PosterizeIncreasing":
        return "Posterize", min(8, max(0, 4 - int(4 * f)))
    if name == "Solarize":
        return name, int(256 * f)
    if name == "SolarizeIncreasing":
        return "Solarize", 256 - int(256 * f)
    if name == "SolarizeAdd":
        return name, int(110 * f)
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/Sharpness, 1.0 = unchanged
        return name[: -len("Increasing")], _r(max(0.1, 1.0 + _signed(0.9 * f, u)))
    return name, _r(1.8 * f + 0.1)  # Color/Contrast/Brightness/Sharpness, timm's plain range


# ----------------------------------------------------------------------------- the policy

_INTERP = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
_ERASE_MODES = ("const", "rand", "pixel")


def _jitter4(cj: float | tuple) -> tuple[float, float, float, float]:
    """timm's colour-jitter meaning: a float x -> (x, x, x, hue 0); 3 or 4 values as given."""
    if isinstance(cj, (int, float)):
        return (float(cj),) * 3 + (0.0,)
    return tuple(float(x) for x in cj) + (0.0,) * (4 - len(cj))  # type: ignore[return-value]


@dataclass(frozen=True)
class Policy:
    """A training augmentation policy, timm's ``create_transform(is_training=True)`` vocabulary."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float | tuple = 0.0
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    mix_block: int = 64

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise PolicyError(f"policy: {msg}")

        def isnum(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name, lo, hi in (("size", 1, MAX_IMAGE_SIZE), ("re_count", 1, 100), ("mix_block", 2, MAX_IMAGE_SIZE)):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
                  f"{name} must be an integer in [{lo}, {hi}], got {v!r}.")
        for name in ("scale", "ratio"):
            v = getattr(self, name)
            check(isinstance(v, (list, tuple)) and len(v) == 2 and all(map(isnum, v)),
                  f"{name} must be two numbers [min, max], got {v!r}.")
            object.__setattr__(self, name, (float(v[0]), float(v[1])))
        check(0 < self.scale[0] <= self.scale[1] <= 1, f"scale must satisfy 0 < min <= max <= 1, got {self.scale!r}.")
        check(0 < self.ratio[0] <= self.ratio[1] < math.inf, f"ratio must satisfy 0 < min <= max, got {self.ratio!r}.")
        check(self.interpolation in _INTERP, f"interpolation must be one of {', '.join(_INTERP)}, got {self.interpolation!r}.")
        for name, hi in (("hflip", 1), ("re_prob", 1), ("mix_prob", 1), ("switch_prob", 1),
                         ("mixup_alpha", 100), ("cutmix_alpha", 100)):
            v = getattr(self, name)
            check(isnum(v) and 0 <= v <= hi, f"{name} must be a number in [0, {hi}], got {v!r}.")
            object.__setattr__(self, name, float(v))
        check(self.re_mode in _ERASE_MODES, f"re_mode must be one of const, rand, pixel, got {self.re_mode!r}.")
        aa = self.auto_augment or None
        check(aa is None or isinstance(aa, str), f"auto_augment must be a string like 'rand-m9-mstd0.5-inc1', got {aa!r}.")
        if aa is not None:
            _parse_rand(aa)  # raises PolicyError on a bad string
        object.__setattr__(self, "auto_augment", aa)
        cj = tuple(self.color_jitter) if isinstance(self.color_jitter, (list, tuple)) else self.color_jitter
        check((isnum(cj) or (isinstance(cj, tuple) and len(cj) in (3, 4) and all(map(isnum, cj))))
              and 0 <= min(_jitter4(cj)) and max(_jitter4(cj)) <= 10 and _jitter4(cj)[3] <= 0.5,
              f"color_jitter must be a number in [0, 10] or 3-4 of them (brightness, contrast, saturation[, hue <= 0.5]), got {cj!r}.")
        object.__setattr__(self, "color_jitter", tuple(map(float, cj)) if isinstance(cj, tuple) else float(cj))

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def canonical(self) -> dict:
        """JSON-able and normalised: equivalent spellings of one policy give one dict (and one id)."""
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        d["color_jitter"] = list(_jitter4(self.color_jitter))
        d["auto_augment"] = str(_parse_rand(self.auto_augment)) if self.auto_augment else None
        d["version"] = POLICY_VERSION
        return dict(sorted(d.items()))

    @property
    def id(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        """From a TOML ``[policy]`` table or a manifest's canonical form; unknown keys are refused."""
        d = dict(d)
        version = d.pop("version", POLICY_VERSION)
        if version != POLICY_VERSION:
            raise PolicyError(f"policy: version {version!r} does not match this code's policy version {POLICY_VERSION}.")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise PolicyError(f"policy: unknown key(s) {', '.join(unknown)}.")
        return cls(**d)


# ----------------------------------------------------------------------------- decode: seed -> params

def _rrc(rng: _Rng, w: int, h: int, scale: tuple, ratio: tuple) -> list[int]:
    """torchvision's RandomResizedCrop.get_params with our generator; returns [x0, y0, x1, y1]."""
    area = w * h
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(lr0, lr1))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            y0 = rng.randint(0, h - ch)
            x0 = rng.randint(0, w - cw)
            return [x0, y0, x0 + cw, y0 + ch]
    in_ratio = w / h  # fallback: central crop with the ratio clamped into range
    if in_ratio < ratio[0]:
        cw, ch = w, min(h, max(1, int(round(w / ratio[0]))))
    elif in_ratio > ratio[1]:
        cw, ch = min(w, max(1, int(round(h * ratio[1])))), h
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return [x0, y0, x0 + cw, y0 + ch]


def _rand_ops(seed: int, spec: _RandSpec) -> list[dict]:
    """timm RandAugment: n ops chosen with replacement, each fires with p=0.5, noisy magnitude."""
    rng = _Rng(seed, _RAND)
    names = _RAND_INC_OPS if spec.inc else _RAND_OPS
    out = []
    for _ in range(spec.n):  # four draws per layer, always
        name = names[rng.randint(0, len(names) - 1)]
        fire = rng.uniform() <= 0.5
        m = rng.uniform(0.0, spec.m) if spec.mstd == math.inf else rng.normal(spec.m, spec.mstd)
        sign = rng.uniform()
        if fire:
            op, arg = _level(name, max(0.0, min(m, spec.mmax)), sign)
            out.append({"op": op, "magnitude": arg})
    return out


def _jitter(seed: int, cj: tuple) -> dict | None:
    """torchvision ColorJitter: factors in [max(0, 1-x), 1+x], hue in [-h, h], random order."""
    rng = _Rng(seed, _JITTER)
    order = ["brightness", "contrast", "saturation", "hue"]
    for i in range(3, 0, -1):  # Fisher-Yates
        j = rng.randint(0, i)
        order[i], order[j] = order[j], order[i]
    vals = {}
    for k, x in zip(("brightness", "contrast", "saturation"), cj[:3]):
        u = rng.uniform(max(0.0, 1.0 - x), 1.0 + x)
        if x > 0:
            vals[k] = _r(u)
    u = rng.uniform(-cj[3], cj[3])
    if cj[3] > 0:
        vals["hue"] = _r(u)
    return {"order": [k for k in order if k in vals], **vals} if vals else None


def _erase(rng: _Rng, count_max: int) -> list[list[float]]:
    """timm RandomErasing (area 2%..1/3, log-aspect 0.3..3.3, 10 tries) in output fractions."""
    count = rng.randint(1, count_max)
    boxes = []
    la0, la1 = math.log(0.3), math.log(1 / 0.3)
    for _ in range(count):
        for _ in range(10):
            target = rng.uniform(0.02, 1 / 3) / count
            ar = math.exp(rng.uniform(la0, la1))
            eh, ew = math.sqrt(target * ar), math.sqrt(target / ar)
            if ew < 1 and eh < 1:
                y0, x0 = rng.uniform(0, 1 - eh), rng.uniform(0, 1 - ew)
                boxes.append([_r(x0), _r(y0), _r(x0 + ew), _r(y0 + eh)])
                break
    return boxes


def decode(policy: Policy, seed: int, width: int, height: int) -> dict:
    """The augmentation parameters of one (sample, epoch): a pure function of its arguments."""
    width, height, seed = operator.index(width), operator.index(height), operator.index(seed)
    if width < 1 or height < 1 or not 0 <= seed < 2 ** 32:
        raise ValueError(f"decode needs a uint32 seed and a positive size, got seed {seed}, {width}x{height}")
    flip = _Rng(seed, _FLIP).uniform() < policy.hflip
    ops: list[dict] = []
    jitter = None
    if policy.auto_augment:
        ops = _rand_ops(seed, _parse_rand(policy.auto_augment))
    elif policy.color_jitter:  # timm: colour jitter only when RandAugment is off
        jitter = _jitter(seed, _jitter4(policy.color_jitter))
    rng = _Rng(seed, _ERASE)
    erase_seed = int(rng.uniform() * 2 ** 32)
    erase = _erase(rng, policy.re_count) if rng.uniform() < policy.re_prob else []
    return {"v": POLICY_VERSION,
            "crop": _rrc(_Rng(seed, _CROP), width, height, policy.scale, policy.ratio),
            "interp": policy.interpolation, "flip": flip, "ops": ops, "jitter": jitter,
            "erase": erase, "erase_mode": policy.re_mode, "erase_seed": erase_seed}


def decode_center(width: int, height: int, crop_pct: float = 0.875, interpolation: str = "bicubic") -> dict:
    """timm's eval view (resize the shorter side to size/crop_pct, centre crop) as a crop box."""
    if not (width > 0 and height > 0 and 0 < crop_pct <= 1):
        raise ValueError(f"bad eval view: {width}x{height}, crop_pct {crop_pct}")
    side = max(1, min(width, height, int(round(min(width, height) * crop_pct))))
    x0, y0 = int(round((width - side) / 2)), int(round((height - side) / 2))
    return {"v": POLICY_VERSION, "crop": [x0, y0, x0 + side, y0 + side], "interp": interpolation,
            "flip": False, "ops": [], "jitter": None, "erase": [], "erase_mode": "const", "erase_seed": 0}


def draft_factor(params: dict, size: int) -> int:
    """JPEG DCT scale for a view of ``size``: largest of 8, 4, 2 keeping >= size crop pixels, else 1."""
    x0, y0, x1, y1 = params["crop"]
    short = min(x1 - x0, y1 - y0)
    for f in (8, 4, 2):
        if short >= size * f:
            return f
    return 1


# ----------------------------------------------------------------------------- images

def _scaled(w: int, h: int, factor: int) -> int:
    """The DCT factor actually usable on a w x h JPEG (each side must keep >= 1 pixel)."""
    while factor > 1 and (w < factor or h < factor):
        factor //= 2
    return factor


def _open(data: bytes, factor: int, im: Image.Image | None = None) -> tuple[Image.Image, int]:
    """Decode ``data`` (``im``: the same bytes already opened, header read, nothing decoded yet)."""
    im = Image.open(io.BytesIO(data)) if im is None else im
    f = 1
    if factor > 1 and im.format == "JPEG":
        f = _scaled(im.width, im.height, factor)
        w, h = im.width, im.height
        im.draft("RGB", (w // f, h // f))
        if im.size != (-(-w // f), -(-h // f)):  # Pillow refused the draft (multi-tile file)
            im = Image.open(io.BytesIO(data))
            f = 1
    im.load()
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit grey: keep the top 8 bits
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if im.mode != "RGB":
        # alpha is dropped (as ImageFolder/timm do); palette transparency likewise
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        im = im.convert("RGB")
    return im, f


def open_image(data: bytes, factor: int = 1) -> Image.Image:
    """Decode image bytes to RGB; a JPEG with factor > 1 is decoded at 1/factor scale (DCT draft).

    16-bit greyscale keeps its top 8 bits; alpha channels are dropped (like ``convert('RGB')`` in
    timm/torchvision loaders). The factor is lowered for JPEGs smaller than it on a side.
    """
    return _open(data, factor)[0]


class SourceImage:
    """One sample's encoded bytes, decoded lazily and memoised per draft factor."""

    def __init__(self, data: bytes):
        self.data = bytes(data)
        im = Image.open(io.BytesIO(self.data))  # header only, no pixel decode
        self.width, self.height = im.size
        self.format = im.format
        self._opened: Image.Image | None = im   # reused by the first decode (a JPEG is not parsed twice)
        self._cache: dict[int, tuple[Image.Image, int]] = {}

    def decoded(self, factor: int = 1) -> tuple[Image.Image, int]:
        """(image, factor actually used): 1 for non-JPEGs, else ``factor`` lowered for tiny images."""
        if self.format != "JPEG":
            factor = 1
        if factor not in self._cache:
            im, self._opened = self._opened, None
            self._cache[factor] = _open(self.data, factor, im)
        return self._cache[factor]

    def __getstate__(self) -> dict:          # (a lazily opened Pillow image does not pickle)
        return dict(self.__dict__, _opened=None)

    def at(self, factor: int) -> Image.Image:
        return self.decoded(factor)[0]


def _affine(img: Image.Image, matrix: tuple) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BICUBIC, fillcolor=FILL)


def _solarize_add(img: Image.Image, add: int) -> Image.Image:
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    mask = ~(2 ** (8 - bits) - 1) & 0xFF  # bits 0 keeps nothing: black (timm; Pillow refuses 0)
    return img.point([i & mask for i in range(256)] * 3)


_BICUBIC = Image.Resampling.BICUBIC
_OPS = {
    "AutoContrast": lambda im, _: ImageOps.autocontrast(im),
    "Equalize": lambda im, _: ImageOps.equalize(im),
    "Invert": lambda im, _: ImageOps.invert(im),
    "Rotate": lambda im, deg: im.rotate(deg, resample=_BICUBIC, fillcolor=FILL),
    "Posterize": _posterize,
    "Solarize": lambda im, t: ImageOps.solarize(im, t),
    "SolarizeAdd": _solarize_add,
    "Color": lambda im, f: ImageEnhance.Color(im).enhance(f),
    "Contrast": lambda im, f: ImageEnhance.Contrast(im).enhance(f),
    "Brightness": lambda im, f: ImageEnhance.Brightness(im).enhance(f),
    "Sharpness": lambda im, f: ImageEnhance.Sharpness(im).enhance(f),
    "ShearX": lambda im, f: _affine(im, (1, f, 0, 0, 1, 0)),
    "ShearY": lambda im, f: _affine(im, (1, 0, 0, f, 1, 0)),
    "TranslateXRel": lambda im, p: _affine(im, (1, 0, p * im.width, 0, 1, 0)),
    "TranslateYRel": lambda im, p: _affine(im, (1, 0, 0, 0, 1, p * im.height)),
}


def _adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    shift = np.uint8(int(round(hue * 255)) % 256)
    h = Image.fromarray(np.asarray(h, dtype=np.uint8) + shift, "L")  # wraps around, as torchvision
    return Image.merge("HSV", (h, s, v)).convert("RGB")


_JITTER_OPS = {
    "brightness": lambda im, f: ImageEnhance.Brightness(im).enhance(f),
    "contrast": lambda im, f: ImageEnhance.Contrast(im).enhance(f),
    "saturation": lambda im, f: ImageEnhance.Color(im).enhance(f),
    "hue": _adjust_hue,
}


def render(src: SourceImage, params: dict, size: int, *, draft: bool = True) -> Image.Image:
    """The view as a size x size RGB image: crop + resize, flip, RandAugment ops or colour jitter.

    ``draft=False`` forces a full-resolution decode (for comparisons; replays must keep the default).
    """
    img, f = src.decoded(draft_factor(params, size) if draft else 1)
    x0, y0, x1, y1 = params["crop"]
    img = img.resize((size, size), _INTERP[params["interp"]], box=(x0 / f, y0 / f, x1 / f, y1 / f))
    if params["flip"]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for op in params["ops"]:
        img = _OPS[op["op"]](img, op["magnitude"])
    jitter = params.get("jitter")
    if jitter:
        for name in jitter["order"]:
            img = _JITTER_OPS[name](img, jitter[name])
    return img


@lru_cache(maxsize=16)
def _norm(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, dtype=torch.float32).view(3, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(3, 1, 1))


def to_tensor(img: Image.Image, params: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """float32 C x H x W of one rendered view: ``finish`` (normalise, erase from params) of its pixels."""
    return finish(pixels(img), [params], [None], mean, std)[0]


def pixels(img: Image.Image) -> torch.Tensor:
    """A rendered view's RGB pixels as uint8 (1, H, W, 3), what ``finish`` takes."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, h, w, 3)


def finish(pixels: torch.Tensor, params: list, plans: list, mean=IMAGENET_MEAN, std=IMAGENET_STD, *,
           device: torch.device | None = None, partners: torch.Tensor | None = None,
           partner_params: list | None = None, partner_rows: list | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The one step from rendered views to the model's input: uint8 (B, H, W, 3) -> float32 (B, 3, H, W)
    on ``device`` (default: the pixels'): normalised (``normalize_u8``), row i erased from ``params[i]``
    (``erase_``), then mixed (``mix``) with its partner by ``plans[i]`` (None: unmixed). The partner of
    row i is ``partners[i]`` (its own uint8 view, erased from ``partner_params[i]``) or, without
    ``partners``, row ``partner_rows[i]`` of this batch as erased, before any mixing. The same IEEE
    steps on every device: on the CPU bit for bit what every other device gives. ``out``: a float32
    tensor to write into."""
    dev = device if device is not None else pixels.device
    x = normalize_u8(pixels.to(dev, non_blocking=True), mean, std, out=out)
    for i, p in enumerate(params):
        erase_(x[i], p)
    rows = [i for i, plan in enumerate(plans) if plan is not None]
    if not rows:
        return x
    if partners is not None:
        y = normalize_u8(partners[rows].to(dev, non_blocking=True), mean, std)
        made = {i: mix(x[i], erase_(y[j], partner_params[i]), plans[i]) for j, i in enumerate(rows)}
    else:
        made = {i: mix(x[i], x[partner_rows[i]], plans[i]) for i in rows}
    for i, v in made.items():          # after every pair is made: partners are the unmixed views
        x[i] = v
    return x


def normalize_u8(pixels: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W): x / 255, then (x - mean) / std, on the pixels' device
    (torchvision's ToTensor + Normalize, bit for bit, on every device: each step is one IEEE operation).
    ``out``: a float32 (..., 3, H, W) tensor to write into (e.g. one in shared memory)."""
    if out is None:
        x = pixels.movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format)
    else:
        x = out.copy_(pixels.movedim(-1, -3))
    m, sd = _norm(tuple(map(float, mean)), tuple(map(float, std)))
    return x.div_(255.0).sub_(m.to(x.device)).div_(sd.to(x.device))


def erase_(x: torch.Tensor, params: dict) -> torch.Tensor:
    """RandomErasing of one normalised view (3, H, W) in place, from its params (the noise is drawn on
    the CPU from the view's erase seed, then moved to the view's device)."""
    boxes = params.get("erase") or ()
    if not boxes:
        return x
    h, w = x.shape[-2], x.shape[-1]
    mode = params.get("erase_mode", "pixel")
    gen = torch.Generator().manual_seed(int(params["erase_seed"])) if mode != "const" else None
    for bx0, by0, bx1, by1 in boxes:
        px0, px1 = int(round(bx0 * w)), int(round(bx1 * w))
        py0, py1 = int(round(by0 * h)), int(round(by1 * h))
        if px1 <= px0 or py1 <= py0:
            continue
        if mode == "const":
            x[:, py0:py1, px0:px1] = 0.0
        else:
            shape = (3, py1 - py0, px1 - px0) if mode == "pixel" else (3, 1, 1)
            x[:, py0:py1, px0:px1] = torch.randn(shape, generator=gen, dtype=torch.float32).to(x.device)
    return x


def view(src: SourceImage, params: dict, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
         *, draft: bool = True) -> torch.Tensor:
    """render + to_tensor: the exact tensor of this view, bit-identical on every call."""
    return to_tensor(render(src, params, size, draft=draft), params, mean, std)


# ----------------------------------------------------------------------------- mixing

def _pair(policy: Policy, s_lo: int, s_hi: int) -> dict | None:
    """The mixing parameters of one pair, from a generator keyed by both seeds (timm's draws)."""
    rng = _Rng(s_lo, s_hi, _PAIR)
    apply, switch, cx, cy = rng.uniform(), rng.uniform(), rng.uniform(), rng.uniform()
    if not (policy.mixing and apply < policy.mix_prob):
        return None
    if policy.mixup_alpha > 0 and policy.cutmix_alpha > 0:
        cutmix = switch < policy.switch_prob
    else:
        cutmix = policy.cutmix_alpha > 0
    lam = rng.beta(policy.cutmix_alpha if cutmix else policy.mixup_alpha)
    if not cutmix:
        return {"lam": _r(lam), "mode": "mixup", "box": None}
    cut = math.sqrt(1.0 - lam)  # side fraction of the pasted box, centre uniform, clipped (timm)
    box = [_r(min(1.0, max(0.0, c + d * cut / 2))) for c, d in ((cx, -1), (cy, -1), (cx, 1), (cy, 1))]
    return {"lam": _r(1.0 - (box[2] - box[0]) * (box[3] - box[1])), "mode": "cutmix", "box": box}


def mix_plan(policy: Policy, seeds: Sequence[int]) -> list[dict | None]:
    """Mixup/CutMix pairing of one shard's samples for one epoch (seeds in shard order).

    Inside each block of ``policy.mix_block`` consecutive positions (blocks start at position 0),
    positions are ordered by (seed, position) and neighbours are paired: 1st with 2nd, 3rd with 4th;
    an odd one out is unmixed. A pair's parameters come from a generator keyed by both seeds, so the
    plan is a pure function of (policy, seeds) and does not depend on batching or workers.

    Pairs follow timm's ``mode='pair'``: both members get the same plan values (``lam``, ``mode``,
    ``box``) with ``partner`` pointing at each other, and each member's view is
    ``mix(own, partner, plan)``: mixup gives ``lam * own + (1 - lam) * partner`` for both (two
    different images), cutmix pastes the partner's box into each. ``lam`` is always the weight of
    the member's own image; for cutmix it is the kept area of the box in fractions.
    """
    plans: list[dict | None] = [None] * len(seeds)
    if not policy.mixing:
        return plans
    seeds = [int(s) for s in seeds]
    for start in range(0, len(seeds), policy.mix_block):
        order = sorted(range(start, min(start + policy.mix_block, len(seeds))), key=lambda i: (seeds[i], i))
        for a, b in zip(order[0::2], order[1::2]):
            p = _pair(policy, seeds[a], seeds[b])
            if p is not None:
                plans[a] = {"partner": b, **p}
                plans[b] = {"partner": a, **p, "box": None if p["box"] is None else list(p["box"])}
    return plans


def _pixel_box(plan: dict, h: int, w: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = plan["box"]
    return int(round(x0 * w)), int(round(y0 * h)), int(round(x1 * w)), int(round(y1 * h))


def mix_lam(plan: dict | None, size: tuple[int, int] | None = None) -> float:
    """Weight of the own image: plan's lam, or for cutmix at (h, w) the kept pixel area (timm's correction)."""
    if plan is None:
        return 1.0
    if plan["mode"] != "cutmix" or size is None:
        return float(plan["lam"])
    h, w = size
    x0, y0, x1, y1 = _pixel_box(plan, h, w)
    return 1.0 - (x1 - x0) * (y1 - y0) / float(h * w)


def mix(a: torch.Tensor, b: torch.Tensor, plan: dict | None) -> torch.Tensor:
    """The mixed view of ``a`` with its partner's view ``b`` (same shape, ... x H x W)."""
    if plan is None:
        return a
    if a.shape != b.shape:
        raise ValueError(f"mix: views differ in shape {tuple(a.shape)} vs {tuple(b.shape)}")
    if plan["mode"] == "mixup":
        lam = float(plan["lam"])
        return a.mul(lam).add_(b, alpha=1.0 - lam)
    x0, y0, x1, y1 = _pixel_box(plan, a.shape[-2], a.shape[-1])
    out = a.clone()
    out[..., y0:y1, x0:x1] = b[..., y0:y1, x0:x1]
    return out

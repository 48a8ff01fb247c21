"""Teacher and scorer models: load a spec, run batched inference, report identity.

Spec forms (the same for ``--teacher`` and ``--scorer``):

* ``path/model.pt`` (or any file torch.jit.load opens): a TorchScript module;
* ``path/model.pt2``: a ``torch.export`` program (loaded without running code from the file: ``pt2``);
* ``package.module:callable``: a callable returning an ``nn.Module`` (weights its own business,
  or a checkpoint given separately);
* ``OUT/``: the directory ``distill adapt-teacher`` writes (``teacher.json`` names its ``teacher.pt2``
  and declares input size, mean and std; identity: the program file's sha256, plus method and base);
* ``timm:<model_name>``: a timm model (``pip install 'distill[timm]'``), weights from the checkpoint;
  without one it is refused unless random weights are asked for (tests, benchmarks), which are
  then seeded so that every process builds the same ones.

A teacher's identity is its weights: ``weights_sha256`` is the file's sha256 for TorchScript and
``.pt2`` files (code and weights), and the digest of the loaded state dict (checkpoint applied)
for callables and timm models. An ``Ensemble`` given the driver's identities checks that it loaded
the same weights.

Input: images already at the model's input size, scaled to [0, 1] and normalised. Output: logits
over classes (or, declared by ``outputs``, probabilities or log-probabilities), as a tensor, a dict's
``logits`` or a tuple's first element; NaN or infinity is refused naming the batch rows. An ensemble
averages the members' probabilities, computed in float32 whatever the forward precision (fp32, or
bf16/fp16 under autocast). No file paths of data here.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import math
import os
import re
import warnings
from dataclasses import dataclass

import torch

from . import pt2
from .config import TEACHER_OUTPUTS
from .files import UserError, inside, sha256_file
from .format import ADAPT_TEACHER_JSON, read_teacher_json

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FILE_KINDS = ("torchscript", "export", "directory")     # identified by a file's sha256, not a loaded state dict


@dataclass(frozen=True)
class TeacherSpec:
    spec: str
    checkpoint: str | None = None
    random_weights: bool = False    # allow a timm model without checkpoint (tests, benchmarks)
    num_classes: int = 0            # classes a timm model is created with (0: timm's default for it)

    @property
    def kind(self) -> str:
        if self.spec.startswith("timm:"):
            return "timm"
        if os.path.isdir(self.spec):
            if read_teacher_json(self.spec) is None:
                raise UserError(f"teacher directory {self.spec} has no teacher.json (write one with distill adapt-teacher)")
            return "directory"
        if self.spec.endswith(".pt2"):
            return "export"
        if os.path.exists(self.spec):
            return "torchscript"
        if ":" in self.spec and not os.path.sep in self.spec.split(":")[0]:
            return "callable"
        raise UserError(f"teacher spec not found: {self.spec!r} (a TorchScript/.pt2 file, module.path:callable or timm:<name>)")

    def identity(self) -> dict:
        """What makes this teacher this teacher: its spec, weight files and ``weights_sha256``.
        Loads callable and timm teachers to digest their weights."""
        model = load_module(self) if self.kind in ("callable", "timm") else None
        return _identity(self, model)


def _identity(spec: TeacherSpec, model: torch.nn.Module | None) -> dict:
    kind = spec.kind
    if kind == "directory":
        return _dir_identity(spec)
    ident = {"spec": spec.spec, "kind": kind}
    if kind in ("torchscript", "export"):
        ident["sha256"] = ident["weights_sha256"] = _file_sha256(spec.spec)
    else:
        if kind == "callable":
            src = inspect.getsourcefile(_import_callable(spec.spec)[0])
            if src:
                ident["source_sha256"] = sha256_file(src)
        else:
            import timm
            ident["timm_version"] = timm.__version__
            n = getattr(model, "num_classes", None)
            if n and n != _timm_cfg(model).get("num_classes", n):     # only a head other than timm's default:
                ident["num_classes"] = n                             # older identities keep their shape
        ident["weights_sha256"] = weights_digest(model)
        if spec.random_weights and not spec.checkpoint:
            ident["random_weights"] = True
    if spec.checkpoint:
        ident["checkpoint"] = spec.checkpoint
        ident["checkpoint_sha256"] = _file_sha256(spec.checkpoint, "teacher checkpoint")
    return ident


def dir_file_spec(spec: TeacherSpec) -> TeacherSpec:
    """The program file an adapted-teacher directory names (``teacher.json``'s ``file``): a plain ``.pt2``
    file name inside the directory, never another kind of teacher (a TorchScript file, a callable) that
    loading would run."""
    doc = read_teacher_json(spec.spec)
    what = f"{os.path.join(spec.spec, ADAPT_TEACHER_JSON)} names file"
    path = inside(spec.spec, doc.get("file"), what, "the adapted-teacher directory")
    if not path.name.endswith(".pt2"):
        raise UserError(f"{spec.spec}: teacher.json names {path.name!r}; an adapted-teacher directory holds a .pt2 "
                        "program (rerun adapt-teacher)")
    return TeacherSpec(str(path))


def _dir_identity(spec: TeacherSpec) -> dict:
    doc = read_teacher_json(spec.spec)
    inner = _identity(dir_file_spec(spec), None)
    if doc.get("weights_sha256") and doc["weights_sha256"] != inner["weights_sha256"]:
        raise UserError(f"{spec.spec}: {doc['file']} changed since adapt-teacher wrote it (sha256 differs from "
                        "teacher.json's); rerun adapt-teacher")
    base = doc.get("base") or {}
    return {"spec": spec.spec, "kind": "directory", "file": doc["file"], "sha256": inner["sha256"],
            "weights_sha256": inner["weights_sha256"], "method": doc.get("method"),
            "base": {k: base[k] for k in ("spec", "weights_sha256", "checkpoint_sha256") if k in base}}


def dir_preprocessing(specs: list[TeacherSpec]) -> dict | None:
    """The ``input_size``, ``mean`` and ``std`` adapted-teacher directories declare, when every member
    is one and they agree; else None."""
    if not specs or any(s.kind != "directory" for s in specs):
        return None
    cfgs = {(d["input_size"], tuple(d["mean"]), tuple(d["std"])) for d in (read_teacher_json(s.spec) for s in specs)}
    if len(cfgs) != 1:
        return None
    size, mean, std = cfgs.pop()
    return {"input_size": int(size), "mean": tuple(float(x) for x in mean), "std": tuple(float(x) for x in std)}


def _file_sha256(path: str, what: str = "teacher file") -> str:
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    return sha256_file(path)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict in sorted-name order: each tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _import_callable(spec: str):
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"cannot import teacher module {mod_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UserError(f"{mod_name!r} has no callable {attr!r}")
    return module, fn


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _load_checkpoint(model: torch.nn.Module, spec: "TeacherSpec") -> None:
    """Load the checkpoint into ``model``; every way it can fail is one UserError line (a missing or
    unreadable file, no state dict, keys of other shapes: the first named with both shapes)."""
    from .models import read_state_dict

    path = spec.checkpoint
    try:
        state = read_state_dict(path)
    except ValueError as e:
        raise UserError(f"--teacher-checkpoint {path} not found" if not os.path.isfile(path)
                        else f"cannot read --teacher-checkpoint {e}") from None
    own = model.state_dict()
    wrong = [(k, list(v.shape), list(own[k].shape)) for k, v in state.items()
             if isinstance(v, torch.Tensor) and k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise UserError(_mismatch(spec, model, wrong))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:
        raise UserError(f"--teacher-checkpoint {path} does not fit {spec.spec}: {_first_line(e)}") from None
    if missing or unexpected:
        raise UserError(f"--teacher-checkpoint {path} does not fit {spec.spec}: {len(missing)} missing keys "
                        f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def _mismatch(spec: "TeacherSpec", model: torch.nn.Module, wrong: list) -> str:
    """The checkpoint's keys of other shapes, in one sentence; for a timm model whose classifier
    differs only in its class count, the --teacher-num-classes that fits."""
    n = getattr(model, "num_classes", None) if spec.kind == "timm" else None
    head = [w for w in wrong if n and w[2][:1] == [n] and w[1][1:] == w[2][1:]]
    key, file_shape, model_shape = (head or wrong)[0]
    what = f"{spec.spec} with {n} classes" if n else spec.spec
    msg = (f"--teacher-checkpoint {spec.checkpoint} does not fit {what}: {key} is {file_shape} in the file, "
           f"{model_shape} in the model")
    others = [w[0] for w in wrong if w[0] != key]
    if others:
        msg += f" (also {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    if head:
        msg += (f"; pass --teacher-num-classes {file_shape[0]} for a {file_shape[0]}-class checkpoint "
                "(default: the shards' class count)")
    return msg


def _build(spec: TeacherSpec) -> torch.nn.Module:
    """The module a callable or timm spec names, before any checkpoint. Random initialisation
    draws from a private RNG seeded with 0: the same weights in every process, the caller's
    RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec.kind == "callable":
            fn = _import_callable(spec.spec)[1]
            try:
                model = fn()
            except UserError:
                raise
            except Exception as e:       # chained: a worker's log shows where it raised
                text = " ".join(x.strip() for x in _ANSI.sub("", str(e)).splitlines() if x.strip())
                raise UserError(f"teacher {spec.spec} raised {type(e).__name__}" + (f": {text[:500]}" if text else "")) from e
            if not isinstance(model, torch.nn.Module):
                raise UserError(f"{spec.spec} returned {type(model).__name__}, not a torch.nn.Module")
            return model
        try:
            import timm
        except ImportError as e:
            raise UserError(f"timm teachers need the timm extra: pip install 'distill[timm]' ({e})") from None
        name = spec.spec.split(":", 1)[1]
        try:
            return timm.create_model(name, pretrained=False, **({"num_classes": spec.num_classes}
                                                                if spec.num_classes else {}))
        except Exception as e:
            raise UserError(f"timm cannot create {name!r}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def load_module(spec: TeacherSpec) -> torch.nn.Module:
    kind = spec.kind
    if kind == "directory":
        return load_module(dir_file_spec(spec))
    if kind == "torchscript":
        try:
            model = torch.jit.load(spec.spec, map_location="cpu")
        except Exception as e:  # torch raises RuntimeError with multi-line text
            raise UserError(f"cannot load TorchScript teacher {spec.spec}: {(str(e).splitlines() or [repr(e)])[0]}") from None
    elif kind == "export":
        return _load_export(spec).module()   # traced in its export mode; eval() is refused
    else:
        _refuse_random(spec)
        model = _build(spec)
        if spec.checkpoint:
            _load_checkpoint(model, spec)
    return model.eval()


def _refuse_random(spec: TeacherSpec) -> None:
    if spec.kind == "timm" and not spec.checkpoint and not spec.random_weights:
        raise UserError(f"{spec.spec} has no --teacher-checkpoint: its weights would be random; pass "
                        "--teacher-checkpoint PATH (or --teacher-random-weights for tests and benchmarks)")


def _exported_path(spec: TeacherSpec) -> str:
    if not os.path.isfile(spec.spec):
        raise UserError(f"teacher file not found: {spec.spec}")
    return spec.spec


def _load_export(spec: TeacherSpec):
    """The program, loaded without running code from the file (``pt2.load``: a part that would is refused)."""
    path = _exported_path(spec)
    try:
        return pt2.load(path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load .pt2 teacher {path}: {_first_line(e)}") from None


def make_specs(teachers, checkpoints=(), random_weights: bool = False, num_classes: int = 0) -> list[TeacherSpec]:
    """Specs of ``teachers`` (checkpoints one per teacher, in order); ``num_classes``: the classes
    its timm members are created with (0: timm's default)."""
    teachers = list(teachers)
    checkpoints = list(checkpoints)
    if not teachers:
        raise UserError("no teacher given: use --teacher SPEC")
    if checkpoints and len(checkpoints) != len(teachers):
        raise UserError(f"{len(checkpoints)} --teacher-checkpoint for {len(teachers)} --teacher: give one per teacher")
    specs = [TeacherSpec(t, checkpoints[i] if checkpoints else None, bool(random_weights),
                         int(num_classes) if t.startswith("timm:") else 0)
             for i, t in enumerate(teachers)]
    for spec in specs:           # before anything loads: a checkpoint-less timm teacher is refused at once
        _refuse_random(spec)
    return specs


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"bad --device {device!r} (cpu, cuda, cuda:N or auto)") from None


def resolve_precision(precision: str | None, device) -> str:
    """None or "auto": bf16 on CUDA, fp32 elsewhere; otherwise one of fp32, bf16, fp16."""
    if precision in (None, "auto"):
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"bad precision {precision!r}: use one of {', '.join(PRECISIONS)} or auto")
    return precision


def _autocast(device: torch.device, precision: str):
    """The forward's context for this precision; refuses one this torch cannot autocast to."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    with warnings.catch_warnings():          # torch warns and disables autocast for a dtype it lacks
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device.type, dtype=dtype):
                probe = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        except (RuntimeError, ValueError):
            probe = None
    if probe is None or probe.dtype != dtype:
        raise UserError(f"precision {precision} is not supported on {device.type} by torch {torch.__version__}: "
                        "use fp32 or bf16")
    return lambda: torch.autocast(device.type, dtype=dtype)


class Ensemble:
    """One or more models whose softmax(logits / T) are averaged. ``__call__`` returns float32
    probabilities. ``precision``: fp32, bf16 or fp16 (autocast), None/"auto" as ``resolve_precision``.
    ``expect``: identities (as from ``identity(specs)``) whose ``weights_sha256`` the loaded
    members must have, so that a worker proves it runs the weights the driver identified."""

    def __init__(self, specs: list[TeacherSpec], device: str | torch.device = "cpu", temperature: float = 1.0,
                 precision: str | None = "fp32", expect: list[dict] | None = None, outputs: str = "logits"):
        if not 0 < temperature < math.inf:
            raise UserError(f"temperature must be a finite number > 0, got {temperature}")
        if outputs not in TEACHER_OUTPUTS:
            raise UserError(f"--teacher-outputs must be one of {', '.join(TEACHER_OUTPUTS)}, got {outputs!r}")
        self.outputs = outputs
        if expect is not None and len(expect) != len(specs):
            raise UserError(f"{len(expect)} expected teacher identities for {len(specs)} teachers")
        self.specs = specs
        self.device = torch.device(device)
        self.temperature = float(temperature)
        self.precision = resolve_precision(precision, self.device)
        self._autocast = _autocast(self.device, self.precision)
        self.models = []
        for i, spec in enumerate(specs):
            model = load_module(spec)
            if expect is not None:
                _check_weights(spec, model, expect[i])
            self.models.append(model.to(self.device))
        # a teacher whose forward runs off this process's CPU (a stand-in for a GPU in benchmarks, a remote
        # inference server) sets ``distill_off_cpu = True``: its views need not take turns with it
        self.off_cpu = all(getattr(m, "distill_off_cpu", False) for m in self.models)
        # On a CPU device TorchScript members run unoptimised: the same graph from the first call on, so no
        # batch's numbers depend on how many calls came before it and there is nothing to warm up (on CPU
        # the optimised graph fuses nothing; measured the same speed: ViT-S/16-like 14.0-14.5 img/s either
        # way, ResNet-18-like 26.7-28.6). On a GPU the optimiser fuses kernels: warm up (``warmup_needed``).
        self._optimize = self.device.type != "cpu"

    @property
    def warmup_needed(self) -> bool:
        """True when the first calls at a batch shape optimise (TorchScript fusers, cuDNN's autotuner)."""
        return self._optimize

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        total = None
        for spec, model in zip(self.specs, self.models):
            with self._autocast(), torch.jit.optimized_execution(self._optimize):
                out = model(x)
            logits = log_scores(output_tensor(out, spec), self.outputs, spec)
            probs = torch.softmax(logits / self.temperature, dim=-1)
            total = probs if total is None else total + probs
        return total / len(self.models)

    def identity(self) -> list[dict]:
        """``identity(specs)`` from the models already loaded (no second load)."""
        return [_identity(s, None if s.kind in FILE_KINDS else m)
                for s, m in zip(self.specs, self.models)]

    def output_width(self, input_size: int) -> int:
        return int(self(torch.zeros(1, 3, input_size, input_size)).shape[-1])


class NonFiniteOutput(UserError):
    """A teacher's output holds NaN or infinity in some rows (``rows``: their indices in the batch)."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows


def output_tensor(out, spec: TeacherSpec) -> torch.Tensor:
    """The (batch, classes) tensor a teacher's forward returned: the tensor itself, a dict's (or a
    ``ModelOutput``'s) ``logits``, or a tuple's or list's first element; anything else is refused."""
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        out = out["logits"]
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        what = type(out).__name__ + (f" with keys {sorted(map(str, out))[:5]}" if isinstance(out, dict) else "")
        raise UserError(f"teacher {spec.spec} returned a {what}: expected its logits, as a tensor, a dict with a "
                        "'logits' tensor, or a tuple whose first element is the logits")
    if out.ndim != 2:
        raise UserError(f"teacher {spec.spec} returned a tensor of shape {tuple(out.shape)}: expected (batch, classes)")
    return out


def _are_probabilities(p: torch.Tensor) -> bool:
    """Every row non-negative and summing to 1 within 1e-3: a softmax's output."""
    return bool(((p >= 0).all(dim=-1) & ((p.sum(dim=-1) - 1).abs() <= 1e-3)).all())     # one host sync


def log_scores(out: torch.Tensor, outputs: str, spec: TeacherSpec) -> torch.Tensor:
    """float32 scores whose softmax (over T) is the teacher's distribution: logits as they are, log-probs
    as they are, probabilities as their logarithm (softmax(log p / T); no second softmax). Refuses NaN and
    infinity (``NonFiniteOutput``, naming the batch rows; -inf is log 0 from a log-probs teacher), a logits
    teacher whose rows are probabilities, and a probs or log-probs teacher whose rows are not."""
    x = out.float()
    bad = x.isnan() | (x == math.inf) | ((x == -math.inf) if outputs != "log-probs" else False)
    if bool(bad.any()):                           # the rows are listed only when there are some
        rows = bad.any(dim=-1).nonzero().flatten().tolist()
        raise NonFiniteOutput(f"teacher {spec.spec} output NaN or infinity for {len(rows)} of {len(x)} images", rows)
    if outputs == "logits":
        if _are_probabilities(x):
            raise UserError(f"teacher {spec.spec} returns probabilities (every row non-negative, summing to 1): a "
                            "softmax over them would flatten its targets; pass --teacher-outputs probs")
        return x
    if not _are_probabilities(x if outputs == "probs" else x.exp()):
        what = "probabilities (non-negative" if outputs == "probs" else "log-probabilities (their exp non-negative"
        raise UserError(f"--teacher-outputs {outputs}: the rows teacher {spec.spec} returns are not {what}, "
                        "summing to 1); --teacher-outputs logits takes any scores")
    return x.log() if outputs == "probs" else x


def _check_weights(spec: TeacherSpec, model: torch.nn.Module, expected: dict) -> None:
    want = expected.get("weights_sha256")
    got = _identity(spec, None if spec.kind in FILE_KINDS else model)["weights_sha256"]
    if got != want:
        raise UserError(f"teacher {spec.spec} loaded with other weights than the run expects (weights sha256 "
                        f"{got[:16]} != {str(want)[:16]}): the checkpoint or the model changed since the run was "
                        "identified, or random weights differ between processes")


def input_size_hint(specs: list[TeacherSpec]) -> int | None:
    """The input resolution every member declares (a .pt2 program's example input, a model's
    ``pretrained_cfg``/``default_cfg`` ``input_size``), or None when one does not or they disagree."""
    sizes = {_declared_size(s) for s in dict.fromkeys(specs)}
    return sizes.pop() if len(sizes) == 1 else None


def _declared_size(spec: TeacherSpec) -> int | None:
    kind = spec.kind
    if kind == "directory":
        return int(read_teacher_json(spec.spec)["input_size"])
    if kind == "torchscript":
        return None
    if kind == "export":
        ep = _load_export(spec)
        inputs = set(ep.graph_signature.user_inputs)
        shapes = [n.meta["val"].shape for n in ep.graph.nodes
                  if n.op == "placeholder" and n.name in inputs and hasattr(n.meta.get("val"), "shape")]
        shape = shapes[0] if shapes else ()
    elif kind == "timm":
        shape = timm_config(spec)["input_size"]
    else:
        model = _build(spec)              # the architecture declares it; no checkpoint needed
        shape = _timm_cfg(model).get("input_size", ())
    dims = tuple(shape)[-2:]
    if len(dims) == 2 and all(type(d) is int for d in dims) and dims[0] == dims[1]:   # not symbolic, square
        return dims[0]
    return None


def _timm_cfg(model: torch.nn.Module) -> dict:
    """A model's ``pretrained_cfg`` (or older timm's ``default_cfg``), {} when it has none."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg if isinstance(cfg, dict) else {}


_TIMM_CONFIGS: dict[tuple, dict] = {}


def timm_config(spec: TeacherSpec) -> dict:
    """timm's default data config of a timm spec's architecture (no checkpoint needed):
    {"input_size": (C, H, W), "mean": (...), "std": (...)}, as ``timm.data.resolve_data_config``."""
    key = (spec.spec, spec.num_classes)
    if key not in _TIMM_CONFIGS:
        model = _build(spec)
        from timm.data import resolve_data_config
        cfg = resolve_data_config({}, model=model)
        _TIMM_CONFIGS[key] = {k: tuple(cfg[k]) for k in ("input_size", "mean", "std") if k in cfg}
    return _TIMM_CONFIGS[key]


def timm_preprocessing(specs: list[TeacherSpec]) -> dict | None:
    """timm's default ``input_size`` (int), ``mean`` and ``std`` when every member is a timm model
    and they agree on them; else None."""
    if not specs or any(s.kind != "timm" for s in specs):
        return None
    cfgs = {(c["input_size"][-1], c["mean"], c["std"]) for c in (timm_config(s) for s in dict.fromkeys(specs))}
    if len(cfgs) != 1:
        return None
    size, mean, std = cfgs.pop()
    return {"input_size": size, "mean": tuple(float(x) for x in mean), "std": tuple(float(x) for x in std)}


def topk(probs: torch.Tensor, k: int, labels: torch.Tensor):
    """(top-K ids, top-K probs, prob of each given label) as CPU tensors; most probable first."""
    values, idx = torch.topk(probs, k, dim=-1, sorted=True)
    safe = labels.clamp(0, probs.shape[-1] - 1).to(probs.device)
    label_prob = probs.gather(1, safe[:, None])[:, 0]
    return idx.cpu(), values.cpu(), label_prob.cpu()


def identity(specs: list[TeacherSpec]) -> list[dict]:
    return [s.identity() for s in specs]


def digest(obj_json: str) -> str:
    return hashlib.sha256(obj_json.encode()).hexdigest()[:16]

"""Teacher and scorer models: load a spec, run batched inference, report identity.

Spec forms (the same for ``--teacher`` and ``--scorer``):

* ``path/model.pt`` (or any file torch.jit.load opens): a TorchScript module;
* ``path/model.pt2``: a ``torch.export`` program;
* ``package.module:callable``: a callable returning an ``nn.Module`` (weights its own business,
  or a checkpoint given separately);
* ``timm:<model_name>``: a timm model (``pip install 'distill[timm]'``), weights from the checkpoint.

Input: images already at the model's input size, scaled to [0, 1] and normalised. Output: logits
over classes. An ensemble averages the members' probabilities. No file paths of data here.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from dataclasses import dataclass

import torch

from .files import UserError, sha256_file


@dataclass(frozen=True)
class TeacherSpec:
    spec: str
    checkpoint: str | None = None

    @property
    def kind(self) -> str:
        if self.spec.startswith("timm:"):
            return "timm"
        if self.spec.endswith(".pt2"):
            return "export"
        if os.path.exists(self.spec):
            return "torchscript"
        if ":" in self.spec and not os.path.sep in self.spec.split(":")[0]:
            return "callable"
        raise UserError(f"teacher spec not found: {self.spec!r} (a TorchScript/.pt2 file, module.path:callable or timm:<name>)")

    def identity(self) -> dict:
        """What makes this teacher this teacher: its spec and the sha256 of every weight file."""
        kind = self.kind
        ident = {"spec": self.spec, "kind": kind}
        if kind in ("torchscript", "export"):
            if not os.path.isfile(self.spec):
                raise UserError(f"teacher file not found: {self.spec}")
            ident["sha256"] = sha256_file(self.spec)
        elif kind == "callable":
            module = _import_callable(self.spec)[0]
            src = inspect.getsourcefile(module)
            if src:
                ident["source_sha256"] = sha256_file(src)
        if self.checkpoint:
            if not os.path.isfile(self.checkpoint):
                raise UserError(f"teacher checkpoint not found: {self.checkpoint}")
            ident["checkpoint"] = self.checkpoint
            ident["checkpoint_sha256"] = sha256_file(self.checkpoint)
        return ident


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


def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model", "module"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not fit the model: {len(missing)} missing keys "
                        f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def load_module(spec: TeacherSpec) -> torch.nn.Module:
    kind = spec.kind
    if kind == "torchscript":
        try:
            model = torch.jit.load(spec.spec, map_location="cpu")
        except Exception as e:  # torch raises RuntimeError with multi-line text
            raise UserError(f"cannot load TorchScript teacher {spec.spec}: {str(e).splitlines()[0]}") from None
    elif kind == "export":
        if not os.path.isfile(spec.spec):
            raise UserError(f"teacher file not found: {spec.spec}")
        model = torch.export.load(spec.spec).module()
    elif kind == "callable":
        model = _import_callable(spec.spec)[1]()
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"{spec.spec} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        try:
            import timm
        except ImportError:
            raise UserError("timm teachers need the timm extra: pip install 'distill[timm]'") from None
        name = spec.spec.split(":", 1)[1]
        try:
            model = timm.create_model(name, pretrained=False)
        except Exception as e:
            raise UserError(f"timm cannot create {name!r}: {e}") from None
    if spec.checkpoint and kind in ("callable", "timm"):
        _load_checkpoint(model, spec.checkpoint)
    if kind != "export":      # an exported program is traced in the mode it was exported in; eval() is refused
        model.eval()
    return model


def make_specs(teachers, checkpoints=()) -> list[TeacherSpec]:
    teachers = list(teachers)
    checkpoints = list(checkpoints)
    if not teachers:
        raise UserError("no teacher given: use --teacher SPEC")
    if checkpoints and len(checkpoints) != len(teachers):
        raise UserError(f"{len(checkpoints)} --teacher-checkpoint for {len(teachers)} --teacher: give one per teacher")
    return [TeacherSpec(t, checkpoints[i] if checkpoints else None) for i, t in enumerate(teachers)]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"bad --device {device!r} (cpu, cuda, cuda:N or auto)") from None


class Ensemble:
    """One or more models whose softmax(logits / T) are averaged. ``__call__`` returns probabilities."""

    def __init__(self, specs: list[TeacherSpec], device: str | torch.device = "cpu", temperature: float = 1.0):
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        self.specs = specs
        self.device = torch.device(device)
        self.temperature = float(temperature)
        self.models = [load_module(s).to(self.device) for s in specs]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        total = None
        for model in self.models:
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(x)
            else:
                logits = model(x)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            total = probs if total is None else total + probs
        return total / len(self.models)

    def output_width(self, input_size: int) -> int:
        return int(self(torch.zeros(1, 3, input_size, input_size)).shape[-1])


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

"""Write the adapted teacher: ``teacher.pt2`` (torch.export, dynamic batch), ``weights.pth`` (its
state dict in timm's names) and ``teacher.json`` (written last: its presence means complete)."""
from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn as nn

from .. import pt2
from ..files import UserError, atomic_write_bytes, atomic_write_json, sha256_file
from ..format import ADAPT_FORMAT, ADAPT_TEACHER_FILE, ADAPT_TEACHER_JSON, ADAPT_VERSION, ADAPT_WEIGHTS


def export_program(model: nn.Module, image_size: int, path: Path) -> float:
    """Export ``model`` (eval, fp32, CPU) with a dynamic batch dimension to ``path``; returns the max
    |Δ logit| of the loaded program against the module on a seeded batch of 3 (a check of the export)."""
    model = model.eval().float().cpu()
    example = torch.zeros(2, 3, image_size, image_size)
    try:
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    except Exception as e:  # noqa: BLE001 - torch.export raises many types, with long texts
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot torch.export the adapted teacher: {first[:300]}") from None
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    atomic_write_bytes(path, buf.getvalue())
    x = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = pt2.load(str(path)).module()(x)      # as a teacher loads it: the file passes the check
        want = model(x)
    return float((got - want).abs().max())


def write_teacher(model: nn.Module, out: Path, image_size: int, meta: dict) -> dict:
    """Write the three files; ``meta`` (classes, mean/std, method, base, metrics, ...) goes into
    teacher.json with the file names, their sha256 and the parameter count. Returns teacher.json's dict."""
    check = export_program(model, image_size, out / ADAPT_TEACHER_FILE)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(out / ADAPT_WEIGHTS, buf.getvalue())
    doc = {"format": ADAPT_FORMAT, "version": ADAPT_VERSION, "file": ADAPT_TEACHER_FILE,
           "weights_sha256": sha256_file(out / ADAPT_TEACHER_FILE), "state_dict": ADAPT_WEIGHTS,
           "state_dict_sha256": sha256_file(out / ADAPT_WEIGHTS), "input_size": image_size,
           "params": sum(p.numel() for p in model.parameters()), **meta}
    doc.setdefault("metrics", {})["export_max_abs_logit_diff"] = check
    atomic_write_json(out / ADAPT_TEACHER_JSON, doc)
    return doc

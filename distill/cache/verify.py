"""``distill verify``: check a cache's files against its manifest and recompute random records with
the teacher."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..format import read_ipc
from ..files import FormatError, sha256_file
from .reader import Cache, open_cache


# ----------------------------------------------------------------------------- verify

@dataclass
class VerifyResult:
    problems: list[str]
    recomputed: int = 0
    top1_agreement: float = float("nan")
    max_abs_diff: float = float("nan")

    @property
    def ok(self) -> bool:
        return not self.problems and (self.recomputed == 0 or self.top1_agreement == 1.0)

    def summary(self) -> str:
        lines = ["files: " + ("ok" if not self.problems else f"{len(self.problems)} problem(s)")]
        lines += [f"  {p}" for p in self.problems]
        if self.recomputed:
            lines.append(f"recomputed {self.recomputed} records: top-1 agreement {self.top1_agreement:.2%}, "
                         f"max |prob difference| {self.max_abs_diff:.2e}")
        return "\n".join(lines)


def verify_cache(path, recompute: int = 0, teacher=(), teacher_checkpoint=(), seed: int = 0,
                 device: str = "cpu", shards_dir=None) -> VerifyResult:
    """Check files against the manifest; recompute ``recompute`` random records with the teacher."""
    import torch
    from .. import teachers
    cache = open_cache(path, shards_dir)
    res = VerifyResult(problems=verify_files(cache))
    if recompute <= 0 or res.problems or cache.num_records == 0:
        return res
    members = cache.teacher["members"]
    if teacher:
        specs = teachers.make_specs(teacher, teacher_checkpoint)
    else:
        specs = [teachers.TeacherSpec(m["spec"], m.get("checkpoint")) for m in members]
    ens = teachers.Ensemble(specs, teachers.resolve_device(device), cache.teacher["temperature"])
    rng = np.random.default_rng(seed)
    keys = list(cache._where)
    agree, worst = 0, 0.0
    picks = [(keys[i], int(e)) for i, e in zip(rng.integers(0, len(keys), recompute), rng.integers(0, cache.epochs, recompute))]
    for key, epoch in picks:
        rec = cache.record(key, epoch)
        x = cache.view_tensor(key, epoch, "teacher")[None]
        p = ens(x)[0].cpu()
        stored_idx = torch.tensor(rec["topk_idx"])
        agree += int(int(p.argmax()) == int(stored_idx[0]))
        worst = max(worst, float((p[stored_idx] - torch.tensor(rec["topk_prob"], dtype=torch.float32)).abs().max()))
    res.recomputed, res.top1_agreement, res.max_abs_diff = len(picks), agree / len(picks), worst
    return res


def verify_files(cache: Cache) -> list[str]:
    """Problems found checking every file against the manifest (empty list: all good)."""
    problems = []
    for e in cache.manifest["shards"]:
        f = cache.path / e["file"]
        if not f.exists():
            problems.append(f"{e['file']}: missing")
            continue
        if f.stat().st_size != e["file_bytes"]:
            problems.append(f"{e['file']}: size {f.stat().st_size} != manifest {e['file_bytes']}")
            continue
        if sha256_file(f) != e["file_sha256"]:
            problems.append(f"{e['file']}: checksum differs from the manifest")
            continue
        try:
            n = read_ipc(f, ["key"]).num_rows
        except FormatError as err:
            problems.append(str(err))
            continue
        if n != e["samples"]:
            problems.append(f"{e['file']}: {n} samples, manifest says {e['samples']}")
    return problems

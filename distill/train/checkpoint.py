"""The run directory: checkpoints (atomic, with a JSON sidecar), metrics.jsonl, summary.json.

    RUN_DIR/config.json      resolved TrainConfig
    RUN_DIR/last.pt          model, optimizer, state (step, epoch, best epoch, every metrics row so far,
                             the last epoch's class statistics), config, data identity (every epoch)
    RUN_DIR/last.json        sidecar: epoch, step, images seen, accuracies (readable without torch)
    RUN_DIR/best.pt          model weights of the best val top-1 epoch (+ best.json)
    RUN_DIR/metrics.jsonl    one JSON line per epoch
    RUN_DIR/summary.json     final and best accuracies, epochs, images seen, wall time (written last)

``last.pt`` is an epoch's one commit point: it is written first (atomically) and holds everything the
other files are made from, and ``--resume`` remakes them from it before training on. A run killed at
any point therefore resumes to the uninterrupted run's files: killed before last.pt's rename, it redoes
the epoch (every random stream is seeded from (seed, epoch, rank) when the epoch starts,
``seed_epoch``); killed after, it rewrites what the epoch had left to write.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..format import RUN_BASELINE_DIR, RUN_BEST, RUN_LAST, RUN_METRICS_NAME, RUN_SUMMARY_NAME
from ..files import UserError, atomic_write_bytes, atomic_write_json

LAST, BEST, METRICS, SUMMARY, BASELINE = RUN_LAST, RUN_BEST, RUN_METRICS_NAME, RUN_SUMMARY_NAME, RUN_BASELINE_DIR

# Config keys a resumed run may change (how it runs, not what it computes). The split of an epoch over
# (rank, loader worker) is checked apart (``_check_split``): it changes only with --allow-resplit.
RESUME_FREE = {"out", "resume", "device", "compile", "threads", "quiet", "val_shards",
               "compare_hard_labels", "shards", "cache", "allow_resplit", "checkpoint_every"}
SPLIT_KEYS = {"loader_workers"}


def seed_epoch(*key: int) -> None:
    """Seed torch (CPU and CUDA), Python's and numpy's global RNGs from ``key`` (seed, epoch[, rank]):
    called as an epoch starts, so dropout and drop path draw the same numbers whichever process runs
    the epoch (a resumed one included) and nothing needs saving."""
    s = hash(tuple(key)) & 0x7FFFFFFF          # a tuple of ints hashes the same in every process
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def save(path: Path, state: dict, sidecar: dict | None = None) -> None:
    """torch.save to memory, then temp file + rename (a crash never leaves a half-written checkpoint);
    then the sidecar ``path.json``, when given."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())
    if sidecar is not None:
        atomic_write_json(path.with_suffix(".json"), sidecar)


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def check_resume(ckpt: dict, config: dict, data: dict, path: Path, allow_resplit: bool = False) -> str | None:
    """Refuse to resume when the run would compute something else than the checkpointed one. A changed
    split (world size, loader workers) is refused unless ``allow_resplit``; then returns the note
    the summary carries."""
    old = ckpt.get("config", {})
    diff = sorted(k for k in set(old) | set(config) if k.replace("-", "_") not in RESUME_FREE | SPLIT_KEYS
                  and old.get(k) != config.get(k))
    old_data = ckpt.get("data", {})
    diff += sorted(f"data.{k}" for k in set(old_data) | set(data)
                   if k != "world" and old_data.get(k) != data.get(k))
    if diff:
        shown = ", ".join(f"{k} ({_short(_get(old, old_data, k))} -> {_short(_get(config, data, k))})" for k in diff[:6])
        raise UserError(f"cannot resume {path}: the run was started with different {shown}; "
                        f"use the original settings or another --out")
    return _check_split(ckpt, config, data, path, allow_resplit)


def _split(config: dict, data: dict) -> tuple[int | None, int]:
    """(processes, loader workers) of a run; 0 and 1 loader workers split an epoch the same way."""
    return data.get("world"), max(1, int(config.get("loader-workers") or 0))


def _check_split(ckpt: dict, config: dict, data: dict, path: Path, allow: bool) -> str | None:
    (w0, l0), (w1, l1) = _split(ckpt.get("config", {}), ckpt.get("data", {})), _split(config, data)
    if (w0, l0) == (w1, l1):
        return None
    was, now = (f"{w} process(es) x {n} loader worker(s)" for w, n in ((w0, l0), (w1, l1)))
    if not allow:
        raise UserError(f"cannot resume {path}: it was trained with {was}, now {now}, which splits every epoch "
                        f"otherwise; use the original --loader-workers and world size, or pass --allow-resplit")
    return (f"--allow-resplit: resumed after epoch {ckpt.get('epoch')} with {now} instead of {was}: "
            f"the data split and the lr schedule of the remaining epochs were recomputed")


def _get(cfg: dict, data: dict, k: str):
    return data.get(k[5:]) if k.startswith("data.") else cfg.get(k)


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def read_metrics(run_dir: Path) -> list[dict]:
    p = run_dir / METRICS
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    atomic_write_bytes(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows).encode())

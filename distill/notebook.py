"""Notebook readers and figures for the three output directories.

    distill.open_cache(CACHE_DIR)    -> reader.Cache    (tables, records, soft targets, replayed views, show)
    distill.open_filter(FILTER_DIR)  -> FilterOutput    (scores table, summary, show_flagged)
    distill.open_run(RUN_DIR)        -> Run             (metrics DataFrame, summary, plot; .baseline)

Everything reads files only (no teacher, no Ray). Figures are plain ``matplotlib.figure.Figure``
objects made without pyplot, so they work headless and never pile up in pyplot's global state:
``fig.savefig("x.png")``; in Jupyter a figure that ends a cell is drawn inline. matplotlib and pandas
are the ``viz`` extra (``pip install 'distill[viz]'``); a function that needs one says so when it
is missing.
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataclasses import dataclass

from .format import (FILTER_REPORT_NAME, FILTER_SCORING_DIR, RUN_BASELINE_DIR, RUN_CLASS_STATS_NAME, RUN_CONFIG_NAME,
                     RUN_METRICS_NAME, RUN_SUMMARY_NAME, FILTER_SCORES_NAME, Skip, read_filter_summary)
from .files import FormatError, UserError, read_json
from .cache.reader import Cache, _need_pandas, _read_columns, open_cache

__all__ = ["open_cache", "open_filter", "open_run", "student_models", "Cache", "ClassRelations", "FilterOutput", "Run",
           "show_cache_views"]

from .figures import show_cache_views  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------- filter directory

class FilterOutput:
    """A finished filter-labels directory: ``scores.arrow`` (one row per scored sample), ``summary.json``,
    ``report.md`` and the scoring pass's cache (``scoring/``, used to find the source images)."""

    def __init__(self, path: str | os.PathLike, shards_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"filter directory not found: {self.path}")
        self.summary: dict = read_filter_summary(self.path)
        self._shards_dir = shards_dir

    classes = property(lambda self: self.summary["classes"])
    rule = property(lambda self: self.summary["rule"])
    num_samples = property(lambda self: self.summary["samples"])
    num_flagged = property(lambda self: self.summary["dropped"])
    per_class = property(lambda self: self.summary["per_class"])
    report = property(lambda self: self.path / FILTER_REPORT_NAME)

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"FilterOutput({str(self.path)!r}: rule {self.rule}, {self.num_flagged} of {self.num_samples} "
                f"samples flagged, {len(self.classes)} classes)")

    def to_table(self, columns=None) -> pa.Table:
        """The scores: key, shard, label, label_prob, label_rank, topk_idx, topk_prob, margin, keep, reason."""
        return _read_columns(self.path / FILTER_SCORES_NAME, columns)

    def to_pandas(self, columns=None):
        _need_pandas("FilterOutput.to_pandas")
        return self.to_table(columns).to_pandas()

    def flagged(self, n: int | None = None) -> pa.Table:
        """The flagged samples (keep is false), most suspicious first (lowest margin), with class names:
        ``label_name``, ``pred`` (the scorer's top-1) and ``pred_name`` appended."""
        t = self.to_table()
        t = t.filter(pc.invert(t.column("keep")))
        t = t.take(pc.sort_indices(t, [("margin", "ascending"), ("key", "ascending")]))
        if n is not None:
            t = t.slice(0, n)
        k = t.schema.field("topk_idx").type.list_size
        pred = t.column("topk_idx").combine_chunks().values.to_numpy().reshape(-1, k)[:, 0].astype(np.int64)
        names = np.asarray(self.classes, dtype=object)
        t = t.append_column("label_name", pa.array(names[t.column("label").to_numpy()].tolist(), pa.string()))
        t = t.append_column("pred", pa.array(pred.astype(np.int32)))
        return t.append_column("pred_name", pa.array(names[pred].tolist(), pa.string()))

    @cached_property
    def scoring(self) -> Cache:
        """The scoring pass's cache (one centre view per sample): the scorer's identity and the shard paths."""
        return open_cache(self.path / FILTER_SCORING_DIR, self._shards_dir)

    def images(self, keys, shards=None) -> dict:
        """{key: PIL image} of these samples, read from the source shards (``shards``: their shard names,
        looked up in the scores when omitted)."""
        from .data import augment, shards as shardio
        keys = list(keys)
        if shards is None:
            t = self.to_table(["key", "shard"])
            where = dict(zip(t.column("key").to_pylist(), t.column("shard").to_pylist()))
            shards = [where[k] for k in keys]
        want: dict[str, set] = {}
        for k, s in zip(keys, shards):
            want.setdefault(s, set()).add(k)
        out = {}
        for shard, ks in want.items():
            for item in shardio.iter_shard(self.scoring.shard_path(shard)):
                if not isinstance(item, Skip) and item.key in ks:
                    out[item.key] = augment.open_image(item.data)
        return out

    def show_flagged(self, n: int = 24, cols: int = 6):
        """A montage of the ``n`` most suspicious flagged samples: the key (whole: wrapped or in a smaller font
        when long), the image, the given label (red) and the scorer's top-1 (green) by name, with their
        probabilities; with nothing flagged, a short figure that says so and how many were scored.
        Needs ``distill[viz]``."""
        from .figures import show_flagged
        return show_flagged(self, n, cols)


def open_filter(path: str | os.PathLike, shards_dir: str | os.PathLike | None = None) -> FilterOutput:
    """Open a finished filter-labels directory. ``shards_dir``: where the scored shards are now, if they
    moved (needed only for images)."""
    return FilterOutput(path, shards_dir)


# ----------------------------------------------------------------------------- run directory

METRICS_NAME, SUMMARY_NAME, CONFIG_NAME, BASELINE_DIR = RUN_METRICS_NAME, RUN_SUMMARY_NAME, RUN_CONFIG_NAME, RUN_BASELINE_DIR


class Run:
    """A train-student run directory: ``metrics.jsonl`` (one row per epoch), ``summary.json`` (written
    when the run completes), ``config.json``, checkpoints. ``baseline`` is the ``hard-labels/`` run of
    ``--compare-hard-labels`` (None without one). Metrics are re-read on each access, so a notebook can
    follow a run in progress."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"run directory not found: {self.path}")
        if not ((self.path / METRICS_NAME).exists() or (self.path / SUMMARY_NAME).exists()):
            raise UserError(f"{self.path} is not a train-student run directory (no {METRICS_NAME} or {SUMMARY_NAME})")

    @property
    def rows(self) -> list[dict]:
        """The metrics as a list of dicts (epoch, train_loss, lr, val_top1, val_top5, img_s, ...)."""
        p = self.path / METRICS_NAME
        if not p.exists():
            return []
        rows = []
        for i, line in enumerate(p.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise FormatError(f"{p}:{i + 1} is not a JSON line") from None
        return rows

    @property
    def metrics(self):
        """The metrics as a pandas DataFrame, one row per epoch (needs pandas: ``distill[viz]``)."""
        pd = _need_pandas("Run.metrics")
        return pd.DataFrame(self.rows)

    def to_table(self) -> pa.Table:
        rows = self.rows
        return pa.Table.from_pylist(rows) if rows else pa.table({"epoch": pa.array([], pa.int64())})

    def to_pandas(self):
        return self.metrics

    @property
    def summary(self) -> dict | None:
        p = self.path / SUMMARY_NAME
        return read_json(p, "run summary") if p.exists() else None

    @property
    def config(self) -> dict | None:
        p = self.path / CONFIG_NAME
        return read_json(p, "run config") if p.exists() else None

    @property
    def complete(self) -> bool:
        return self.summary is not None

    @property
    def baseline(self) -> "Run | None":
        p = self.path / BASELINE_DIR
        try:
            return Run(p) if p.is_dir() else None
        except UserError:
            return None

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        rows = self.rows
        last = rows[-1] if rows else {}
        acc = f", val top-1 {last['val_top1']:.1f}%" if last.get("val_top1") is not None else ""
        state = "complete" if self.complete else "in progress or stopped"
        base = ", with hard-labels baseline" if self.baseline is not None else ""
        return f"Run({str(self.path)!r}: {len(rows)} epoch(s){acc}, {state}{base})"

    def plot(self):
        """Training losses and validation top-1/top-5 against epoch, one axis per quantity: the soft-target
        loss (a cache run) and the hard-label cross-entropy (the hard-labels baseline, and a cache run's
        ``--alpha`` part) are different numbers and never share an axis; accuracy is shared by both runs
        (the baseline dashed, when there is one). Needs ``distill[viz]``."""
        from .figures import plot_run
        return plot_run(self)

    def class_relations(self, cache: str | os.PathLike | None = None, epochs=(0,),
                        max_records: int = 200_000) -> "ClassRelations":
        """What the student learned of the teacher's class relations (TinyViT §3.3): the Pearson correlation
        between classes' predictions of the student (softmax on the last epoch's validation images, from
        ``class_stats.npz``) beside the teacher's (its cached top-K, densified, over the records of
        ``epochs``, at most ``max_records``), and their agreement (the correlation of the two matrices'
        off-diagonals). ``cache``: the run's own cache by default (a hard-labels baseline uses its parent's)."""
        from .train.relations import agreement, correlation
        p = self.path / RUN_CLASS_STATS_NAME
        if not p.exists():
            raise UserError(f"{self.path} has no {RUN_CLASS_STATS_NAME} (written after the last epoch's validation: "
                            f"train with --val-shards, let the run finish)")
        with np.load(p) as z:
            st = {k: z[k] for k in z.files}
        cache_dir = cache or (self.config or {}).get("cache")
        if cache_dir is None and self.path.name == RUN_BASELINE_DIR:
            cache_dir = (Run(self.path.parent).config or {}).get("cache")
        if cache_dir is None:
            raise UserError(f"{self.path}: no cache to compare with: pass class_relations(cache=CACHE_DIR)")
        c = open_cache(cache_dir)
        ids = st["class_ids"]
        if int(ids.max()) >= c.num_classes:
            raise UserError(f"{cache_dir}: {c.num_classes} classes, but the run tracked class id {int(ids.max())}")
        teacher, n_rec = teacher_class_stats(c, ids, epochs, max_records)
        s_corr, t_corr = correlation(**st), correlation(**teacher)
        names = [c.classes[i] for i in ids]
        return ClassRelations(names, s_corr, t_corr, agreement(s_corr, t_corr), int(st["n"]), n_rec, str(self.path))


def open_run(path: str | os.PathLike) -> Run:
    """Open a train-student run directory (complete or still running)."""
    return Run(path)


@dataclass
class ClassRelations:
    """Class-correlation matrices of a student (validation predictions) and its teacher (cached top-K)."""
    classes: list
    student: np.ndarray
    teacher: np.ndarray
    agreement: float          # Pearson of the two matrices' off-diagonal entries
    student_images: int
    teacher_records: int
    run: str

    def __repr__(self) -> str:
        return (f"ClassRelations({self.run}: {len(self.classes)} classes, agreement {self.agreement:.3f}; "
                f"student on {self.student_images} val images, teacher on {self.teacher_records} cached records)")

    def plot(self):
        """The two matrices side by side, the agreement in the title (needs ``distill[viz]``)."""
        from .figures import plot_class_relations
        return plot_class_relations(self)


def teacher_class_stats(cache: Cache, class_ids: np.ndarray, epochs=(0,), max_records: int = 200_000):
    """The relation sums (``train/relations.py``) of the teacher's densified cached targets (uniform fill)
    over ``epochs``' records, in shard order, stopping after ``max_records``; returns (sums, records)."""
    import torch

    from .train.losses import sparse_to_dense
    from .train.relations import ClassStats
    stats = ClassStats(class_ids)
    for t in cache.iter_tables(epochs=list(epochs), columns=["topk_idx", "topk_prob"]):
        t = t.slice(0, max(0, max_records - stats.n))
        if not t.num_rows:
            break
        k = cache.topk
        idx = torch.from_numpy(pc.list_flatten(t["topk_idx"]).to_numpy().astype(np.int64).reshape(-1, k))
        prob = torch.from_numpy(pc.list_flatten(t["topk_prob"]).to_numpy().astype(np.float32).reshape(-1, k))
        for a in range(0, len(idx), 4096):
            stats.add_probs(sparse_to_dense(idx[a:a + 4096], prob[a:a + 4096], cache.num_classes))
    return stats.arrays(), stats.n


def student_models(latency: bool = False, names: list[str] | None = None) -> pa.Table:
    """The registered students (``distill models``) as a table: name, family, params (1,000-class head),
    gflops (at 224 px), image_size, paper, and with ``latency=True`` the CPU ``latency_ms`` of a batch-1
    forward (median of 10; takes a few seconds per model). ``.to_pandas()`` for a DataFrame."""
    from .models.catalog import describe_models
    try:
        return pa.Table.from_pylist(describe_models(names, latency=latency))
    except ValueError as e:
        raise UserError(str(e)) from None

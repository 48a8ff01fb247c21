"""The cache-teacher worker: one Ray actor per teacher replica; ``CacheWorker.run(task)`` turns one
input shard into its Arrow file (all E epochs of views, top-K per view).

Per shard every image is decoded once (per JPEG draft scale) and all E epoch views are cut from it by
the view loader (``producers.py``: a ``torch.utils.data.DataLoader`` with ``--view-workers`` spawned
processes, or none: then the views are rendered in the worker's thread, and the teacher runs after them)
while the teacher runs on the previous piece. Each piece (k epochs of one block) goes to the teacher in
batches cut the same way whatever the number of producers, so the records do not depend on it.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .. import hooks
from ..data import views
from ..files import UserError
from ..format import ARROW_ENTRY_KEY, ARROW_RUN_ID_KEY, FINGERPRINTS_KEY, SHARD_SKIP_KEY, encode_cache_shard, ipc_bytes
from ..memory import keep_heap
from .producers import ShardReader, Undecodable, ViewLoader, finish_piece, until_decodable



# ----------------------------------------------------------------------------- the worker (runs in a Ray actor)

class Records:
    """The teacher's results of one shard in arrays indexed by (sample, epoch), grown as samples arrive:
    ~4 bytes per class id and probability, not a Python object per record."""

    def __init__(self, epochs: int, topk: int):
        self.epochs, self.topk = epochs, topk
        self.idx = np.zeros((0, epochs, topk), np.int32)
        self.prob = np.zeros((0, epochs, topk), np.float32)
        self.label_prob = np.zeros((0, epochs), np.float32)
        self.seen = np.zeros((0, epochs), bool)

    def _grow(self, n: int) -> None:
        cap = max(n, 2 * len(self.idx), 64)
        for name in ("idx", "prob", "label_prob", "seen"):
            a = getattr(self, name)
            b = np.zeros((cap,) + a.shape[1:], a.dtype)
            b[:len(a)] = a
            setattr(self, name, b)

    def put(self, where: np.ndarray, idx, prob, label_prob) -> None:
        """``where`` (B, 2): (sample, epoch) of each row of idx (B, K), prob (B, K), label_prob (B,)."""
        if len(where) and where[:, 0].max() >= len(self.idx):
            self._grow(int(where[:, 0].max()) + 1)
        s, e = where[:, 0], where[:, 1]
        if self.seen[s, e].any():        # a producer rendered a view twice: a planning bug, never silent
            twice = where[self.seen[s, e]][0]
            raise RuntimeError(f"record (sample {int(twice[0])}, epoch {int(twice[1])}) got teacher output twice")
        self.idx[s, e], self.prob[s, e], self.label_prob[s, e], self.seen[s, e] = idx, prob, label_prob, True

    def arrays(self, n: int):
        """(topk_idx (n, E, K), topk_prob, label_prob) of the first n samples; every record must be there."""
        if n > len(self.idx):
            self._grow(n)
        if not self.seen[:n].all():
            raise RuntimeError(f"{int((~self.seen[:n]).sum())} record(s) of this shard got no teacher output")
        return self.idx[:n], self.prob[:n], self.label_prob[:n]


class CacheWorker:
    """One teacher replica. ``run`` processes one whole shard for all epochs."""

    def __init__(self, *, specs, device, threads, temperature, views_of: dict, epochs, cache_seed, input_size, mean,
                 std, batch_size, topk, num_classes, prob_dtype, precision="fp32", expect=None, exclude=(),
                 view_workers=0, progress=None, outputs="logits", storage_options=None):
        import torch
        from .. import storage, teachers
        if storage_options:
            storage.set_options(storage_options)         # the driver's --storage-options, for s3:// shards
        if threads:
            torch.set_num_threads(threads)
        keep_heap()
        self.device = teachers.resolve_device(device)
        # ``expect``: the driver's identity of each member; a worker that loads other weights is refused
        self.ens = teachers.Ensemble(specs, self.device, temperature, precision=precision, expect=expect,
                                     outputs=outputs)
        self.spec = views.ViewSpec.from_manifest(views_of)     # {'policy': ..., 'view': ...} of the run identity
        self.epochs, self.cache_seed, self.size = epochs, cache_seed, input_size
        self.mean, self.std, self.batch_size, self.topk = tuple(mean), tuple(std), batch_size, topk
        self.num_classes, self.prob_dtype, self.progress = num_classes, prob_dtype, progress
        self.exclude = frozenset(exclude)
        # on a CPU device the loader finishes the views too (with view workers: in parallel, not in this process)
        finish = (self.mean, self.std) if self.device.type == "cpu" else None
        self._loader = lambda: ViewLoader(view_workers, views_of, epochs, input_size, batch_size, finish)
        self.views = self._loader()
        # on a GPU, warm up at the real batch shape: TorchScript's profiling executor (and cuDNN's autotuner)
        # spend their first calls optimising, which would otherwise land in the first shard
        if self.ens.warmup_needed:
            x = torch.zeros(batch_size, 3, input_size, input_size)
            for _ in range(2):
                self.ens(x)

    def probe(self) -> int:
        return self.ens.output_width(self.size)

    def run(self, task: dict) -> dict:
        if hooks.ACTIVE:
            hooks.fire("shard-task")
        t_start = time.perf_counter()
        # images the view loader could not decode: the shard is read again without them
        reader, got, timing = until_decodable(lambda undecodable: self._read(task["path"], undecodable))
        table, entry = self._assemble(task, reader, got)
        return {"name": task["name"], "data": ipc_bytes(table), "entry": entry,
                "decode_s": reader.read_s + timing.pop("render_s"), "wall_s": time.perf_counter() - t_start, **timing}

    def _read(self, path: str, undecodable: dict):
        """One pass over the shard: (reader, records, timing); ``undecodable``: keys skipped with their reason."""
        reader = ShardReader(path, spec=self.spec, epochs=self.epochs, cache_seed=self.cache_seed, size=self.size,
                             num_classes=self.num_classes, exclude=self.exclude, undecodable=undecodable)
        try:
            got, timing = self._consume(self.views.pieces(reader.blocks()), reader.samples)
        except Undecodable:
            raise
        except Exception as e:
            self.views.close()        # the loader may hold this shard's pieces: start it afresh
            self.views = self._loader()
            if isinstance(e, UserError):      # not retried: the teacher's outputs are refused (engine)
                raise UserError(f"{os.path.basename(path)}: {e}") from e
            raise RuntimeError(f"{os.path.basename(path)}: {type(e).__name__}: {e}") from e
        return reader, got, timing

    def _consume(self, pieces, samples) -> tuple["Records", dict]:
        """Finish every piece (normalise, erase, mix, on the teacher's device) and run the teacher on it;
        results land in arrays by (sample, epoch). ``samples``: the reader's (key, ...) per position, to
        name the samples a teacher output NaN for."""
        import torch
        from .. import teachers
        got = Records(self.epochs, self.topk)
        teacher_s, render_s, first_at, last_at, done = 0.0, 0.0, None, None, 0
        pin = self.device.type == "cuda"
        try:
            for p in pieces:
                render_s += p.render_s
                x, where = finish_piece(p, self.mean, self.std, self.device, pin), p.where
                t0 = time.perf_counter()
                first_at = t0 if first_at is None else first_at
                labels = torch.as_tensor(p.labels)
                # a piece larger than --batch-size (a block longer than the batch) goes to the teacher in
                # batches of at most --batch-size, cut the same way for any number of producers
                for lo in range(0, len(x), self.batch_size):
                    hi = lo + self.batch_size
                    i, v, lp = teachers.topk(self._teacher(x[lo:hi], where[lo:hi], samples), self.topk,
                                             labels[lo:hi])
                    got.put(where[lo:hi], i.numpy(), v.numpy(), lp.numpy())
                del x, p
                teacher_s += time.perf_counter() - t0
                done += len(where)
                last_at = time.perf_counter()
                if self.progress is not None:
                    self.progress.add.remote(len(where))
        except Undecodable:
            if self.progress is not None and done:
                self.progress.add.remote(-done)       # the shard is read again: its records count once
            raise
        # steady state: all records over the time from the first batch reaching the teacher to the last leaving it
        return got, {"teacher_s": teacher_s, "steady_records": done, "render_s": render_s,
                     "steady_s": (last_at - first_at) if first_at else 0.0}

    def _teacher(self, x, where, samples):
        """The teacher's probabilities of a batch; NaN or infinity fails the shard naming the samples."""
        from .. import teachers
        try:
            return self.ens(x)
        except teachers.NonFiniteOutput as e:
            keys = sorted({samples[int(s)][0] for s in where[e.rows, 0]})
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            raise UserError(f"{e} (sample(s) {', '.join(keys[:5])}{more}); no record of this shard is "
                            "written") from None

    def close(self) -> None:
        self.views.close()

    def _assemble(self, task: dict, prod: ShardReader, got: "Records"):
        """The shard's Arrow table and its manifest entry (counts, skips, errors, fingerprints, agreement)."""
        samples = prod.samples
        n, E = len(samples), self.epochs
        topk_idx, topk_prob, label_prob = got.arrays(n)
        labels = np.array([s[1] for s in samples], dtype=np.int64)
        table = encode_cache_shard([s[0] for s in samples], labels,
                                   np.array([s[2] for s in samples], dtype=np.uint32).reshape(n, E),
                                   topk_idx, topk_prob, label_prob, num_classes=self.num_classes,
                                   prob_dtype=self.prob_dtype, shard=task["name"],
                                   digests=np.array([s[3] for s in samples], dtype=np.uint32))
        entry = dict(task["entry"], samples=n, records=n * E, excluded=prod.excluded,
                     skipped=[{"key": s.key, "reason": s.reason} for s in prod.skipped if s.key != SHARD_SKIP_KEY],
                     errors=[s.reason for s in prod.skipped if s.key == SHARD_SKIP_KEY],
                     duplicates=sorted(set(prod.duplicates)), **{FINGERPRINTS_KEY: prod.fingerprints()},
                     # the teacher against the given labels: top-1 hits and summed label probability over records
                     agreement={"records": n * E, "top1": int((topk_idx[:, :, 0] == labels[:, None]).sum()) if n else 0,
                                "label_prob_sum": round(float(label_prob.sum(dtype=np.float64)), 6)})
        meta = {**table.schema.metadata, ARROW_ENTRY_KEY: json.dumps(entry).encode(),
                ARROW_RUN_ID_KEY: task["run_id"].encode()}
        return table.replace_schema_metadata(meta), entry

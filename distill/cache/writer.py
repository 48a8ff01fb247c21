"""The cache-teacher worker: one Ray actor per teacher replica; ``CacheWorker.run(task)`` turns one
input shard into its Arrow file (all E epochs of views, top-K per view).

Per shard every image is decoded once (per JPEG draft scale) and all E epoch views are cut from it
by view producers (``producers.py``: threads of the worker, or ``--view-workers`` processes) while
the teacher runs on the previous piece (on a CPU teacher, producer threads take turns, ``CpuGate``).
Each teacher batch is one piece (k epochs of one block), so the records do not depend on the number of
producers.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import numpy as np

from .. import engine
from ..data import views
from ..files import UserError
from ..format import ARROW_ENTRY_KEY, ARROW_RUN_ID_KEY, FINGERPRINTS_KEY, SHARD_SKIP_KEY, encode_cache_shard, ipc_bytes
from ..memory import keep_heap
from .producers import (Block, ProcessProducers, ShardReader, ThreadProducers, Undecodable, finish_pixels,
                        piece_rows, until_decodable)



# ----------------------------------------------------------------------------- the worker (runs in a Ray actor)

class CpuGate:
    """On a CPU teacher, views and the teacher's forward take turns instead of overlapping.

    The teacher's intra-op threads already use every core of the worker; a producer thread running at
    the same time preempts one of them and the others wait at the next barrier, so overlap loses more
    than it gains. Producers hold the gate in shared mode around each view; the teacher holds it
    exclusively (and is preferred) for each forward. On GPU there is no gate: views overlap the GPU."""

    def __init__(self):
        self._cond = threading.Condition()
        self._producers = 0
        self._teacher = self._teacher_waiting = False

    @contextlib.contextmanager
    def producer(self):
        with self._cond:
            while self._teacher or self._teacher_waiting:
                self._cond.wait()
            self._producers += 1
        try:
            yield
        finally:
            with self._cond:
                self._producers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def teacher(self):
        with self._cond:
            self._teacher_waiting = True
            while self._producers:
                self._cond.wait()
            self._teacher, self._teacher_waiting = True, False
        try:
            yield
        finally:
            with self._cond:
                self._teacher = False
                self._cond.notify_all()


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
                 decode_threads=1, view_workers=0, progress=None, outputs="logits"):
        import torch
        from .. import teachers
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
        self.decode_threads = decode_threads
        # on a CPU device the producers finish the views too (in parallel, not in this process)
        self.finish = (self.mean, self.std) if self.device.type == "cpu" else None
        self.producers = (ProcessProducers(view_workers, views_of, epochs, input_size, batch_size, self.finish)
                          if view_workers > 0 else None)
        # on a GPU, warm up at the real batch shape: TorchScript's profiling executor (and cuDNN's autotuner)
        # spend their first calls optimising, which would otherwise land in the first shard
        if self.ens.warmup_needed:
            x = torch.zeros(batch_size, 3, input_size, input_size)
            for _ in range(2):
                self.ens(x)

    def probe(self) -> int:
        return self.ens.output_width(self.size)

    def run(self, task: dict) -> dict:
        engine.maybe_inject_fault()
        t_start = time.perf_counter()
        # images producer processes could not decode: the shard is read again without them
        reader, got, timing = until_decodable(lambda undecodable: self._read(task["path"], undecodable))
        table, entry = self._assemble(task, reader, got)
        return {"name": task["name"], "data": ipc_bytes(table), "entry": entry,
                "decode_s": reader.read_s + timing.pop("render_s"), "wall_s": time.perf_counter() - t_start, **timing}

    def _read(self, path: str, undecodable: dict):
        """One pass over the shard: (reader, records, timing); ``undecodable``: keys skipped with their reason."""
        gate = CpuGate() if self.device.type == "cpu" and self.producers is None and not self.ens.off_cpu else None
        reader = ShardReader(path, spec=self.spec, epochs=self.epochs, cache_seed=self.cache_seed, size=self.size,
                             num_classes=self.num_classes, exclude=self.exclude, decoded=self.producers is None,
                             guard=gate.producer if gate else None, undecodable=undecodable)
        blocks: dict[int, Block] = {}
        prod = self.producers or ThreadProducers(self.decode_threads, gate)
        try:
            pieces = prod.pieces(kept(reader.blocks(), blocks), self.spec, self.epochs, self.size, self.batch_size)
            got, timing = self._consume(pieces, blocks, gate, prod.release, reader.samples)
        except Undecodable:
            raise
        except Exception as e:
            if self.producers is not None:    # producers may hold this shard's pieces: start them afresh
                self.producers.close()
                self.producers = ProcessProducers(self.producers.n, self.producers.spec_of, self.epochs,
                                                  self.size, self.batch_size, self.finish)
            if isinstance(e, UserError):      # not retried: the teacher's outputs are refused (engine)
                raise UserError(f"{os.path.basename(path)}: {e}") from e
            raise RuntimeError(f"{os.path.basename(path)}: {type(e).__name__}: {e}") from e
        return reader, got, timing

    def _consume(self, pieces, blocks: dict, gate: CpuGate | None, release, samples) -> tuple["Records", dict]:
        """Finish every piece (normalise, erase, mix, on the teacher's device) and run the teacher on it;
        results land in arrays by (sample, epoch); ``release(piece)`` once the teacher is done with it.
        ``samples``: the reader's (key, ...) per position, to name the samples a teacher output NaN for."""
        import torch
        from .. import teachers
        got = Records(self.epochs, self.topk)
        teacher_s, render_s, first_at, last_at, done = 0.0, 0.0, None, None, 0
        pin = self.device.type == "cuda"
        try:
            for p in pieces:
                render_s += p.decode_s
                x, labels, where = take_piece(p, blocks, self.spec, self.epochs, self.mean, self.std, self.device, pin)
                t0 = time.perf_counter()
                first_at = t0 if first_at is None else first_at
                labels = torch.as_tensor(labels)
                # a piece larger than --batch-size (a block longer than the batch) goes to the teacher in
                # batches of at most --batch-size, cut the same way for any number of producers
                for lo in range(0, len(x), self.batch_size):
                    hi = lo + self.batch_size
                    with gate.teacher() if gate else contextlib.nullcontext():
                        i, v, lp = teachers.topk(self._teacher(x[lo:hi], where[lo:hi], samples), self.topk,
                                                 labels[lo:hi])
                    got.put(where[lo:hi], i.numpy(), v.numpy(), lp.numpy())
                del x
                release(p)
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
        if self.producers is not None:
            self.producers.close()

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


def take_piece(p, blocks: dict, spec: views.ViewSpec, epochs: int, mean, std, device, pin: bool = False):
    """(views (B, 3, H, W) float32 on ``device``, labels, (position, epoch) rows) of a piece, finished here
    unless its producer finished it; a block's parameters computed by its producer arrive with its first piece."""
    b = blocks[p.block]
    if p.params is not None:
        b.params = p.params
    x = p.pixels.to(device) if p.finished else finish_pixels(p, b, spec, epochs, mean, std, device, pin)
    return (x, *piece_rows(p, b, epochs))


def kept(it, blocks: dict):
    """Pass the reader's blocks on, keeping each one's labels, seeds and parameters in ``blocks`` for finishing."""
    for b in it:
        blocks[b.index] = Block(b.index, b.start, b.labels, b.seeds, b.params)
        yield b

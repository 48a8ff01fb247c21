"""The cache-teacher worker: one Ray actor per teacher replica; ``CacheWorker.run(task)`` turns one
input shard into its Arrow file (all E epochs of views, top-K per view).

Per shard every image is decoded once (per JPEG draft scale) and all E epoch views are cut from it;
producer threads (``--decode-threads``) decode/augment into batches while the teacher runs on the
previous batch (on a CPU teacher they take turns, ``CpuGate``).
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time

import numpy as np

from .. import engine
from ..data import augment, shards as shardio, views
from ..format import (ARROW_ENTRY_KEY, ARROW_RUN_ID_KEY, DUPLICATE_KEY_REASON, FINGERPRINTS_KEY, SHARD_SKIP_KEY, Skip, encode_cache_shard,
                      ipc_bytes)

FINGERPRINT_SAMPLES = 2     # samples per shard whose first/last epoch views are fingerprinted


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


class ViewProducer:
    """Reads a shard and puts (batch tensor, labels, [(sample, epoch)]) on a queue, block by block.

    Samples are grouped in blocks of ``policy.mix_block`` valid samples (the unit of mix pairing);
    for each epoch the block's views are made (and mixed), so memory holds one block of decoded
    images and one batch of views per thread. ``threads`` decode/augment threads take whole blocks
    in turn (a GPU teacher needs several cores of views); each puts ``None`` on the queue when done.
    Records are keyed by (sample, epoch), so the order batches arrive in does not matter."""

    def __init__(self, path, *, spec: views.ViewSpec, epochs, cache_seed, size, mean, std, batch_size, num_classes,
                 exclude, out_queue, samples: list, threads: int = 1, gate: CpuGate | None = None):
        self.threads = max(1, threads)
        self.gate = gate
        self.path, self.spec, self.epochs, self.cache_seed = path, spec, epochs, cache_seed
        self.size, self.mean, self.std, self.batch_size = size, mean, std, batch_size
        self.num_classes, self.exclude, self.q = num_classes, exclude, out_queue
        self.samples = samples              # appended: (key, label, seeds) in output order
        self.skipped: list[Skip] = []
        self.duplicates: list[str] = []
        self.fingerprints: list[dict] = []
        self.excluded = 0
        self.error: str | None = None
        self.decode_s = 0.0

    def start(self) -> None:
        self._gen = self._blocks()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)]
        for t in self._workers:
            t.start()

    def join(self) -> None:
        for t in self._workers:
            t.join()

    def _next_block(self):
        with self._lock:
            return next(self._gen, None)

    def _work(self):
        import torch
        try:
            batch, meta = [], []

            def flush():
                if batch:
                    self.q.put((torch.stack(batch), [m[2] for m in meta], [(m[0], m[1]) for m in meta]))
                    batch.clear()
                    meta.clear()

            while (block := self._next_block()) is not None:
                t0 = time.perf_counter()
                srcs = [b[2] for b in block]
                for e in range(self.epochs):
                    made = views.block_views(self.spec, srcs, [b[3][e] for b in block], self.size, self.mean,
                                             self.std, params_=[b[4][e] for b in block],
                                             guard=self.gate.producer if self.gate else None)
                    for v, b in zip(made, block):
                        batch.append(v)
                        meta.append((b[0], e, b[1]))
                        if len(batch) == self.batch_size:
                            self.decode_s += time.perf_counter() - t0
                            flush()
                            t0 = time.perf_counter()
                self.decode_s += time.perf_counter() - t0
            flush()
        except BaseException as e:  # surfaced by the consumer
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.q.put(None)

    def _blocks(self):
        """Yield lists of valid samples: (index, label, SourceImage, seeds, params per epoch)."""
        block = []
        for item in shardio.iter_shard(self.path):
            t0 = time.perf_counter()
            if isinstance(item, Skip):
                if item.reason.startswith(DUPLICATE_KEY_REASON):
                    self.duplicates.append(item.key)   # fails the run, naming key and shard (like duplicates across shards)
                else:
                    self.skipped.append(item)
                continue
            key = item.key
            if key in self.exclude:
                self.excluded += 1
                continue
            reason = shardio.check_label(item.label, self.num_classes)
            if reason:
                self.skipped.append(Skip(key, reason, item_shard(self.path)))
                continue
            try:
                src = augment.SourceImage(item.data)
                seeds = [augment.derive_seed(self.cache_seed, e, key) for e in range(self.epochs)]
                params = [views.params(self.spec, s, src) for s in seeds]
                src.at(min(augment.draft_factor(p, self.size) for p in params))   # the finest decode any epoch needs
            except Exception as e:
                self.skipped.append(Skip(key, f"cannot decode image: {type(e).__name__}: {e}", item_shard(self.path)))
                continue
            self.decode_s += time.perf_counter() - t0
            idx = len(self.samples)
            if idx < FINGERPRINT_SAMPLES:
                self._fingerprint(key, src, seeds)
            self.samples.append((key, item.label, seeds))
            block.append((idx, item.label, src, seeds, params))
            if len(block) == self.spec.policy.mix_block:
                yield block
                block = []
        if block:
            yield block


    def _fingerprint(self, key: str, src, seeds: list[int]) -> None:
        """Record the pixels of this sample's first and last epoch views (manifest ``view_fingerprints``)."""
        for e in sorted({0, self.epochs - 1}):
            self.fingerprints.append({"key": key, "epoch": e, "seed": int(seeds[e]), "size": self.size,
                                      "sha256": views.fingerprint(self.spec, seeds[e], src, self.size)})


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
        self.idx[s, e], self.prob[s, e], self.label_prob[s, e], self.seen[s, e] = idx, prob, label_prob, True

    def arrays(self, n: int):
        """(topk_idx (n, E, K), topk_prob, label_prob) of the first n samples; every record must be there."""
        if n > len(self.idx):
            self._grow(n)
        if not self.seen[:n].all():
            raise RuntimeError(f"{int((~self.seen[:n]).sum())} record(s) of this shard got no teacher output")
        return self.idx[:n], self.prob[:n], self.label_prob[:n]


def item_shard(path) -> str:
    return os.path.basename(str(path))


class CacheWorker:
    """One teacher replica. ``run`` processes one whole shard for all epochs."""

    def __init__(self, *, specs, device, threads, temperature, views_of: dict, epochs, cache_seed, input_size, mean,
                 std, batch_size, topk, num_classes, prob_dtype, precision="fp32", expect=None, exclude=(),
                 decode_threads=1, progress=None):
        import torch
        from .. import teachers
        if threads:
            torch.set_num_threads(threads)
        self.device = teachers.resolve_device(device)
        # ``expect``: the driver's identity of each member; a worker that loads other weights is refused
        self.ens = teachers.Ensemble(specs, self.device, temperature, precision=precision, expect=expect)
        self.spec = views.ViewSpec.from_manifest(views_of)     # {'policy': ..., 'view': ...} of the run identity
        self.epochs, self.cache_seed, self.size = epochs, cache_seed, input_size
        self.mean, self.std, self.batch_size, self.topk = tuple(mean), tuple(std), batch_size, topk
        self.num_classes, self.prob_dtype, self.progress = num_classes, prob_dtype, progress
        self.exclude = frozenset(exclude)
        self.decode_threads = decode_threads
        # warm up at the real batch shape: TorchScript's profiling executor (and cuDNN's autotuner)
        # spend their first calls optimising, which would otherwise land in the first shard
        x = torch.zeros(batch_size, 3, input_size, input_size)
        for _ in range(2):
            self.ens(x)

    def probe(self) -> int:
        return self.ens.output_width(self.size)

    def run(self, task: dict) -> dict:
        engine.maybe_inject_fault()
        t_start = time.perf_counter()
        path = task["path"]
        q: queue.Queue = queue.Queue(maxsize=4)
        samples: list = []
        gate = CpuGate() if self.device.type == "cpu" else None
        prod = ViewProducer(path, spec=self.spec, epochs=self.epochs, cache_seed=self.cache_seed,
                            size=self.size, mean=self.mean, std=self.std, batch_size=self.batch_size,
                            num_classes=self.num_classes, exclude=self.exclude, out_queue=q, samples=samples,
                            threads=self.decode_threads, gate=gate)
        prod.start()
        got, timing = self._consume(q, prod.threads, gate)
        prod.join()
        if prod.error:
            raise RuntimeError(f"{os.path.basename(path)}: {prod.error}")
        table, entry = self._assemble(task, prod, samples, got)
        return {"name": task["name"], "data": ipc_bytes(table), "entry": entry,
                "decode_s": prod.decode_s, "wall_s": time.perf_counter() - t_start, **timing}

    def _consume(self, q: queue.Queue, running: int, gate: CpuGate | None) -> tuple["Records", dict]:
        """Run the teacher on every batch the producers queue; results land in arrays by (sample, epoch)."""
        import torch
        from .. import teachers
        got = Records(self.epochs, self.topk)
        teacher_s, first_at, last_at, done = 0.0, None, None, 0
        while running:
            item = q.get()
            if item is None:
                running -= 1
                continue
            x, labels, where = item
            t0 = time.perf_counter()
            first_at = t0 if first_at is None else first_at
            with gate.teacher() if gate else contextlib.nullcontext():
                i, v, lp = teachers.topk(self.ens(x), self.topk, torch.as_tensor(labels))
            teacher_s += time.perf_counter() - t0
            done += len(where)
            last_at = time.perf_counter()
            got.put(np.asarray(where, dtype=np.int64).reshape(-1, 2), i.numpy(), v.numpy(), lp.numpy())
            if self.progress is not None:
                self.progress.add.remote(len(where))
        # steady state: all records over the time from the first batch reaching the teacher to the last leaving it
        return got, {"teacher_s": teacher_s, "steady_records": done,
                     "steady_s": (last_at - first_at) if first_at else 0.0}

    def _assemble(self, task: dict, prod: ViewProducer, samples: list, got: dict):
        """The shard's Arrow table and its manifest entry (counts, skips, errors, fingerprints, agreement)."""
        n, E = len(samples), self.epochs
        topk_idx, topk_prob, label_prob = got.arrays(n)
        labels = np.array([s[1] for s in samples], dtype=np.int64)
        table = encode_cache_shard([s[0] for s in samples], labels,
                                   np.array([s[2] for s in samples], dtype=np.uint32).reshape(n, E),
                                   topk_idx, topk_prob, label_prob, num_classes=self.num_classes,
                                   prob_dtype=self.prob_dtype, shard=task["name"])
        entry = dict(task["entry"], samples=n, records=n * E, excluded=prod.excluded,
                     skipped=[{"key": s.key, "reason": s.reason} for s in prod.skipped if s.key != SHARD_SKIP_KEY],
                     errors=[s.reason for s in prod.skipped if s.key == SHARD_SKIP_KEY],
                     duplicates=sorted(set(prod.duplicates)), **{FINGERPRINTS_KEY: prod.fingerprints},
                     # the teacher against the given labels: top-1 hits and summed label probability over records
                     agreement={"records": n * E, "top1": int((topk_idx[:, :, 0] == labels[:, None]).sum()) if n else 0,
                                "label_prob_sum": round(float(label_prob.sum(dtype=np.float64)), 6)})
        meta = {**table.schema.metadata, ARROW_ENTRY_KEY: json.dumps(entry).encode(),
                ARROW_RUN_ID_KEY: task["run_id"].encode()}
        return table.replace_schema_metadata(meta), entry

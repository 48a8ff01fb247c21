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
from ..format import Skip, encode_cache_shard, ipc_bytes


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

    def __init__(self, path, *, policy, epochs, cache_seed, size, mean, std, batch_size, num_classes,
                 exclude, out_queue, samples: list, center_crop: float | None = None, threads: int = 1,
                 gate: CpuGate | None = None):
        self.threads = max(1, threads)
        self.gate = gate
        self.center_crop = center_crop
        self.path, self.policy, self.epochs, self.cache_seed = path, policy, epochs, cache_seed
        self.size, self.mean, self.std, self.batch_size = size, mean, std, batch_size
        self.num_classes, self.exclude, self.q = num_classes, exclude, out_queue
        self.samples = samples              # appended: (key, label, seeds) in output order
        self.skipped: list[Skip] = []
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
                    made = views.block_views(self.policy, srcs, [b[4][e] for b in block], [b[3][e] for b in block],
                                               self.size, self.mean, self.std,
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
        seen = set()
        for item in shardio.iter_shard(self.path):
            t0 = time.perf_counter()
            if isinstance(item, Skip):
                self.skipped.append(item)
                continue
            key = item.key
            if key in seen:
                self.skipped.append(Skip(key, "duplicate key inside the shard", item_shard(self.path)))
                continue
            seen.add(key)
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
                if self.center_crop:
                    params = [augment.decode_center(src.width, src.height, self.center_crop)] * self.epochs
                else:
                    params = [augment.decode(self.policy, s, src.width, src.height) for s in seeds]
                src.at(min(augment.draft_factor(p, self.size) for p in params))   # the finest decode any epoch needs
            except Exception as e:
                self.skipped.append(Skip(key, f"cannot decode image: {type(e).__name__}: {e}", item_shard(self.path)))
                continue
            self.decode_s += time.perf_counter() - t0
            idx = len(self.samples)
            self.samples.append((key, item.label, seeds))
            block.append((idx, item.label, src, seeds, params))
            if len(block) == self.policy.mix_block:
                yield block
                block = []
        if block:
            yield block


def item_shard(path) -> str:
    return os.path.basename(str(path))


class CacheWorker:
    """One teacher replica. ``run`` processes one whole shard for all epochs."""

    def __init__(self, *, specs, device, threads, temperature, policy, epochs, cache_seed, input_size, mean, std,
                 batch_size, topk, num_classes, prob_dtype, exclude=(), center_crop=None, decode_threads=1,
                 progress=None):
        import torch
        from .. import teachers
        if threads:
            torch.set_num_threads(threads)
        self.device = teachers.resolve_device(device)
        self.ens = teachers.Ensemble(specs, self.device, temperature)
        self.policy = augment.Policy.from_dict(policy)
        self.epochs, self.cache_seed, self.size = epochs, cache_seed, input_size
        self.mean, self.std, self.batch_size, self.topk = tuple(mean), tuple(std), batch_size, topk
        self.num_classes, self.prob_dtype, self.progress = num_classes, prob_dtype, progress
        self.exclude = frozenset(exclude)
        self.center_crop = center_crop
        self.decode_threads = decode_threads
        # warm up at the real batch shape: TorchScript's profiling executor (and cuDNN's autotuner)
        # spend their first calls optimising, which would otherwise land in the first shard
        x = torch.zeros(batch_size, 3, input_size, input_size)
        for _ in range(2):
            self.ens(x)

    def probe(self) -> int:
        return self.ens.output_width(self.size)

    def run(self, task: dict) -> dict:
        import torch
        from .. import teachers
        engine.maybe_inject_fault()
        t_start = time.perf_counter()
        path = task["path"]
        q: queue.Queue = queue.Queue(maxsize=4)
        samples: list = []
        gate = CpuGate() if self.device.type == "cpu" else None
        prod = ViewProducer(path, policy=self.policy, epochs=self.epochs, cache_seed=self.cache_seed,
                            size=self.size, mean=self.mean, std=self.std, batch_size=self.batch_size,
                            num_classes=self.num_classes, exclude=self.exclude,
                            out_queue=q, samples=samples, center_crop=self.center_crop,
                            threads=self.decode_threads, gate=gate)
        prod.start()
        running = prod.threads
        ids, probs, lprobs = {}, {}, {}
        teacher_s = 0.0
        first_at, last_at, done = None, None, 0
        while running:
            item = q.get()
            if item is None:
                running -= 1
                continue
            x, labels, where = item
            t0 = time.perf_counter()
            if first_at is None:
                first_at = t0
            with gate.teacher() if gate else contextlib.nullcontext():
                p = self.ens(x)
                i, v, lp = teachers.topk(p, self.topk, torch.as_tensor(labels))
            teacher_s += time.perf_counter() - t0
            done += len(where)
            last_at = time.perf_counter()
            i, v, lp = i.numpy(), v.numpy(), lp.numpy()
            for r, (s, e) in enumerate(where):
                ids[s, e], probs[s, e], lprobs[s, e] = i[r], v[r], lp[r]
            if self.progress is not None:
                self.progress.add.remote(len(where))
        prod.join()
        if prod.error:
            raise RuntimeError(f"{os.path.basename(path)}: {prod.error}")
        n, E, K = len(samples), self.epochs, self.topk
        skipped = [s for s in prod.skipped if s.key != "*"]
        errors = [s.reason for s in prod.skipped if s.key == "*"]
        topk_idx = np.zeros((n, E, K), np.int64)
        topk_prob = np.zeros((n, E, K), np.float32)
        label_prob = np.zeros((n, E), np.float32)
        for (s, e), v in ids.items():
            topk_idx[s, e], topk_prob[s, e], label_prob[s, e] = v, probs[s, e], lprobs[s, e]
        table = encode_cache_shard([s[0] for s in samples], [s[1] for s in samples],
                                   np.array([s[2] for s in samples], dtype=np.uint32).reshape(n, E),
                                   topk_idx, topk_prob, label_prob, num_classes=self.num_classes,
                                   prob_dtype=self.prob_dtype, shard=task["name"])
        entry = dict(task["entry"], samples=n, records=n * E, excluded=prod.excluded,
                     skipped=[{"key": s.key, "reason": s.reason} for s in skipped], errors=errors)
        table = table.replace_schema_metadata({**table.schema.metadata, b"entry": json.dumps(entry).encode(),
                                               b"run_id": task["run_id"].encode()})
        return {"name": task["name"], "data": ipc_bytes(table), "entry": entry,
                "teacher_s": teacher_s, "decode_s": prod.decode_s, "wall_s": time.perf_counter() - t_start,
                # steady state: all records over the time from the first batch reaching the teacher to the last leaving it
                "steady_records": done, "steady_s": (last_at - first_at) if first_at else 0.0}

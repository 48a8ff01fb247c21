"""View producers of the cache-teacher worker: a shard's samples -> uint8 views -> teacher batches.

The worker's reader thread reads the shard in order, checks each sample (excluded, label, duplicate,
decodable) and cuts the valid ones into blocks of ``policy.mix_block`` positions (the unit of mix
pairing). A producer takes a whole block: it decodes each image once (at the finest JPEG draft
scale any of its epochs needs) and renders all E epoch views of the block as uint8, ``k`` epochs
at a time (``k = max(1, batch_size // block length)``), so one *piece* = k epochs of one block.
Each piece is finished (normalisation, random erasing, mixing) on the teacher's device: by the worker
on a GPU, by the producer process itself on a CPU device. The teacher runs on one piece at a time, cut
into batches of at most ``batch_size`` the same way for every piece: **a teacher batch never depends on
the number of producers** or the order pieces arrive in, so the records are byte-identical for every N.
Producer processes compute the block's view parameters themselves (the reader only checks, seeds and
positions) and send them back with the block's first piece.

Producers are threads of the worker (``--view-workers 0``: on a CPU they take turns with the
teacher, ``CpuGate``) or processes (``--view-workers N``). Processes are started with ``spawn``:
a Ray actor is a multi-threaded process (its core worker runs gRPC and event-loop threads), and a
forked child would inherit their locks in whatever state they were; a spawned child starts a clean
interpreter, imports only this module's dependencies (torch, Pillow, numpy), never Ray, and runs with
one torch thread whatever ``OMP_NUM_THREADS`` Ray set for the actor. The uint8 pieces travel back
through torch's shared-memory queues (no pickled pixel copies).

With processes, the reader only parses each image's header and the producer decodes it, once. An
image that does not decode there cannot be skipped any more (its position, and with it the mix
pairing of its block, is taken): the producer reports it (``Undecodable``), the worker lets the
blocks in flight finish, and reads the shard again with that key skipped for the very reason the
in-process path records (the same calls raise the same error). A shard with k such images is read
k + 1 times at most; the records and skips equal the in-process path's.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from ..data import augment, shards as shardio, views
from ..files import error_text
from ..format import DUPLICATE_KEY_REASON, Skip, sample_digest

FINGERPRINT_SAMPLES = 2     # samples per shard whose first/last epoch views are fingerprinted


def undecodable_reason(e: BaseException) -> str:
    """The skip reason of an image that does not decode (the reader's and the producers' alike; no address,
    so the same shard gives the same bytes in every run, embedded or on a cluster, with any --view-workers)."""
    return f"cannot decode image: {error_text(e)}"


class Undecodable(Exception):
    """Images a producer process could not decode ({key: reason}): the shard is read again without them."""

    def __init__(self, bad: dict):
        super().__init__(f"{len(bad)} image(s) do not decode: {', '.join(bad)}")
        self.bad = bad


def until_decodable(attempt):
    """``attempt(undecodable)`` (one read of a shard, skipping the keys of ``undecodable`` {key: reason}),
    repeated with the images producer processes could not decode until none is left."""
    undecodable: dict[str, str] = {}
    while True:
        try:
            return attempt(undecodable)
        except Undecodable as e:
            undecodable.update(e.bad)


@dataclass
class Block:
    """One block of valid samples: their first position, labels, seeds (per epoch), view parameters
    (per epoch) and image bytes, or (in-process) the decoded ``SourceImage``."""
    index: int
    start: int
    labels: list
    seeds: list
    params: list
    keys: list = field(default_factory=list)
    data: list = field(default_factory=list)      # encoded bytes (for producer processes)
    srcs: list = field(default_factory=list)      # SourceImage, already decoded (in-process producers)


@dataclass
class Piece:
    """k epochs of one block, rendered: ``pixels`` uint8 (k * n, H, W, 3), epoch-major, or, when
    ``finished``, the views already normalised, erased and mixed: float32 (k * n, 3, H, W). ``params``:
    the block's view parameters, on the first piece of a block whose parameters the producer computed."""
    block: int
    epoch0: int
    pixels: object
    decode_s: float = 0.0
    finished: bool = False
    params: list | None = None
    slot: tuple | None = None      # (producer, buffer) of a producer process's reusable shared memory


def epochs_per_piece(batch_size: int, block_len: int, epochs: int) -> int:
    return max(1, min(epochs, batch_size // max(1, block_len)))


def tasks_of(blocks, producers: int, epochs: int, batch_size: int, min_epochs: int | None = None):
    """The producers' tasks (block, lo, hi), epochs [lo, hi) of a block, in the reader's order: whole
    blocks while the shard has more than a round of them ahead; the last blocks cut by epoch ranges.

    With whole blocks a shard ends in a drain: B blocks on P producers take ceil(B / P) rounds, and in the
    last one only B mod P producers work (an ImageNet-21K shard, ~22 blocks of 64 x 90 epochs, on 15
    producers: 22 / 30 = 73% of their time). So every round of ``producers`` tasks (they start a shard
    together) is sized ceil(views left / producers) in epochs, which cuts blocks once the reader is through
    the shard (it reads ``producers`` + 1 blocks ahead, headers only): the last round's blocks are shared
    out (after one round of whole blocks: 90 + 42 epochs each instead of 90 + 90 for some). A cut costs its
    producer one more decode and parameter pass of the block (~1.5 views' time per image), hence at least
    ``min_epochs`` (E / 8) per task. Cuts fall on multiples of k (epochs per piece): the pieces, and with
    them the records, stay what they are."""
    import collections
    min_epochs = max(1, -(-epochs // 8)) if min_epochs is None else min_epochs
    ahead: collections.deque = collections.deque()        # [block, first epoch not handed out]
    it, done, size, sent = iter(blocks), False, epochs, 0
    while True:
        while not done and len(ahead) <= producers:
            b = next(it, None)
            if b is None:
                done = True
            else:
                ahead.append([b, 0])
        if not ahead:
            return
        b, lo = ahead[0]
        n = len(b.labels)
        k = epochs_per_piece(batch_size, n, epochs)
        if sent % producers == 0:      # a new round (all producers start the shard together): views left,
            # shared by every producer; while the reader is not through, more than a round of whole blocks
            left = sum(len(x.labels) * (epochs - e) for x, e in ahead)
            size = max(-(-left // (producers * n)), min_epochs, k)
        sent += 1
        hi = epochs
        if done:
            hi = min(epochs, lo + -(-size // k) * k)
            if epochs - hi < max(min_epochs, k):     # no sliver left behind
                hi = epochs
        if hi == epochs:
            ahead.popleft()
        else:
            ahead[0][1] = hi
        yield b, lo, hi


def render_block(block: Block, spec: views.ViewSpec, epochs: int, size: int, k: int, guard=None, alloc=None,
                 lo: int = 0, hi: int | None = None):
    """Yield the block's pieces of epochs [lo, hi) (k epochs each from ``lo``, a multiple of k; the last one
    may hold fewer). A block read without view parameters (producer processes) gets them here, all epochs'
    (the decode scale is the finest any epoch needs, whatever the range), from its seeds and images, and
    the first piece carries them back. ``alloc(shape, dtype)``: where the pixels go (default: a new tensor)."""
    import torch
    t0 = time.perf_counter()
    srcs, computed = block.srcs, None
    if not srcs:
        srcs, bad = [], {}
        if not block.params:
            computed = block.params = [[] for _ in block.data]
        for key, data, seeds, params in zip(block.keys, block.data, block.seeds, block.params):
            try:          # the reader's in-process calls, in the same order: the same error and reason
                src = augment.SourceImage(data)
                if computed is not None:
                    params.extend(views.params(spec, s, src) for s in seeds)
                src.at(min(augment.draft_factor(p, size) for p in params))
            except Exception as e:  # noqa: BLE001 - recorded as the sample's skip reason
                bad[key] = undecodable_reason(e)
                continue
            srcs.append(src)
        if bad:
            raise Undecodable(bad)
    decode_s = time.perf_counter() - t0
    n = len(srcs)
    hi = epochs if hi is None else hi
    for e0 in range(lo, hi, k):
        t0 = time.perf_counter()
        es = range(e0, min(hi, e0 + k))
        pixels = (alloc or torch.empty)((len(es) * n, size, size, 3), dtype=torch.uint8)
        out = pixels.numpy()
        for j, e in enumerate(es):
            for i, src in enumerate(srcs):
                if guard is None:
                    img = augment.render(src, block.params[i][e], size)
                else:
                    with guard():
                        img = augment.render(src, block.params[i][e], size)
                out[j * n + i] = img.convert("RGB") if img.mode != "RGB" else img
        yield Piece(block.index, e0, pixels, decode_s + time.perf_counter() - t0, params=computed)
        decode_s, computed = 0.0, None


def finish_pixels(p: Piece, b: Block, spec: views.ViewSpec, epochs: int, mean, std, device, pin: bool = False,
                  out=None):
    """The views of a rendered piece, float32 (B, 3, H, W) on ``device`` (``augment.finish``: each
    block's views mixed with partners of the same block and epoch; ``out``: a tensor to fill)."""
    n = len(b.labels)
    es = range(p.epoch0, min(epochs, p.epoch0 + p.pixels.shape[0] // n))
    params, plans, partners = [], [], []
    for j, e in enumerate(es):
        params += [b.params[i][e] for i in range(n)]
        block = views.block_plan(spec, [s[e] for s in b.seeds]) if spec.mixing else [None] * n
        plans += block
        partners += [None if pl is None else j * n + pl["partner"] for pl in block]
    px = p.pixels.pin_memory() if pin else p.pixels
    return augment.finish(px, params, plans, mean, std, device=device, partner_rows=partners, out=out)


def piece_rows(p: Piece, b: Block, epochs: int):
    """(labels, (position, epoch) rows) of a piece's views, in their order."""
    import numpy as np
    n = len(b.labels)
    es = range(p.epoch0, min(epochs, p.epoch0 + p.pixels.shape[0] // n))
    where = np.array([(b.start + i, e) for e in es for i in range(n)], dtype=np.int64).reshape(-1, 2)
    return [b.labels[i] for _ in es for i in range(n)], where


# ----------------------------------------------------------------------------- the reader

class ShardReader:
    """Reads one shard in order into blocks of valid samples; records skips, duplicates, exclusions
    and the keys/labels/seeds of the positions (``samples``: (key, label, seeds, ``sample_digest``) in
    position order)."""

    def __init__(self, path, *, spec: views.ViewSpec, epochs: int, cache_seed: int, size: int, num_classes: int,
                 exclude, decoded: bool, guard=None, undecodable: dict | None = None):
        self.path, self.spec, self.epochs, self.cache_seed, self.size = path, spec, epochs, cache_seed, size
        self.undecodable = undecodable or {}    # {key: reason}: skipped as the in-process path would
        # ``guard``: entered around each image's decode (a CPU teacher's gate: decoding must not run
        # beside the teacher's forward, whose threads already hold every core)
        self.guard = guard or contextlib.nullcontext
        self.num_classes, self.exclude, self.decoded = num_classes, exclude, decoded
        self.samples: list = []
        self.skipped: list[Skip] = []
        self.duplicates: list[str] = []
        self.excluded = 0
        self.read_s = 0.0
        self.first_srcs: list = []          # SourceImages of the fingerprinted samples

    def blocks(self):
        block: Block | None = None
        t0 = time.perf_counter()
        for item in shardio.iter_shard(self.path):
            if isinstance(item, Skip):
                if item.reason.startswith(DUPLICATE_KEY_REASON):
                    self.duplicates.append(item.key)   # fails the run, naming key and shard
                else:
                    self.skipped.append(item)
                continue
            key = item.key
            if key in self.exclude:
                self.excluded += 1
                continue
            reason = shardio.check_label(item.label, self.num_classes)
            if reason:
                self.skipped.append(Skip(key, reason, os.path.basename(str(self.path))))
                continue
            if key in self.undecodable:       # a producer process found it does not decode (earlier read)
                self.skipped.append(Skip(key, self.undecodable[key], os.path.basename(str(self.path))))
                continue
            try:
                with self.guard():
                    src = augment.SourceImage(item.data)
                    seeds = [augment.derive_seed(self.cache_seed, e, key) for e in range(self.epochs)]
                    params = None         # producer processes compute the parameters and decode
                    if self.decoded:      # the finest decode any epoch needs, kept for the views
                        params = [views.params(self.spec, s, src) for s in seeds]
                        src.at(min(augment.draft_factor(p, self.size) for p in params))
            except Exception as e:  # noqa: BLE001 - recorded as the sample's skip reason
                self.skipped.append(Skip(key, undecodable_reason(e), os.path.basename(str(self.path))))
                continue
            pos = len(self.samples)
            self.samples.append((key, item.label, seeds, sample_digest(item.data, item.label)))
            if pos < FINGERPRINT_SAMPLES:
                self.first_srcs.append(src)
            if block is None:
                block = Block(index=pos // self.spec.policy.mix_block, start=pos, labels=[], seeds=[], params=[])
            block.labels.append(item.label)
            block.keys.append(key)
            block.seeds.append(seeds)
            if params is not None:
                block.params.append(params)
            (block.srcs if self.decoded else block.data).append(src if self.decoded else src.data)
            if len(block.labels) == self.spec.policy.mix_block:
                self.read_s += time.perf_counter() - t0
                yield block
                t0 = time.perf_counter()
                block = None
        self.read_s += time.perf_counter() - t0
        if block is not None:
            yield block

    def fingerprints(self) -> list[dict]:
        """The manifest's ``view_fingerprints`` of this shard: its first samples' first and last epoch views."""
        out = []
        for (key, _, seeds, _), src in zip(self.samples, self.first_srcs):
            for e in sorted({0, self.epochs - 1}):
                out.append({"key": key, "epoch": e, "seed": int(seeds[e]), "size": self.size,
                            "sha256": views.fingerprint(self.spec, seeds[e], src, self.size)})
        return out


# ----------------------------------------------------------------------------- producers

class ThreadProducers:
    """``threads`` producers inside the worker, taking blocks from the reader in turn."""

    def __init__(self, threads: int, gate=None):
        self.threads, self.gate = max(1, threads), gate

    def pieces(self, blocks, spec, epochs, size, batch_size):
        """Yield every piece of ``blocks`` (any order); an error in a producer is raised here."""
        lock, out = threading.Lock(), queue.Queue(maxsize=2 * self.threads + 2)
        it = iter(blocks)
        errors: list = []

        def work():
            try:
                while True:
                    with lock:
                        b = next(it, None)
                    if b is None:
                        break
                    k = epochs_per_piece(batch_size, len(b.labels), epochs)
                    for p in render_block(b, spec, epochs, size, k, self.gate.producer if self.gate else None):
                        out.put(p)
            except BaseException as e:  # noqa: BLE001 - surfaced by the consumer
                errors.append(f"{type(e).__name__}: {e}")
            finally:
                out.put(None)

        workers = [threading.Thread(target=work, daemon=True) for _ in range(self.threads)]
        for t in workers:
            t.start()
        running = len(workers)
        while running:
            p = out.get()
            if p is None:
                running -= 1
                continue
            yield p
        for t in workers:
            t.join()
        if errors:
            raise RuntimeError(errors[0])

    def release(self, p: Piece) -> None:
        pass

    def close(self) -> None:
        pass


class Slots:
    """A producer process's reusable shared-memory buffers (at most ``cap``): each piece is written into a
    free one and the worker hands its number back on ``free`` once the teacher has run on it. A fresh
    shared-memory tensor per piece would fault in every 4 KB page again (measured: ~12% of a producer's
    time for 224 px float32 views)."""

    def __init__(self, index: int, free, parent: int, cap: int = 3):
        self.index, self.free, self.parent, self.cap = index, free, parent, cap
        self.bufs: list = []
        self.idle: list[int] = []
        self.last: tuple | None = None       # (producer, buffer) of the latest ``take``

    def take(self, shape, dtype):
        import math

        import torch
        if not self.idle and len(self.bufs) < self.cap:
            self.bufs.append(None)
            self.idle.append(len(self.bufs) - 1)
        while not self.idle:
            try:
                self.idle.append(self.free.get(timeout=1.0))
            except queue.Empty:
                if os.getppid() != self.parent:
                    raise SystemExit(0) from None
        i = self.idle.pop()
        nbytes = math.prod(shape) * dtype.itemsize
        if self.bufs[i] is None or self.bufs[i].numel() < nbytes:
            self.bufs[i] = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        self.last = (self.index, i)
        return self.bufs[i][:nbytes].view(dtype).view(shape)


def _process_main(tasks, results, free, index: int, spec_of: dict, epochs: int, size: int, batch_size: int,
                  parent: int, finish=None) -> None:
    """A producer process: tasks (block, lo, hi) from ``tasks`` -> pieces on ``results``; ``None`` ends
    it, and so does the end of its parent (a worker killed by Ray leaves no producer behind). ``finish``:
    (mean, std) when the teacher's device is the CPU: the views are finished here (normalised, erased,
    mixed: the same code and bits as on the worker), in parallel, instead of in the worker. The pieces'
    pixels live in ``Slots`` the worker hands back on ``free``."""
    import torch

    from ..memory import keep_heap
    torch.set_num_threads(1)
    keep_heap()          # a view's images and buffers are reused from the heap instead of faulted in afresh
    spec = views.ViewSpec.from_manifest(spec_of)
    slots = Slots(index, free, parent)
    results.put(("ready", os.getpid()))

    def put(item) -> None:
        while True:
            try:
                results.put(item, timeout=1.0)
                return
            except queue.Full:
                if os.getppid() != parent:
                    raise SystemExit(0) from None

    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if task is None:
            return
        b, lo, hi = task
        try:
            k = epochs_per_piece(batch_size, len(b.labels), epochs)
            for p in render_block(b, spec, epochs, size, k, alloc=slots.take if finish is None else None,
                                  lo=lo, hi=hi):
                if finish is not None:
                    x = slots.take((p.pixels.shape[0], 3, size, size), torch.float32)
                    p.pixels = finish_pixels(p, b, spec, epochs, *finish, torch.device("cpu"), out=x)
                    p.finished = True
                p.slot = slots.last
                put(("piece", p))
        except Undecodable as e:    # the worker reads the shard again without these keys
            put(("bad", e.bad))
        except BaseException as e:  # noqa: BLE001 - the worker fails the shard with this line
            put(("error", f"{type(e).__name__}: {e}"))
        put(("done", b.index))


class ProcessProducers:
    """``n`` spawned producer processes, kept for the worker's life (their start, ~torch's import, is paid
    once); blocks go out on a bounded queue, pieces come back on another."""

    def __init__(self, n: int, spec_of: dict, epochs: int, size: int, batch_size: int, finish=None):
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.n, self.spec_of, self.finish = n, spec_of, finish
        self.tasks = ctx.Queue(maxsize=n)        # and n + 1 blocks read ahead by ``tasks_of``
        self.results = ctx.Queue(maxsize=4 * n)
        self.frees = [ctx.Queue() for _ in range(n)]       # buffers handed back to each producer
        self.procs = [ctx.Process(target=_process_main, args=(self.tasks, self.results, self.frees[i], i, spec_of,
                                                              epochs, size, batch_size, os.getpid(), finish),
                                  daemon=True, name=f"distill-views-{i}") for i in range(n)]
        for p in self.procs:
            p.start()
        # wait until every producer has imported what it needs (torch, Pillow): their start-up belongs to
        # the worker's start, not to its first shard
        ready = 0
        deadline = time.monotonic() + 300
        while ready < n:
            try:
                kind, _ = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"view producer process {dead[0] if dead else ''} did not start")
                continue
            ready += kind == "ready"

    def pieces(self, blocks, spec, epochs, size, batch_size, cut: bool = True):
        """Yield every piece of ``blocks``: a feeder thread hands them out (``tasks_of``; ``cut=False``: whole
        blocks only, the benchmark's baseline), this generator collects. A
        piece's pixels stay in its producer's shared memory: hand them back with ``release`` after use.
        Images a producer could not decode stop the feeding; once the blocks in flight are done, they
        are raised together (``Undecodable``) for the caller to read the shard again without them."""
        sent, state, bad = [0], {"fed": False, "error": None}, {}

        def feed():
            try:
                for task in tasks_of(blocks, self.n if cut else 1, epochs, batch_size):
                    if bad or state["error"]:
                        break
                    self.tasks.put(task)
                    sent[0] += 1
            except BaseException as e:  # noqa: BLE001 - a read error of the reader: surfaced below
                state["error"] = f"{type(e).__name__}: {e}"
            state["fed"] = True

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        done = 0
        while not (state["fed"] and done == sent[0]):
            try:
                kind, value = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"view producer process {dead[0]} died") from None
                continue
            if kind == "piece":
                if bad:              # after a bad image the shard is read again: its pieces are dropped
                    self.release(value)
                else:
                    yield value
            elif kind == "done":
                done += 1
            elif kind == "bad":
                bad.update(value)
            else:
                state["error"] = state["error"] or value
        feeder.join()
        if state["error"]:
            raise RuntimeError(state["error"])
        if bad:
            raise Undecodable(bad)

    def release(self, p: Piece) -> None:
        """The worker is done with a piece's pixels: its producer may write the next piece there."""
        if p.slot is not None:
            self.frees[p.slot[0]].put(p.slot[1])

    def close(self) -> None:
        for _ in self.procs:
            try:
                self.tasks.put(None, timeout=1.0)
            except Exception:  # noqa: BLE001 - best effort; daemon processes die with the worker
                pass
        for p in self.procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()

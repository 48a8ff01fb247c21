"""View producers of the cache-teacher worker: a shard's samples -> uint8 views -> teacher batches.

The worker's reader (``ShardReader``) reads the shard in order, checks each sample (excluded, label,
duplicate, an image header that parses) and cuts the valid ones into blocks of ``policy.mix_block``
positions (the unit of mix pairing). The views are rendered by a ``torch.utils.data.DataLoader``
(``ViewLoader``), the same mechanism train-student produces its views with: its dataset (``Pieces``)
takes a task's block, decodes each image once (at the finest JPEG draft scale any of its epochs needs),
computes the block's view parameters from its seeds, and renders the views as uint8, ``k`` epochs at a
time (``k = max(1, batch_size // block length)``): one *piece* = k epochs of one block, the unit the
loader hands out. Each piece is finished (normalisation, random erasing, mixing: ``augment.finish``) on
the teacher's device: by the worker on a GPU, in the loader's worker process on a CPU device. The
teacher runs on one piece at a time, cut into batches of at most ``batch_size`` the same way for every
piece: **a teacher batch never depends on the number of producers**, so the records are byte-identical
for every ``--view-workers``; the loader returns the pieces in the order it was given them.

``--view-workers N``: the loader's N worker processes, started with ``spawn`` when the worker starts and
kept for its life. A Ray actor is a multi-threaded process (its core worker runs gRPC and event-loop
threads), and a forked child would inherit their locks in whatever state they were; a spawned child
starts a clean interpreter, imports only this module's dependencies (torch, Pillow, numpy), never Ray,
and runs with one torch thread whatever ``OMP_NUM_THREADS`` Ray set for the actor. The pieces come back
through shared memory (the loader's transfer of tensors; each process writes them into a few buffers the
worker hands back, ``Pieces``), and the blocks' image bytes go out the same way. The blocks are handed
out by ``tasks_of`` (whole blocks; the shard's tail shared out by epoch ranges) on N *lanes*: each turn
of a round gives every lane its task's next piece, and the loader deals its indices to its workers in
turn, so a task stays on one process, which decodes its block once (a lane without work takes its turn
with an empty index; were a piece dealt elsewhere, that process would decode the block for it: the
same views, only slower). ``--view-workers 0``: the same loader with no process: pieces are rendered
in the worker's thread, and then the teacher runs on them, in turn (on a CPU, views and the teacher's
forward then take turns on its cores).

An image whose header parses but which does not decode is found by the loader, when its position (and
with it the mix pairing of its block) is already taken: the piece reports it (``Undecodable``), the
pieces in flight finish, and the worker reads the shard again with that key skipped for the very reason
a decode in the reader would give (the same calls raise the same error). A shard with k such images is
read k + 1 times at most.
"""
from __future__ import annotations

import itertools
import os
import queue
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import augment, shards as shardio, views
from ..files import error_text
from ..format import DUPLICATE_KEY_REASON, Skip, sample_digest

FINGERPRINT_SAMPLES = 2     # samples per shard whose first/last epoch views are fingerprinted


def undecodable_reason(e: BaseException) -> str:
    """The skip reason of an image that does not decode (the reader's and the loader's alike; no address,
    so the same shard gives the same bytes in every run, embedded or on a cluster, with any --view-workers)."""
    return f"cannot decode image: {error_text(e)}"


class Undecodable(Exception):
    """Images the view loader could not decode ({key: reason}): the shard is read again without them."""

    def __init__(self, bad: dict):
        super().__init__(f"{len(bad)} image(s) do not decode: {', '.join(bad)}")
        self.bad = bad


def until_decodable(attempt):
    """``attempt(undecodable)`` (one read of a shard, skipping the keys of ``undecodable`` {key: reason}),
    repeated with the images the view loader could not decode until none is left."""
    undecodable: dict[str, str] = {}
    while True:
        try:
            return attempt(undecodable)
        except Undecodable as e:
            undecodable.update(e.bad)


@dataclass
class Block:
    """One block of valid samples: their first position, labels, seeds (per epoch), keys and image bytes
    (a list of bytes, or, on its way to loader processes, (shared uint8 tensor, sizes)); ``uid``: the
    loader's name for it (a worker keeps the block it decoded last)."""
    index: int
    start: int
    labels: list
    seeds: list
    keys: list = field(default_factory=list)
    data: object = field(default_factory=list)
    uid: int = -1


@dataclass
class Piece:
    """k epochs of one block, rendered: ``pixels`` uint8 (k * n, H, W, 3), epoch-major, with what finishing
    needs per row (``params``, mix ``plans``, ``partners``: rows of this piece) or, when ``finished``, the
    views already normalised, erased and mixed: float32 (k * n, 3, H, W). ``labels`` and ``where``
    ((position, epoch) per row) place the teacher's outputs. ``bad``: the block's images that do not
    decode (no pixels); ``error``: the line a failed render fails the shard with."""
    block: int
    epoch0: int
    pixels: object = None
    labels: list | None = None
    where: object = None
    params: list | None = None
    plans: list | None = None
    partners: list | None = None
    render_s: float = 0.0
    finished: bool = False
    bad: dict | None = None
    error: str | None = None
    worker: int = -1            # the loader process whose shared buffer ``buffer`` holds the pixels
    buffer: int = -1


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


# ----------------------------------------------------------------------------- the reader

class ShardReader:
    """Reads one shard in order into blocks of valid samples; records skips, duplicates, exclusions
    and the keys/labels/seeds of the positions (``samples``: (key, label, seeds, ``sample_digest``) in
    position order)."""

    def __init__(self, path, *, spec: views.ViewSpec, epochs: int, cache_seed: int, size: int, num_classes: int,
                 exclude, undecodable: dict | None = None):
        self.path, self.spec, self.epochs, self.cache_seed, self.size = path, spec, epochs, cache_seed, size
        self.undecodable = undecodable or {}    # {key: reason}: skipped as a decode in the reader would be
        self.num_classes, self.exclude = num_classes, exclude
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
            if key in self.undecodable:       # the view loader found it does not decode (an earlier read)
                self.skipped.append(Skip(key, self.undecodable[key], os.path.basename(str(self.path))))
                continue
            try:                              # the header only: the loader decodes
                src = augment.SourceImage(item.data)
                seeds = [augment.derive_seed(self.cache_seed, e, key) for e in range(self.epochs)]
            except Exception as e:  # noqa: BLE001 - recorded as the sample's skip reason
                self.skipped.append(Skip(key, undecodable_reason(e), os.path.basename(str(self.path))))
                continue
            pos = len(self.samples)
            self.samples.append((key, item.label, seeds, sample_digest(item.data, item.label)))
            if pos < FINGERPRINT_SAMPLES:
                self.first_srcs.append(src)
            if block is None:
                block = Block(index=pos // self.spec.policy.mix_block, start=pos, labels=[], seeds=[])
            block.labels.append(item.label)
            block.keys.append(key)
            block.seeds.append(seeds)
            block.data.append(src.data)
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


# ----------------------------------------------------------------------------- rendering (the loader's dataset)

def _images(b: Block) -> list:
    if isinstance(b.data, tuple):        # (shared bytes, sizes): sent to a loader process
        blob, sizes = b.data
        raw = blob.numpy().tobytes()
        ends = np.cumsum(sizes)
        return [raw[e - s:e] for s, e in zip(sizes, ends)]
    return b.data


def decode_block(b: Block, spec: views.ViewSpec, size: int):
    """(SourceImages decoded at the finest draft scale any epoch needs, view parameters per sample and
    epoch) of a block; ``Undecodable`` names the images that do not decode. The reader's checks' calls, in
    the same order: the same error and reason as a decode in the reader would give."""
    srcs, params, bad = [], [], {}
    for key, data, seeds in zip(b.keys, _images(b), b.seeds):
        try:
            src = augment.SourceImage(data)
            ps = [views.params(spec, s, src) for s in seeds]
            src.at(min(augment.draft_factor(p, size) for p in ps))
        except Exception as e:  # noqa: BLE001 - recorded as the sample's skip reason
            bad[key] = undecodable_reason(e)
            continue
        srcs.append(src)
        params.append(ps)
    if bad:
        raise Undecodable(bad)
    return srcs, params


class Pieces(torch.utils.data.Dataset):
    """The view loader's dataset: index (Block, first epoch, end epoch) -> the ``Piece`` of those epochs
    of the block (None -> None: a lane's empty turn). The block decoded last is kept, so the pieces of a
    task decode it once. ``finish``: (mean, std) when the teacher's device is the CPU: the views are
    finished here (normalised, erased, mixed: the same code and bits as on the worker's device).

    In a loader process the result is written straight into shared memory (else it would be copied there
    on its way out), into one of the process's ``POOL`` buffers that came back on ``frees[worker id]``: a
    fresh shared-memory tensor per piece would fault in every 4 KB page again (measured: ~12% of a
    producer's time for 224 px float32 views). With none back, a new one is made (never a wait)."""

    POOL = 4

    def __init__(self, views_of: dict, epochs: int, size: int, finish=None, frees=None):
        self.views_of, self.epochs, self.size, self.finish, self.frees = views_of, epochs, size, finish, frees
        self._spec, self._held, self._pool, self._idle = None, (None, None), [], []

    def __getstate__(self):
        return dict(self.__dict__, _spec=None, _held=(None, None), _pool=[], _idle=[])

    def _alloc(self, shape, dtype, p: Piece, shared: bool):
        """A tensor for a piece's result (``shared``: in a loader process, from its pool)."""
        if not shared:
            return torch.empty(shape, dtype=dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        p.worker = torch.utils.data.get_worker_info().id
        while True:
            try:
                self._idle.append(self.frees[p.worker].get_nowait())
            except queue.Empty:
                break
        if self._idle:
            p.buffer = self._idle.pop()
        elif len(self._pool) < self.POOL:
            p.buffer = len(self._pool)
            self._pool.append(None)
        if p.buffer < 0 or self._pool[p.buffer] is None or self._pool[p.buffer].nbytes() < n:
            storage = torch.UntypedStorage._new_shared(n)
            if p.buffer >= 0:
                self._pool[p.buffer] = storage
        else:
            storage = self._pool[p.buffer]
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def __getitem__(self, index):
        if index is None:
            return None
        b, e0, e1 = index
        t0 = time.perf_counter()
        try:
            if self._spec is None:
                self._spec = views.ViewSpec.from_manifest(self.views_of)
            if self._held[0] != b.uid:
                self._held = (b.uid, decode_block(b, self._spec, self.size))
            return self._render(b, e0, e1, *self._held[1], t0)
        except Undecodable as e:      # the worker reads the shard again without these keys
            return Piece(b.index, e0, bad=e.bad)
        except Exception as e:  # noqa: BLE001 - the worker fails the shard with this line
            return Piece(b.index, e0, error=f"{type(e).__name__}: {e}")

    def _render(self, b: Block, e0: int, e1: int, srcs: list, params: list, t0: float) -> Piece:
        spec, size, n = self._spec, self.size, len(srcs)
        es = range(e0, e1)
        shared = torch.utils.data.get_worker_info() is not None
        p = Piece(b.index, e0)
        pixels = self._alloc((len(es) * n, size, size, 3), torch.uint8, p, shared and self.finish is None)
        out = pixels.numpy()
        rows, plans, partners = [], [], []
        for j, e in enumerate(es):
            for i, src in enumerate(srcs):
                img = augment.render(src, params[i][e], size)
                out[j * n + i] = img.convert("RGB") if img.mode != "RGB" else img
            rows += [params[i][e] for i in range(n)]
            block = views.block_plan(spec, [s[e] for s in b.seeds]) if spec.mixing else [None] * n
            plans += block
            partners += [None if pl is None else j * n + pl["partner"] for pl in block]
        where = np.array([(b.start + i, e) for e in es for i in range(n)], dtype=np.int64).reshape(-1, 2)
        p.pixels, p.labels, p.where = pixels, [b.labels[i] for _ in es for i in range(n)], where
        p.params, p.plans, p.partners = rows, plans, partners
        if self.finish is not None:
            x = self._alloc((len(where), 3, size, size), torch.float32, p, shared)
            p.pixels = augment.finish(pixels, rows, plans, *self.finish, device=torch.device("cpu"),
                                      partner_rows=partners, out=x)
            p.finished, p.params, p.plans, p.partners = True, None, None, None
        p.render_s = time.perf_counter() - t0
        return p


def finish_piece(p: Piece, mean, std, device, pin: bool = False):
    """The views of a piece, float32 (B, 3, H, W) on ``device`` (``augment.finish``: each block's views mixed
    with partners of the same block and epoch), unless the loader finished them already."""
    if p.finished:
        return p.pixels.to(device)
    px = p.pixels.pin_memory() if pin else p.pixels
    return augment.finish(px, p.params, p.plans, mean, std, device=device, partner_rows=p.partners)


# ----------------------------------------------------------------------------- the loader

def _init_worker(_) -> None:
    from ..memory import keep_heap
    torch.set_num_threads(1)
    keep_heap()          # a view's images and buffers are reused from the heap instead of faulted in afresh


def _as_is(x):
    return x


class _Source:
    """The loader's sampler: each iteration takes the indices it is given (one shard's pieces)."""

    def __init__(self):
        self.indices = iter(())

    def __iter__(self):
        return self.indices


class ViewLoader:
    """The worker's view producers: a ``DataLoader`` over ``Pieces`` with ``workers`` spawned processes
    (started here and kept: their start, ~torch's import, is paid once) or none (``workers=0``: pieces are
    rendered in the caller's thread when it asks for them)."""

    def __init__(self, workers: int, views_of: dict, epochs: int, size: int, batch_size: int, finish=None):
        self.workers, self.epochs, self.batch_size = workers, epochs, batch_size
        self.source, self._uid = _Source(), itertools.count()
        ctx = torch.multiprocessing.get_context("spawn")
        self.frees = [ctx.Queue() for _ in range(workers)]      # buffers handed back to each process
        more = (dict(multiprocessing_context=ctx, persistent_workers=True, worker_init_fn=_init_worker,
                     prefetch_factor=2) if workers else {})
        self.loader = torch.utils.data.DataLoader(Pieces(views_of, epochs, size, finish, self.frees), batch_size=None,
                                                  sampler=self.source, num_workers=workers, collate_fn=_as_is,
                                                  generator=torch.Generator(), **more)
        if workers:      # start the processes now (their start belongs to the worker's, not to its first shard)
            self.source.indices = iter([None] * workers)
            for _ in self.loader:
                pass

    def pieces(self, blocks, cut: bool = True):
        """Yield every piece of ``blocks``, in the order handed out (``tasks_of``; ``cut=False``: whole blocks
        only, the benchmark's baseline). A piece's memory is reused once the next one is asked for. Images
        that do not decode stop the handing out; once the pieces in flight are back, they are raised together
        (``Undecodable``) for the caller to read the shard again without them."""
        stop: list = []
        lanes = max(1, self.workers)
        self.source.indices = self._feed(blocks, lanes, lanes if cut else 1, stop)
        bad: dict = {}
        for p in self.loader:
            if p is None:
                continue
            if p.error:
                raise RuntimeError(p.error)
            if p.bad:
                bad.update(p.bad)
                stop.append(True)
            elif not bad:           # after a bad image the shard is read again: its pieces are dropped
                yield p
            if p.buffer >= 0:       # the caller is done with it
                self.frees[p.worker].put(p.buffer)
        if bad:
            raise Undecodable(bad)

    def _feed(self, blocks, lanes: int, planners: int, stop: list):
        """The loader's indices: each lane's task's pieces (Block, e0, e1), one a turn, lane w's at turns
        w, w + lanes, ...: the loader deals them to its workers in that order, so a task stays on one."""
        tasks = tasks_of((self._share(b) for b in blocks), planners, self.epochs, self.batch_size)
        lane, more = [iter(())] * lanes, True
        try:
            while not stop:
                turn = []
                for w in range(lanes):
                    idx = next(lane[w], None)
                    while idx is None and more:
                        t = next(tasks, None)
                        more = t is not None
                        if more:
                            lane[w] = self._task(*t)
                            idx = next(lane[w], None)
                    turn.append(idx)
                if all(i is None for i in turn):
                    return
                for idx in turn:
                    if stop:
                        return
                    yield idx
        except Exception as e:      # a read error of the reader: the worker fails the shard with it
            raise RuntimeError(f"{type(e).__name__}: {e}") from e

    def _task(self, b: Block, lo: int, hi: int):
        k = epochs_per_piece(self.batch_size, len(b.labels), self.epochs)
        return ((b, e0, min(hi, e0 + k)) for e0 in range(lo, hi, k))

    def _share(self, b: Block) -> Block:
        b.uid = next(self._uid)
        if self.workers:          # the image bytes go out once per block, in shared memory
            b.data = (torch.frombuffer(bytearray(b"".join(b.data)), dtype=torch.uint8).share_memory_(),
                      [len(d) for d in b.data])
        return b

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()

"""Student data: split an epoch's samples evenly over (DDP rank, loader worker), replay each cached
(sample, epoch) view, yield batches of sparse targets.

Per training epoch ``e`` (``TrainStream``; ``epoch_segments`` is the split):

1. lay the shards end to end in an order shuffled by (training seed, ``e``), each taking as many
   places as it gives samples per epoch (``ShardRef.samples``: a cache run's manifest rows less the
   ``--exclude`` keys, else index.json's counts less them). Of these N places DDP rank ``r`` of ``W``
   takes the ``N // W`` from ``r * N // W``, and cuts them into one contiguous sub-range of whole
   batches per DataLoader worker, so every rank makes exactly ``(N // W) // B`` batches (without
   ``drop_last``: all its ``N // W`` samples, the last batch of each worker short). A (rank, worker)
   reads a list of segments (shard, first sample, stop);
2. a worker keeps up to ``open_shards`` segments open and draws mixing blocks from them at random
   (seeded by seed, epoch, rank, worker). A block is ``policy.mix_block`` consecutive rows of a shard,
   exactly as ``cache-teacher`` made them: in a cache run the shard's cache rows of cached epoch
   ``e mod E`` (key, label, seed, top-K), in a hard-label run its valid, non-excluded samples with
   seeds ``derive_seed(train seed, e, key)``;
3. the block's views are rendered at the student's size with mixing partners from the whole block,
   also where a segment starts or ends inside it, and only the segment's own samples are kept
   (``--exclude`` keys dropped);
4. each kept sample goes through a shuffle buffer as a compact item: its rendered uint8 view (and its
   mix partner's, when mixed) with their erase and mix parameters. Leaving the buffer, the item is
   normalised, erased and mixed by ``augment.finish`` (the one step every path takes: the tensor is
   bit for bit ``views.view_tensor``'s) and batches are collated.

So the view of every (sample, epoch) does not depend on batching, workers or the number of ranks.
Left out of an epoch: the ``N - W * (N // W)`` (< W) places at the ends of the ranks' ranges, and
with ``drop_last`` the last ``(N // W) mod B`` (< B) of each rank's range; which samples these are
changes every epoch with the shard order. A hard-label shard that gives fewer samples than counted
(images whose pixels do not decode are skipped) ends its range early: the trainer then ends the epoch
on every rank at the same step (``loop._synced``).

A batch is a dict of CPU tensors: ``image`` (B, 3, S, S) float32, ``idx`` (B, K) int64 and ``prob``
(B, K) float32 (the cached top-K, K = 0 in hard-label runs), ``label``/``label2`` (B,) int64 and
``lam`` (B,) float32 (hard labels of the sample and its mix partner, weight of its own image),
``stats`` (2,) int64 (samples excluded, samples skipped since the previous batch of this worker) and
``key`` (a list of B sample keys).

``classes_per_batch_ratio`` and ``same_class_pair_ratio`` measure how well batches are mixed.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..data import augment, shards as shardio, views
from ..format import Skip
from ..files import UserError, error_text

# What a cache run reads of each shard's cached epoch: keys and labels come from the tar, whose samples
# are matched to the cache's rows by seed (derive_seed of the tar's key = the row's seed); keys are read
# from the cache too only when --exclude must know them before the tar is read.
TRAIN_READ_COLUMNS = ["seed", "topk_idx", "topk_prob"]
OPEN_SHARDS = 4                          # segments a loader worker reads at once, block by block
FAULT_ENV = "DISTILL_FAULT_TRAIN_RANK"   # test hook: that rank's training stream raises UserError at its batch 2


@dataclass(frozen=True)
class ShardRef:
    path: str
    name: str
    samples: int | None = None           # samples it gives per epoch (after --exclude); None: counted when needed


@dataclass(frozen=True)
class Segment:
    """Samples ``first`` to ``stop`` (exclusive) of a shard, numbered as the shard gives them."""
    ref: ShardRef
    first: int
    stop: int


# ----------------------------------------------------------------------------- the split

def worker_range(total: int, rank: int, world: int, worker: int, workers: int, batch_size: int,
                 drop_last: bool = True) -> tuple[int, int]:
    """Places [start, stop) of an epoch's ``total`` that (rank, worker) reads: rank r has the
    ``total // world`` from ``r * total // world``; its workers split them into contiguous runs of
    whole batches (``drop_last``) or of ``w * n // workers`` places."""
    per_rank = total // world
    start = rank * total // world
    if drop_last:
        nb = per_rank // batch_size
        return (start + batch_size * (worker * nb // workers), start + batch_size * ((worker + 1) * nb // workers))
    return start + worker * per_rank // workers, start + (worker + 1) * per_rank // workers


def batches_per_epoch(total: int, world: int, batch_size: int, workers: int = 1) -> int:
    """Batches each rank yields in an epoch of ``total`` places, exactly (``worker_range``'s split):
    ``(total // world) // batch_size`` whole batches when a rank has a full batch (``drop_last``),
    else one short batch per loader worker with samples (``workers``: 0 counts as 1)."""
    per_rank = total // world
    if per_rank >= batch_size:
        return per_rank // batch_size
    return min(max(1, workers), per_rank)


def epoch_segments(counts: Sequence[int], epoch: int, seed: int, rank: int, world: int, worker: int, workers: int,
                   batch_size: int, drop_last: bool = True) -> list[tuple[int, int, int]]:
    """(shard index, first, stop) of every segment (rank, worker) reads in ``epoch``: shards laid end
    to end in an order shuffled by (seed, epoch), each taking ``counts[i]`` places, cut at
    ``worker_range``."""
    order = list(range(len(counts)))
    random.Random(f"distill-shards:{seed}:{epoch}").shuffle(order)
    lo, hi = worker_range(sum(int(c) for c in counts), rank, world, worker, workers, batch_size, drop_last)
    out, at = [], 0
    for i in order:
        if at >= hi:
            break
        n = int(counts[i])
        a, b = max(lo, at), min(hi, at + n)
        if a < b:
            out.append((i, a - at, b - at))
        at += n
    return out


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _every_nth(shards: list, rank: int, world: int, worker: int, workers: int) -> list:
    n = world * workers
    return list(shards)[rank * workers + worker::n]


def _inject_fault(rank: int, batch: int) -> None:
    """Test hook: with DISTILL_FAULT_TRAIN_RANK=R in the environment, rank R's stream raises at batch 2."""
    if batch == 2 and os.environ.get(FAULT_ENV) == str(rank):
        raise UserError(f"injected fault ({FAULT_ENV}={rank}) in the training stream at batch {batch}")


def _raw(item: tuple) -> tuple:
    return item


def _collate(items: list, stats: list, images: bool = True) -> dict:
    k = items[0][1].shape[0]
    out = {
        "image": torch.stack([it[0] for it in items]) if images else None,
        "idx": torch.from_numpy(np.stack([it[1] for it in items])) if k else torch.zeros(len(items), 0, dtype=torch.int64),
        "prob": torch.from_numpy(np.stack([it[2] for it in items])) if k else torch.zeros(len(items), 0),
        "label": torch.tensor([it[3] for it in items], dtype=torch.int64),
        "label2": torch.tensor([it[4] for it in items], dtype=torch.int64),
        "lam": torch.tensor([it[5] for it in items], dtype=torch.float32),
        "stats": torch.tensor(stats, dtype=torch.int64),
        "key": [it[6] for it in items],
    }
    stats[0] = stats[1] = 0
    return out


def finish_batch(batch: dict, device: torch.device, mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD) -> torch.Tensor:
    """The float32 views (B, 3, S, S) of a ``device_finish`` batch, made on ``device`` by ``augment.finish``
    from its uint8 pixels and its partners' (``image2``): bit for bit what the workers give."""
    plans = batch["finish"]
    return augment.finish(batch["image"], [p for p, _, _ in plans], [pl for _, _, pl in plans], mean, std,
                          device=device, partners=batch["image2"], partner_params=[q for _, q, _ in plans])


def _pixels(src: "augment.SourceImage", params: dict, size: int) -> bytes:
    """The rendered view's RGB bytes (``augment.finish``'s uint8 input, kept compact in the shuffle buffer)."""
    img = augment.render(src, params, size)
    return (img if img.mode == "RGB" else img.convert("RGB")).tobytes()


# ----------------------------------------------------------------------------- training stream

class TrainStream(IterableDataset):
    """Batches of replayed views for one training epoch (call ``set_epoch`` before iterating).

    ``cache``: a ``reader.Cache`` (targets and seeds from it) or None (hard labels: seeds derived from
    ``seed``). ``exclude``: keys left out. ``open_shards``: segments a worker interleaves."""

    def __init__(self, shards: list[ShardRef], *, spec: views.ViewSpec, image_size: int, batch_size: int,
                 seed: int, shuffle_buffer: int, cache=None, num_classes: int, exclude=frozenset(),
                 rank: int = 0, world: int = 1, drop_last: bool = True, open_shards: int = OPEN_SHARDS,
                 mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD, device_finish: bool = False):
        super().__init__()
        self.device_finish = device_finish
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()   # seen by persistent loader workers
        self.shards, self.spec, self.size, self.batch_size = list(shards), spec, image_size, batch_size
        self.seed, self.buffer, self.cache, self.num_classes = seed, max(1, shuffle_buffer), cache, num_classes
        self.exclude, self.rank, self.world, self.drop_last = frozenset(exclude), rank, world, drop_last
        self.open_shards, self.mean, self.std = max(1, open_shards), tuple(mean), tuple(std)
        self.counts = self._counts()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Training epoch (0-based; a cache run reads cached epoch ``epoch mod E``). The value lives in
        shared memory, so persistent DataLoader workers read it when the next epoch's iteration starts."""
        self._epoch[0] = epoch

    def _counts(self) -> list[int]:
        """Samples per shard and epoch: the refs' own, else the cache manifest's less --exclude, else
        the shard's valid, non-excluded samples (read once)."""
        entries = {e["name"]: e for e in self.cache.manifest["shards"]} if self.cache is not None else {}
        out = []
        for ref in self.shards:
            if ref.samples is not None:
                out.append(int(ref.samples))
            elif self.cache is not None:
                keys = self.cache.keys(ref.name) if self.exclude else ()
                out.append(int(entries[ref.name]["samples"]) - sum(k in self.exclude for k in keys))
            else:
                out.append(sum(1 for it in shardio.iter_shard(ref.path) if not isinstance(it, Skip)
                               and it.key not in self.exclude and not shardio.check_label(it.label, self.num_classes)))
        return out

    # ------------------------------------------------------------------ iteration
    def my_segments(self) -> list[Segment]:
        """This (rank, worker)'s segments of the epoch."""
        worker, workers = _worker()
        cut = epoch_segments(self.counts, self.epoch, self.seed, self.rank, self.world, worker, workers,
                             self.batch_size, self.drop_last)
        return [Segment(self.shards[i], a, b) for i, a, b in cut]

    def __iter__(self) -> Iterator[dict]:
        worker, _ = _worker()
        rng = random.Random(f"distill-buffer:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        stats = [0, 0]
        batch: list = []
        made = 0
        finish, collate = (_raw, self._collate_u8) if self.device_finish else (self._finish, _collate)
        for item in self._shuffled(self._interleaved(self.my_segments(), rng, stats), rng):
            batch.append(finish(item))
            if len(batch) == self.batch_size:
                _inject_fault(self.rank, made)
                made += 1
                yield collate(batch, stats)
                batch = []
        if batch and not self.drop_last:
            yield collate(batch, stats)

    def _shuffled(self, items: Iterable[tuple], rng: random.Random) -> Iterator[tuple]:
        """Items through a swap buffer of ``shuffle_buffer`` items, then the rest in random order."""
        buf: list = []
        for item in items:
            if len(buf) < self.buffer:
                buf.append(item)
                continue
            j = rng.randrange(len(buf))
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    def _interleaved(self, segments: list[Segment], rng: random.Random, stats: list) -> Iterator[tuple]:
        """The segments' items, up to ``open_shards`` segments open at once, one block at a time from
        a segment drawn at random."""
        pending, open_ = list(segments), []
        while pending or open_:
            while pending and len(open_) < self.open_shards:
                open_.append(self.segment_items(pending.pop(0), stats))
            i = rng.randrange(len(open_))
            block = next(open_[i], None)
            if block is None:
                open_.pop(i)
                continue
            yield from block

    def segment_items(self, seg: Segment, stats: list) -> Iterator[list]:
        """The compact items of one segment, a list per block, in shard order:
        (view pixels, view params, partner pixels, partner params, mix plan, topk ids, topk probs,
        label, partner label, own-image weight, key); partner fields None when unmixed."""
        blocks = self._cache_blocks(seg, stats) if self.cache is not None else self._hard_blocks(seg, stats)
        for keys, srcs, seeds, labels, ids, probs, params, emit in blocks:
            if params is None:
                params = [views.params(self.spec, s, src) for s, src in zip(seeds, srcs)]
            plans = views.block_plan(self.spec, seeds)
            need = sorted({j for i, e in enumerate(emit) if e for j in (i, (plans[i] or {}).get("partner", i))})
            pix = {j: _pixels(srcs[j], params[j], self.size) for j in need}
            srcs = None                         # the decoded images go now, not when the segment next yields
            items = []
            for i, key in enumerate(keys):
                if not emit[i]:
                    continue
                plan = plans[i]
                j = plan["partner"] if plan else None
                items.append((pix[i], params[i], pix.get(j), params[j] if plan else None, plan, ids[i], probs[i],
                              labels[i], labels[j] if plan else labels[i],
                              augment.mix_lam(plan, (self.size, self.size)), key))
            yield items

    def _finish(self, item: tuple) -> tuple:
        """(view tensor, topk ids, topk probs, label, partner label, own-image weight, key) of an item:
        ``augment.finish`` of its pixels (normalise, erase), mixed with the partner's."""
        own, p, other, q, plan = item[:5]
        s = self.size

        def u8(px: bytes) -> torch.Tensor:
            return torch.frombuffer(bytearray(px), dtype=torch.uint8).view(1, s, s, 3)
        v = augment.finish(u8(own), [p], [plan], self.mean, self.std,
                           partners=u8(other) if plan is not None else None, partner_params=[q])[0]
        return (v,) + item[5:]

    def _collate_u8(self, items: list, stats: list) -> dict:
        """A batch whose ``image`` is the views' uint8 pixels (B, S, S, 3), with ``image2`` the mix partners'
        (zeros where unmixed) and ``finish``: per sample (own params, partner params, mix plan), for
        ``finish_batch`` to normalise, erase and mix on the training device."""
        s = self.size
        zero = bytes(s * s * 3)
        own = torch.frombuffer(bytearray(b"".join(it[0] for it in items)), dtype=torch.uint8)
        other = torch.frombuffer(bytearray(b"".join(it[2] or zero for it in items)), dtype=torch.uint8)
        out = _collate([(None,) + it[5:] for it in items], stats, images=False)
        out["image"], out["image2"] = own.view(len(items), s, s, 3), other.view(len(items), s, s, 3)
        out["finish"] = [(it[1], it[3], it[4]) for it in items]
        return out

    def _cache_blocks(self, seg: Segment, stats: list):
        """The blocks of a shard's cache rows that hold the segment's samples: (keys, sources, seeds,
        labels, topk ids, topk probs, None, emit), ``emit[i]``: row i of the block is the segment's.

        Only cached epoch e's record batches are read (seeds, top-K; keys too under --exclude). A tar
        sample is row ``expect`` when ``derive_seed(cache seed, e, its key)`` is that row's seed (a
        32-bit keyed hash of the key); others are samples the cache left out (skipped, or excluded
        when it was built). A shard whose samples stop matching ends in an error naming it."""
        cache, ref, mb = self.cache, seg.ref, self.spec.policy.mix_block
        e = self.epoch % cache.epochs
        t = cache.shard_table(ref.name, epochs=[e], columns=TRAIN_READ_COLUMNS + (["key"] if self.exclude else []))
        seeds = t.column("seed").to_numpy().astype(np.int64)
        ckeys = t.column("key").to_pylist() if self.exclude else None
        n = len(seeds)
        mine = ([r for r, k in enumerate(ckeys) if k not in self.exclude] if ckeys is not None else range(n))
        mine = mine[seg.first:seg.stop]
        if not len(mine):
            return
        r0, r1 = mine[0], mine[-1] + 1                      # the segment's samples lie in rows [r0, r1)
        lo, hi = r0 // mb * mb, min(n, -(-r1 // mb) * mb)   # and in the blocks of rows [lo, hi)
        stats[0] += (r1 - r0) - len(mine)
        ids = _fixed(t, "topk_idx").astype(np.int64)
        probs = _fixed(t, "topk_prob").astype(np.float32)
        cache_seed = cache.manifest["cache_seed"]
        digests = cache.digests(ref.name)
        expect, keys, labels, srcs = 0, [], [], []
        for item in shardio.iter_shard(ref.path):
            if isinstance(item, Skip):
                continue
            if augment.derive_seed(cache_seed, e, item.key) != seeds[expect]:   # not a row of the cache
                if r0 <= expect < r1:
                    stats[0 if item.key in self.exclude else 1] += 1
                continue
            if ckeys is not None and ckeys[expect] != item.key:
                raise UserError(f"shard {ref.path} does not match the cache: expected key {ckeys[expect]!r} "
                                f"at row {expect}, found {item.key!r}; rebuild the cache for these shards")
            expect += 1
            if expect <= lo:
                continue
            cache.check_sample(ref.name, expect - 1, item.key, item.data, item.label, digests)
            keys.append(item.key)
            labels.append(int(item.label))
            srcs.append(augment.SourceImage(item.data))
            if expect % mb == 0 or expect == hi:
                s0 = expect - len(srcs)
                emit = [r0 <= i < r1 and (ckeys is None or ckeys[i] not in self.exclude) for i in range(s0, expect)]
                block = (keys, srcs, seeds[s0:expect].tolist(), labels, ids[s0:expect], probs[s0:expect], None, emit)
                keys, labels, srcs = [], [], []
                yield block
                if expect == hi:
                    return
        raise UserError(f"shard {ref.path} does not match the cache: its samples ended at row {expect} of the "
                        f"cache's {n} (no sample with that row's seed); rebuild the cache for these shards")

    def _hard_blocks(self, seg: Segment, stats: list):
        """The blocks of a shard's positions (valid, non-excluded samples in shard order) that hold the
        segment's samples; seeds from (training seed, epoch, key). A sample whose pixels do not decode
        is skipped: it leaves its block, the others keep their positions."""
        mb = self.spec.policy.mix_block
        lo, hi = seg.first // mb * mb, -(-seg.stop // mb) * mb
        pos, seen, block = 0, set(), []
        for item in shardio.iter_shard(seg.ref.path):
            inside = seg.first <= pos < seg.stop
            if isinstance(item, Skip) or item.key in seen:
                stats[1] += inside
                continue
            seen.add(item.key)
            if item.key in self.exclude:
                stats[0] += inside
                continue
            try:
                bad = shardio.check_label(item.label, self.num_classes)
                src = None if bad else augment.SourceImage(item.data)   # header only
            except Exception:
                src = None
            if src is None:
                stats[1] += inside
                continue
            pos += 1
            if pos > lo:
                block.append((pos - 1, item.key, src, int(item.label)))
            if block and (pos % mb == 0 or pos == hi):
                made, block = self._hard_block(block, seg, stats), []
                yield made
            if pos >= hi:
                return
        if block:
            yield self._hard_block(block, seg, stats)

    def _hard_block(self, block: list, seg: Segment, stats: list) -> tuple:
        """(keys, sources, seeds, labels, empty ids, empty probs, params, emit) of a block's samples that
        decode (decoded now, memoised for the view, so that a broken image is skipped, not fatal)."""
        keys, srcs, seeds, labels, params, emit = [], [], [], [], [], []
        for pos, key, src, label in block:
            seed = augment.derive_seed(self.seed, self.epoch, key)
            mine = seg.first <= pos < seg.stop
            try:
                p = views.params(self.spec, seed, src)
                src.at(augment.draft_factor(p, self.size))
            except Exception:
                stats[1] += mine
                continue
            keys.append(key)
            srcs.append(src)
            seeds.append(seed)
            labels.append(label)
            params.append(p)
            emit.append(mine)
        empty = [np.zeros(0, np.int64)] * len(keys)
        return keys, srcs, seeds, labels, empty, empty, params, emit


def _fixed(t, name: str) -> np.ndarray:
    col = t.column(name).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


class ValStream(IterableDataset):
    """Batches of deterministic centre views (``augment.decode_center``) with their labels; every
    (rank, worker) reads every n-th shard. A batch's ``skipped`` lists the (key, reason) of the samples
    left out since the previous batch (no image or an unreadable one, a bad label); a last batch of no
    images carries the skips after the last full one."""

    def __init__(self, shards: list[ShardRef], *, image_size: int, batch_size: int, num_classes: int,
                 rank: int = 0, world: int = 1, mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD):
        super().__init__()
        self.shards, self.size, self.batch_size, self.num_classes = list(shards), image_size, batch_size, num_classes
        self.rank, self.world, self.mean, self.std = rank, world, tuple(mean), tuple(std)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        images, labels, skipped = [], [], []
        for ref in _every_nth(self.shards, self.rank, self.world, worker, workers):
            for item in shardio.iter_shard(ref.path):
                why = item.reason if isinstance(item, Skip) else shardio.check_label(item.label, self.num_classes)
                if why is None:
                    try:
                        src = augment.SourceImage(item.data)
                        images.append(augment.view(src, augment.decode_center(src.width, src.height), self.size,
                                                   self.mean, self.std))
                    except Exception as e:  # noqa: BLE001 - an unreadable image is skipped and reported
                        why = f"cannot decode: {error_text(e)}".splitlines()[0][:200]
                if why is not None:
                    skipped.append((f"{ref.name}/{item.key}", why))
                    continue
                labels.append(int(item.label))
                if len(images) == self.batch_size:
                    yield self._batch(images, labels, skipped)
                    images, labels, skipped = [], [], []
        if images or skipped:
            yield self._batch(images, labels, skipped)

    def _batch(self, images: list, labels: list, skipped: list) -> dict:
        image = torch.stack(images) if images else torch.zeros(0, 3, self.size, self.size)
        return {"image": image, "label": torch.tensor(labels, dtype=torch.int64), "skipped": list(skipped)}


def shard_refs(paths: list[Path], counts: Sequence[int] | None = None) -> list[ShardRef]:
    """Refs of shard files; ``counts``: the samples each gives per epoch (else counted when needed)."""
    counts = [None] * len(paths) if counts is None else list(counts)
    return [ShardRef(str(p), p.name, None if n is None else int(n)) for p, n in zip(paths, counts)]


def _init_worker(_):
    torch.set_num_threads(1)


def loader(ds: IterableDataset, workers: int, pin_memory: bool = False, persistent: bool = False, seed: int = 0):
    """A DataLoader over a dataset that yields whole batches (no re-batching, no per-sample pickling).
    ``persistent``: the workers live across epochs (``TrainStream.set_epoch`` reaches them through
    shared memory), so an epoch does not start by forking and warming up new ones. The workers' base
    seed comes from a generator seeded with ``seed``, not from the global torch RNG: starting an
    iteration draws nothing from it, so a resumed process trains on the same random numbers as an
    uninterrupted one (the views themselves are seeded by (seed, epoch, key))."""
    if workers <= 0:
        return ds
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       worker_init_fn=_init_worker, prefetch_factor=4, persistent_workers=persistent,
                                       generator=torch.Generator().manual_seed(seed))


def auto_workers(local_processes: int = 1) -> int:
    """Default DataLoader workers per training process: its share of the CPU cores this process may use,
    less one for the training process itself (0 on a one-core share: replay in the training process)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:          # not Linux
        cores = os.cpu_count() or 1
    return max(0, cores // max(1, local_processes) - 1)


# ----------------------------------------------------------------------------- how mixed are batches

def expected_distinct_classes(class_counts: Sequence[int], batch_size: int) -> float:
    """Expected distinct classes in a batch of ``batch_size`` samples drawn without replacement from a
    dataset with ``class_counts[c]`` samples of class c: sum over c of 1 - C(N - n_c, B) / C(N, B)."""
    n = np.asarray([c for c in class_counts if c > 0], dtype=np.float64)
    total, b = float(n.sum()), int(batch_size)
    if not 0 < b <= total:
        raise ValueError(f"batch size {b} for {total:.0f} samples")
    values, mult = np.unique(n, return_counts=True)
    i = np.arange(b, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_absent = np.log(np.clip(total - values[:, None] - i[None, :], 0, None)).sum(1) - np.log(total - i).sum()
    return float((mult * -np.expm1(log_absent)).sum())


def classes_per_batch_ratio(labels_per_batch: Iterable[Sequence[int]], class_counts: Sequence[int]) -> float:
    """Distinct classes per batch ÷ those of perfectly shuffled batches of the same sizes (summed over
    batches; 1.0 is perfect). ``labels_per_batch``: each batch's labels; ``class_counts``: the samples of
    each class in the epoch's data (index = label)."""
    got = want = 0.0
    expect: dict[int, float] = {}
    for labels in labels_per_batch:
        labels = [int(x) for x in labels]
        if not labels:
            continue
        b = len(labels)
        if b not in expect:
            expect[b] = expected_distinct_classes(class_counts, b)
        got += len(set(labels))
        want += expect[b]
    return got / want if want else math.nan


def same_class_pair_ratio(pairs_labels: Iterable[tuple[int, int]], class_counts: Sequence[int]) -> float:
    """Share of mix pairs (label of the sample, label of its partner) whose two labels are the same,
    ÷ the chance of that for two different samples drawn at random: sum_c n_c (n_c - 1) / (N (N - 1))."""
    n = np.asarray(class_counts, dtype=np.float64)
    total = n.sum()
    chance = float((n * (n - 1)).sum() / (total * (total - 1)))
    pairs = [(int(a), int(b)) for a, b in pairs_labels]
    if not pairs or chance == 0:
        return math.nan
    return sum(a == b for a, b in pairs) / len(pairs) / chance

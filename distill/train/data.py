"""The student's data, public: ``DistillDataset`` (an epoch's samples, each (sample, epoch) view replayed
from its seed, batched with the teacher's sparse targets), ``DistillLoader`` (its DataLoader, with a
resume point), ``finish`` (uint8 views -> the model's input, on any device). ``train-student`` and
``adapt-teacher`` use exactly these; ``distill.DistillDataset`` etc. are the same objects.

Per training epoch ``e``, which samples a (rank, worker) reads and in which order is ``order.py``'s
(shards shuffled by (seed, ``e``) and laid end to end, each rank ``N // W`` places, each worker whole
batches of them; resume points). A worker's stream reads its segments a block at a time:

1. a block is ``policy.mix_block`` consecutive rows of a shard, exactly as ``cache-teacher`` made them:
   in a cache run the shard's cache rows of cached epoch ``e mod E`` (key, label, seed, top-K), in a
   hard-label run its valid, non-excluded samples with seeds ``derive_seed(train seed, e, key)``;
2. the block's views are rendered at the student's size with mixing partners from the whole block,
   also where a segment starts or ends inside it, and only the segment's own samples are kept
   (``exclude`` keys dropped); a resumed stream renders only the samples it still has to give;
3. each kept sample goes through the shuffle buffer as a compact item: its rendered uint8 view (and its
   mix partner's, when mixed) with their erase and mix parameters. Batches are collated from the
   items leaving it, their views normalised, erased and mixed by ``augment.finish`` (the one step
   every path takes: bit for bit ``views.view_tensor``'s), or left uint8 (``finish="none"``).

So the view of every (sample, epoch) does not depend on batching, workers, ranks or resumes. Left out
of an epoch: the ``N - W * (N // W)`` (< W) places at the ends of the ranks' ranges, and with
``drop_last`` the last ``(N // W) mod B`` (< B) of each rank's range; which samples these are changes
every epoch with the shard order. A hard-label shard that gives fewer samples than counted (images
whose pixels do not decode are skipped) ends its range early: the trainer then ends the epoch on every
rank at the same step (``loop._synced``).

The batch keys are listed in ``DistillDataset``'s docstring (how well batches are mixed is measured by
``tools/batch_mix.py``).
"""
from __future__ import annotations

import itertools
import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .. import hooks, storage
from ..data import augment, shards as shardio, views
from ..format import Skip
from ..files import UserError, error_text
from .order import (ResumePoint, Segment, ShardRef, Split, batches_per_epoch, cut_runs, epoch_segments, level_members,
                    plan_levels, schedule, stream_rng)
from .prepare import dataset_inputs

FINISH = ("cpu", "none")

# What a cache run reads of each shard's cached epoch: keys and labels come from the tar, whose samples
# are matched to the cache's rows by seed (derive_seed of the tar's key = the row's seed); keys are read
# from the cache too only when --exclude must know them before the tar is read.
TRAIN_READ_COLUMNS = ["seed", "topk_idx", "topk_prob"]
OPEN_SHARDS = 4                          # segments a loader worker reads at once, block by block


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _every_nth(shards: list, rank: int, world: int, worker: int, workers: int) -> list:
    n = world * workers
    return list(shards)[rank * workers + worker::n]


def _dist_rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """``torch.distributed``'s rank and world size when it is initialised, else 0 and 1 (a given value wins)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank), (dist.get_world_size() if world is None else world)
    return (0 if rank is None else rank), (1 if world is None else world)


def _collate(items: list, stats: list) -> dict:
    """The batch fields every batch has, from the compact items (``DistillDataset._blocks``)."""
    k = items[0][5].shape[0]
    n = len(items)
    out = {
        "key": [it[10] for it in items],
        "epoch": torch.tensor([it[11] for it in items], dtype=torch.int64),
        "topk_idx": torch.from_numpy(np.stack([it[5] for it in items])) if k else torch.zeros(n, 0, dtype=torch.int64),
        "topk_prob": torch.from_numpy(np.stack([it[6] for it in items])) if k else torch.zeros(n, 0),
        "label": torch.tensor([it[7] for it in items], dtype=torch.int64),
        "label2": torch.tensor([it[8] for it in items], dtype=torch.int64),
        "lam": torch.tensor([it[9] for it in items], dtype=torch.float32),
        "stats": torch.tensor(stats, dtype=torch.int64),
    }
    stats[0] = stats[1] = 0
    return out


def finish(batch: dict, device=None) -> dict:
    """A ``finish="none"`` batch made ready for the model: ``image`` (B, 3, S, S) float32 on ``device``
    (default: where ``image_u8`` is), normalised, erased and mixed by ``augment.finish`` from ``image_u8``
    and ``partner_u8``, bit for bit what ``finish="cpu"`` gives on the CPU. The other fields are kept as
    they are (move them yourself); ``image_u8``, ``partner_u8`` and ``views`` are dropped. A batch that
    already has ``image`` is returned as it is."""
    if "image" in batch:
        return batch
    v = batch["views"]
    dev = torch.device(device) if device is not None else batch["image_u8"].device
    out = {k: x for k, x in batch.items() if k not in ("image_u8", "partner_u8", "views")}
    out["image"] = augment.finish(batch["image_u8"].permute(0, 2, 3, 1), v["params"], v["plans"], v["mean"], v["std"],
                                  device=dev, partners=batch["partner_u8"].permute(0, 2, 3, 1),
                                  partner_params=v["partner_params"])
    return out


def to_device(batch: dict, device) -> dict:
    """The batch with its tensors on ``device`` (``non_blocking``: from pinned memory the copy overlaps)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _pixels(src: "augment.SourceImage", params: dict, size: int) -> bytes:
    """The rendered view's RGB bytes (``augment.finish``'s uint8 input, kept compact in the shuffle buffer)."""
    img = augment.render(src, params, size)
    return (img if img.mode == "RGB" else img.convert("RGB")).tobytes()


class DistillDataset(IterableDataset):
    """Batches of replayed views with the teacher's top-K: the data of ``train-student``, for your own loop.

    ``DistillDataset(shards, cache=None, *, image_size, batch_size, seed=0, rank=None, world=None,
    exclude=None, shuffle_buffer=2048, finish="cpu", drop_last=True, policy=None, num_classes=None)``

    * ``shards``: the training shards (a directory, a brace pattern or one tar, as ``--shards``);
      ``cache``: a cache directory (or an open ``distill.Cache``). Without a cache the batches carry hard
      labels only, with views replayed from seeds derived from (``seed``, epoch, key) by ``policy`` (a
      policy file, or the default policy).
    * ``rank``/``world``: default to ``torch.distributed``'s when it is initialised, else 0 and 1.
    * ``exclude``: keys to leave out (an iterable, or a filter-labels output directory).
    * ``finish``: ``"cpu"`` (batches carry ``image``, finished in the loader workers) or ``"none"``
      (batches carry ``image_u8`` and ``partner_u8``; ``distill.finish(batch, device)`` finishes them
      on any device, bit for bit what ``"cpu"`` gives).

    Use it in ``distill.DistillLoader(ds, num_workers=N)`` (or a plain ``DataLoader(ds, batch_size=None)``
    without resume), call ``ds.set_epoch(e)`` before each epoch. A batch is a dict:

    ``key`` (list of B sample keys), ``epoch`` (B,) int64 (the cached epoch whose view and targets the
    sample carries: training epoch mod the cache's epochs; without a cache the training epoch),
    ``image`` (B, 3, S, S) float32 (normalised, erased, mixed) or, with ``finish="none"``, ``image_u8``
    (B, 3, S, S) uint8 (the sample's own rendered view: ``open_cache(...).replay(key, epoch,
    view="student")``) and ``partner_u8`` (its mix partner's, zeros where unmixed) with ``views`` (what
    finishing needs), ``topk_idx`` (B, K) int64 and ``topk_prob`` (B, K) float32 (the teacher's top-K on
    exactly this view, mixing included; K = 0 without a cache), ``label``/``label2`` (B,) int64 (hard
    labels of the sample and of its mix partner), ``lam`` (B,) float32 (the weight of the sample's own
    image: 1 unmixed), ``worker`` (the loader worker that made it) and ``stats`` (2,) int64 (samples
    excluded and skipped since that worker's previous batch).

    Each (sample, epoch) view depends on the seed and the sample's block only: not on batching,
    workers, ranks or resumes. How an epoch is split and resumed: ``distill.train.order``.
    """

    def __init__(self, shards, cache=None, *, image_size: int, batch_size: int, seed: int = 0,
                 rank: int | None = None, world: int | None = None, exclude=None, shuffle_buffer: int = 2048,
                 finish: str = "cpu", drop_last: bool = True, policy=None, num_classes: int | None = None,
                 open_shards: int = OPEN_SHARDS, mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD,
                 spec: views.ViewSpec | None = None):
        super().__init__()
        if finish not in FINISH:
            raise UserError(f"finish must be one of {', '.join(FINISH)}, got {finish!r}")
        if not batch_size >= 1 or not image_size >= 1:
            raise UserError(f"batch_size and image_size must be >= 1, got {batch_size} and {image_size}")
        if rank is None or world is None:
            rank, world = _dist_rank_world(rank, world)
        if not 0 <= rank < world:
            raise UserError(f"rank {rank} is not in [0, {world})")
        refs, cache, spec, num_classes, exclude = dataset_inputs(shards, cache, exclude, policy, image_size,
                                                                 num_classes, spec, (rank, world))
        self.finish = finish
        self.storage_options = storage.options()      # the store's options, for this dataset's worker processes
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()   # seen by persistent loader workers
        self.shards, self.spec, self.size, self.batch_size = list(refs), spec, int(image_size), int(batch_size)
        self.seed, self.buffer, self.cache, self.num_classes = int(seed), max(1, shuffle_buffer), cache, num_classes
        self.exclude, self.rank, self.world, self.drop_last = frozenset(exclude), rank, world, drop_last
        self.open_shards, self.mean, self.std = max(1, open_shards), tuple(mean), tuple(std)
        self.counts = self._counts()
        self.resume_point: dict | None = None     # DistillLoader.load_state_dict: where the named epoch goes on

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def samples(self) -> int:
        """Places in an epoch (all ranks): the samples the shards give, less ``exclude``."""
        return sum(self.counts)

    @property
    def temperature(self) -> float | None:
        """The cache's softmax temperature (None without a cache): give it to ``SoftTargetLoss``."""
        return None if self.cache is None else float(self.cache.manifest.get("temperature", 1.0))

    def set_epoch(self, epoch: int) -> None:
        """Training epoch (0-based; a cache run reads cached epoch ``epoch mod E``). The value lives in
        shared memory, so persistent DataLoader workers read it when the next epoch's iteration starts."""
        self._epoch[0] = epoch

    def batches_per_epoch(self, workers: int = 0) -> int:
        """Batches each rank yields in an uninterrupted epoch."""
        return batches_per_epoch(self.samples, self.world, self.batch_size, workers)

    def _counts(self) -> list[int]:
        """Samples per shard and epoch: the refs' own, else the cache manifest's less exclude, else
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
    def plan(self, workers: int) -> tuple:
        """(level, batches already given per worker, split history, first split, next worker) of this epoch for a
        loader of ``workers`` workers (``order.plan_levels``; a resume point of another epoch is ignored)."""
        point = self.resume_point
        point = ResumePoint.from_dict(point) if point is not None and int(point["epoch"]) == self.epoch else None
        if point is not None and (point.seed, point.samples) != (self.seed, self.samples):
            raise UserError(f"the resume point is of a dataset of {point.samples} samples per epoch and seed "
                            f"{point.seed}; this one has {self.samples} and seed {self.seed}: not the same data")
        return plan_levels(point, Split(self.world, max(1, workers), self.batch_size, self.drop_last), self.samples)

    def __iter__(self) -> Iterator[dict]:
        if self.storage_options and not storage.options():
            storage.set_options(self.storage_options)    # a spawned loader worker: its parent's
        worker, workers = _worker()
        level, start, _, first, turn = self.plan(workers)
        worker = (worker + turn) % workers          # (a resumed loader's round robin starts where it stopped)
        runs, sizes = level_members(level, self.samples)[(self.rank, worker)]
        done = sum(sizes[:start[worker]])
        runs, sizes = cut_runs(runs, done, done + sum(sizes[start[worker]:])), sizes[start[worker]:]
        stats = [0, 0]
        items = self._runs(runs, first, stats)
        collate = self._collate_u8 if self.finish == "none" else self._collate
        for made, n in enumerate(sizes):
            batch = list(itertools.islice(items, n))
            if not batch:
                return
            if hooks.ACTIVE:
                hooks.fire("train-batch", rank=self.rank, batch=made, error=UserError)
            out = collate(batch, stats)
            out["worker"] = worker
            yield out

    def _runs(self, runs: list, first: Split, stats: list) -> Iterator[tuple]:
        """The items of ``runs`` (positions of streams of the epoch's first split), rendered, in order."""
        for r, w, lo, hi in runs:
            if lo == 0:
                yield from itertools.islice((it for _, it in self.stream(first, r, w, None, stats)), hi)
                continue
            order = [place for place, _ in self.stream(first, r, w, False, [0, 0])]
            wanted = set(order[lo:hi])
            yield from (it for place, it in self.stream(first, r, w, wanted, stats) if place in wanted)

    def stream(self, first: Split, rank: int, worker: int, wanted, stats: list) -> Iterator[tuple]:
        """(place, item) of stream (rank, worker) of the epoch's first split, in output order. ``wanted``:
        None (render every item), False (a dry run: places only, item None) or a set of places (only
        those rendered). A place is ``shard index << 32 | position in the shard``."""
        cut = epoch_segments(self.counts, self.epoch, self.seed, rank, first.world, worker, first.workers,
                             first.batch_size, first.drop_last)
        segs = [self._blocks(i, Segment(self.shards[i], a, b), wanted, stats) for i, a, b in cut]
        remote = (self.cache is not None and self.cache.remote) or any(storage.is_remote(r.path) for r in self.shards[:1])
        if remote and wanted is not False:
            segs = self._fetching_ahead(segs, [self.shards[i] for i, _, _ in cut])
        return schedule(segs, stream_rng(self.seed, self.epoch, rank, worker), self.open_shards, self.buffer)

    def _fetching_ahead(self, segs: list, refs: list[ShardRef]) -> list:
        """Data in an object store: each segment, when it starts, has the segment ``open_shards + 2``
        places later fetched in the background (the first ones at once): its cache records (footer,
        digests, the epoch's span) and the start of its shard. A bounded prefetch that keeps the store's
        request latency off the stream."""
        ahead = self.open_shards + 2
        e = self.epoch % self.cache.epochs if self.cache is not None else self.epoch

        def fetch(ref: ShardRef) -> None:
            if self.cache is not None:
                self.cache.prefetch_later(ref.name, e, TRAIN_READ_COLUMNS + (["key"] if self.exclude else []))
            storage.warm(ref.path)

        for ref in refs[:ahead]:
            fetch(ref)

        def started(k: int, seg):
            if k + ahead < len(refs):
                fetch(refs[k + ahead])
            yield from seg
        return [started(k, seg) for k, seg in enumerate(segs)]

    def _blocks(self, index: int, seg: Segment, wanted, stats: list) -> Iterator[list]:
        """The (place, item) lists of one segment's blocks, in shard order. An item is the compact form
        the shuffle buffer holds: (view pixels, view params, partner pixels, partner params, mix plan,
        topk ids, topk probs, label, partner label, own-image weight, key, cached epoch); partner fields
        None when unmixed."""
        blocks = self._cache_blocks(seg, stats, wanted) if self.cache is not None else self._hard_blocks(seg, stats)
        e = self.epoch % self.cache.epochs if self.cache is not None else self.epoch
        base = index << 32
        for keys, srcs, seeds, labels, ids, probs, params, places in blocks:
            emit = [i for i, p in enumerate(places) if p is not None]
            want = [i for i in emit if wanted is None or (wanted is not False and base | places[i] in wanted)]
            if not want:
                yield [(base | places[i], None) for i in emit]
                continue
            plans = views.block_plan(self.spec, seeds)
            need = sorted({j for i in want for j in (i, (plans[i] or {}).get("partner", i))})
            if params is None:
                params = {j: views.params(self.spec, seeds[j], srcs[j]) for j in need}
            pix = {j: _pixels(srcs[j], params[j], self.size) for j in need}
            srcs = None                         # the decoded images go now, not when the segment next yields
            items = []
            for i in emit:
                item = None
                if i in pix:
                    plan = plans[i]
                    j = plan["partner"] if plan else None
                    item = (pix[i], params[i], pix.get(j), params[j] if plan else None, plan, ids[i], probs[i],
                            labels[i], labels[j] if plan else labels[i], augment.mix_lam(plan, (self.size, self.size)),
                            keys[i], e)
                items.append((base | places[i], item if i in want else None))
            yield items

    def _collate(self, items: list, stats: list) -> dict:
        """A batch of finished views: ``augment.finish`` of each item's pixels (normalise, erase), mixed
        with its partner's."""
        s = self.size

        def u8(px: bytes) -> torch.Tensor:
            return torch.frombuffer(bytearray(px), dtype=torch.uint8).view(1, s, s, 3)
        out = _collate(items, stats)
        out["image"] = torch.cat([augment.finish(u8(it[0]), [it[1]], [it[4]], self.mean, self.std,
                                                 partners=u8(it[2]) if it[4] is not None else None,
                                                 partner_params=[it[3]]) for it in items])
        return out

    def _collate_u8(self, items: list, stats: list) -> dict:
        """A batch of uint8 views (``image_u8``, ``partner_u8``: B, 3, S, S) and ``views`` (per sample:
        own params, partner params, mix plan; with mean and std) for ``finish``."""
        s = self.size
        zero = bytes(s * s * 3)
        own = torch.frombuffer(bytearray(b"".join(it[0] for it in items)), dtype=torch.uint8)
        other = torch.frombuffer(bytearray(b"".join(it[2] or zero for it in items)), dtype=torch.uint8)
        out = _collate(items, stats)
        out["image_u8"] = own.view(len(items), s, s, 3).permute(0, 3, 1, 2)
        out["partner_u8"] = other.view(len(items), s, s, 3).permute(0, 3, 1, 2)
        out["views"] = {"params": [it[1] for it in items], "partner_params": [it[3] for it in items],
                        "plans": [it[4] for it in items], "mean": self.mean, "std": self.std}
        return out

    def _cache_blocks(self, seg: Segment, stats: list, wanted):
        """The blocks of a shard's cache rows that hold the segment's samples: (keys, sources, seeds,
        labels, topk ids, topk probs, None, places), ``places[i]``: the position of row i of the block
        when it is one of the segment's samples, else None. A dry run (``wanted`` False) reads the cache
        rows only; otherwise the tar is read along.

        Only cached epoch e's record batches are read (seeds, top-K; keys too under exclude). A tar
        sample is row ``expect`` when ``derive_seed(cache seed, e, its key)`` is that row's seed (a
        32-bit keyed hash of the key); others are samples the cache left out (skipped, or excluded
        when it was built). A shard whose samples stop matching ends in an error naming it."""
        cache, ref, mb = self.cache, seg.ref, self.spec.policy.mix_block
        e = self.epoch % cache.epochs
        t = cache.shard_table(ref.name, epochs=[e], columns=TRAIN_READ_COLUMNS + (["key"] if self.exclude else []))
        seeds = t.column("seed").to_numpy().astype(np.int64)
        ckeys = t.column("key").to_pylist() if self.exclude else None
        n = len(seeds)
        mine = [r for r, k in enumerate(ckeys) if k not in self.exclude] if ckeys is not None else list(range(n))
        place_of = {r: p for p, r in enumerate(mine) if seg.first <= p < seg.stop}
        if not place_of:
            return
        r0, r1 = mine[seg.first], mine[seg.stop - 1] + 1    # the segment's samples lie in rows [r0, r1)
        lo, hi = r0 // mb * mb, min(n, -(-r1 // mb) * mb)   # and in the blocks of rows [lo, hi)
        if wanted is False:
            for s0 in range(lo, hi, mb):
                rows = range(s0, min(s0 + mb, hi))
                yield [], [], [], [], [], [], None, [place_of.get(r) for r in rows]
            return
        stats[0] += (r1 - r0) - len(place_of)
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
                places = [place_of.get(r) for r in range(s0, expect)]
                block = (keys, srcs, seeds[s0:expect].tolist(), labels, ids[s0:expect], probs[s0:expect], None, places)
                keys, labels, srcs = [], [], []
                yield block
                if expect == hi:
                    return
        raise UserError(f"shard {ref.path} does not match the cache: its samples ended at row {expect} of the "
                        f"cache's {n} (no sample with that row's seed); rebuild the cache for these shards")

    def _hard_blocks(self, seg: Segment, stats: list):
        """The blocks of a shard's positions (valid, non-excluded samples in shard order) that hold the
        segment's samples; seeds from (training seed, epoch, key). A sample whose pixels do not decode
        is skipped: it leaves its block, the others keep their positions (a dry run decodes too)."""
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
        """(keys, sources, seeds, labels, empty ids, empty probs, params, places) of a block's samples
        that decode (decoded now, memoised for the view, so that a broken image is skipped, not fatal)."""
        keys, srcs, seeds, labels, params, places = [], [], [], [], [], []
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
            places.append(pos if mine else None)
        empty = [np.zeros(0, np.int64)] * len(keys)
        return keys, srcs, seeds, labels, empty, empty, params, places


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


def _init_worker(_):
    torch.set_num_threads(1)


class DistillLoader(torch.utils.data.DataLoader):
    """The loader of a ``DistillDataset``: a ``DataLoader`` of whole batches (``batch_size=None``) with a
    resume point. ``state_dict()`` after any batch is a small JSON-able dict (the epoch, the split and
    the batches each worker had given); ``load_state_dict(state)`` before iterating makes the next
    iteration of that epoch yield exactly the samples not yet given, each once, with the same views,
    also with another ``num_workers`` or DDP world size. Without one, the same number of workers and
    ranks goes on with exactly the batches an uninterrupted run would have made.

    ``persistent_workers``: the workers live across epochs (``set_epoch`` reaches them through shared
    memory). The workers' base seed comes from a generator seeded with ``seed``, not from the global
    torch RNG, so starting an iteration draws nothing from it (the views are seeded by (seed, epoch, key))."""

    def __init__(self, dataset: DistillDataset, num_workers: int = 0, pin_memory: bool = False, *,
                 persistent_workers: bool = False, prefetch_factor: int = 4, seed: int = 0, **kwargs):
        workers = max(0, int(num_workers))
        super().__init__(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                         worker_init_fn=_init_worker, prefetch_factor=prefetch_factor if workers else None,
                         persistent_workers=persistent_workers and workers > 0,
                         generator=torch.Generator().manual_seed(seed), **kwargs)
        self._point: tuple | None = None          # (epoch, split history, current split, batches per worker)

    def __iter__(self):
        ds = self.dataset
        level, start, history, _, turn = ds.plan(self.num_workers)
        taken = list(start)
        self._point = (ds.epoch, history, level.split, taken, [turn])
        for b in super().__iter__():
            taken[b["worker"]] += 1
            self._point[4][0] = (b["worker"] + 1) % len(taken)
            yield b

    def state_dict(self) -> dict:
        """Where the current (or last) epoch stands: after its last batch taken from this loader."""
        ds = self.dataset
        if self._point is None or self._point[0] != ds.epoch:
            level, start, history, _, turn = ds.plan(self.num_workers)
            self._point = (ds.epoch, history, level.split, list(start), [turn])
        epoch, history, split, taken, turn = self._point
        cur = {"world": split.world, "workers": split.workers, "batch_size": split.batch_size,
               "drop_last": split.drop_last, "taken": list(taken), "next": turn[0]}
        return ResumePoint(epoch, ds.seed, ds.samples, tuple(history) + (cur,)).to_dict()

    def load_state_dict(self, state: dict) -> None:
        """Go on from ``state`` (a ``state_dict()``): sets the dataset's epoch; the next iteration
        yields the rest of that epoch. Persistent workers are restarted to read it."""
        try:
            point = ResumePoint.from_dict(state)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"DistillLoader.load_state_dict: {e}") from None
        self.dataset.resume_point = point.to_dict()
        self.dataset.set_epoch(point.epoch)
        self._point = None
        it = getattr(self, "_iterator", None)
        if it is not None:
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            self._iterator = None


def loader(ds: IterableDataset, workers: int, pin_memory: bool = False, seed: int = 0):
    """A DataLoader over a dataset that yields whole batches (the validation stream)."""
    if workers <= 0:
        return ds
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       worker_init_fn=_init_worker, prefetch_factor=4,
                                       generator=torch.Generator().manual_seed(seed))


def auto_workers(local_processes: int = 1) -> int:
    """Default DataLoader workers per training process: its share of the CPU cores this process may use,
    less one for the training process itself (0 on a one-core share: replay in the training process)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:          # not Linux
        cores = os.cpu_count() or 1
    return max(0, cores // max(1, local_processes) - 1)

"""Student data: stream shards, replay each cached (sample, epoch) view, yield batches of sparse targets.

Per training epoch ``e`` and shard (one shard at a time per DataLoader worker):

1. cache run: read the shard's cache rows for cached epoch ``e mod E`` (key, label, seed, top-K);
   hard-label run: the shard's valid samples, seeds ``derive_seed(train seed, e, key)``;
2. stream the tar (``shards.iter_shard``) and group the samples by mixing block (``policy.mix_block``
   consecutive cache rows), exactly as ``cache-teacher`` did;
3. make the block's views with ``views.block_views`` at the student's size and normalisation (the
   same parameters the teacher saw; mixing partners inside the block);
4. drop ``--exclude`` keys, push the rest through a sample shuffle buffer (after the views, so
   batching never changes a view) and emit collated batches.

Shards are shuffled per epoch with the training seed and split across (DDP rank, DataLoader worker)
by index. A batch is a dict of CPU tensors: ``image`` (B, 3, S, S) float32, ``idx`` (B, K) int64 and
``prob`` (B, K) float32 (the cached top-K, K = 0 in hard-label runs), ``label``/``label2`` (B,) int64
and ``lam`` (B,) float32 (hard labels of the sample and its mix partner, weight of its own image),
``stats`` (2,) int64 (samples excluded, samples skipped since the previous batch of this worker) and
``key`` (a list of B sample keys).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..data import augment, shards as shardio, views
from ..format import Skip
from ..files import UserError

_CACHE_COLUMNS = ["key", "label", "seed", "topk_idx", "topk_prob"]


@dataclass(frozen=True)
class ShardRef:
    path: str
    name: str


def split_shards(shards: list, epoch: int, seed: int, rank: int, world: int, worker: int, workers: int,
                 shuffle: bool = True, repeat: int = 0) -> list:
    """This (rank, worker)'s shards of an epoch: shuffled with (seed, epoch, repeat), every n-th by index."""
    order = list(shards)
    if shuffle:
        random.Random(f"distill-shards:{seed}:{epoch}:{repeat}").shuffle(order)
    n = world * workers
    return order[rank * workers + worker::n]


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _collate(items: list, stats: list) -> dict:
    k = items[0][1].shape[0]
    out = {
        "image": torch.stack([it[0] for it in items]),
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


class TrainStream(IterableDataset):
    """Batches of replayed views for one training epoch (call ``set_epoch`` before iterating).

    ``cache``: a ``reader.Cache`` (targets and seeds from it) or None (hard labels: seeds derived from
    ``seed``). ``exclude``: keys left out."""

    def __init__(self, shards: list[ShardRef], *, spec: views.ViewSpec, image_size: int, batch_size: int,
                 seed: int, shuffle_buffer: int, cache=None, num_classes: int, exclude=frozenset(),
                 rank: int = 0, world: int = 1, drop_last: bool = True,
                 mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD):
        super().__init__()
        self.shards, self.spec, self.size, self.batch_size = list(shards), spec, image_size, batch_size
        self.seed, self.buffer, self.cache, self.num_classes = seed, max(1, shuffle_buffer), cache, num_classes
        self.exclude, self.rank, self.world, self.drop_last = frozenset(exclude), rank, world, drop_last
        self.mean, self.std = tuple(mean), tuple(std)
        self.epoch, self.repeat = 0, 0

    def set_epoch(self, epoch: int, repeat: int = 0) -> None:
        """Training epoch (0-based; a cache run reads cached epoch ``epoch mod E``); ``repeat`` > 0 makes
        another pass of the same epoch with another shard and sample order (DDP ranks that ran dry)."""
        self.epoch, self.repeat = epoch, repeat

    # ------------------------------------------------------------------ iteration
    def my_shards(self) -> list[ShardRef]:
        worker, workers = _worker()
        return split_shards(self.shards, self.epoch, self.seed, self.rank, self.world, worker, workers,
                            repeat=self.repeat)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        rng = random.Random(f"distill-buffer:{self.seed}:{self.epoch}:{self.repeat}:{self.rank}:{worker}")
        buf: list = []
        batch: list = []
        stats = [0, 0]
        for ref in self.my_shards():
            for item in self.shard_samples(ref, stats):
                if len(buf) < self.buffer:
                    buf.append(item)
                    continue
                j = rng.randrange(len(buf))
                buf[j], item = item, buf[j]
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield _collate(batch, stats)
                    batch = []
        rng.shuffle(buf)
        for item in buf:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield _collate(batch, stats)
                batch = []
        if batch and not self.drop_last:
            yield _collate(batch, stats)

    def shard_samples(self, ref: ShardRef, stats: list) -> Iterator[tuple]:
        """(view, topk ids, topk probs, label, partner label, own-image weight, key) of one shard, in shard order."""
        blocks = self._cache_blocks(ref, stats) if self.cache is not None else self._hard_blocks(ref, stats)
        for keys, srcs, seeds, labels, ids, probs, params in blocks:
            made = views.block_views(self.spec, srcs, seeds, self.size, self.mean, self.std, params_=params)
            plans = views.block_plan(self.spec, seeds)
            for i, (key, v, plan) in enumerate(zip(keys, made, plans)):
                if key in self.exclude:
                    stats[0] += 1
                    continue
                label2 = labels[plan["partner"]] if plan else labels[i]
                lam = augment.mix_lam(plan, (self.size, self.size))
                yield v, ids[i], probs[i], labels[i], label2, lam, key

    def _cache_blocks(self, ref: ShardRef, stats: list):
        """Blocks of the cache rows of one shard: (keys, sources, seeds, labels, topk ids, topk probs)."""
        cache = self.cache
        t = cache.shard_table(ref.name, epochs=[self.epoch % cache.epochs], columns=_CACHE_COLUMNS)
        keys = t.column("key").to_pylist()
        labels = t.column("label").to_numpy().astype(np.int64).tolist()
        seeds = t.column("seed").to_numpy().astype(np.int64).tolist()
        ids = _fixed(t, "topk_idx").astype(np.int64)
        probs = _fixed(t, "topk_prob").astype(np.float32)
        row_of = {k: i for i, k in enumerate(keys)}
        n, mb = len(keys), self.spec.policy.mix_block
        expect, srcs = 0, []
        for item in shardio.iter_shard(ref.path):
            if isinstance(item, Skip):
                continue
            r = row_of.get(item.key)
            if r is None:                       # left out by the cache (skipped, or excluded when it was built)
                stats[0 if item.key in self.exclude else 1] += 1
                continue
            if r != expect:
                raise UserError(f"shard {ref.path} does not match the cache: expected key {keys[expect]!r} "
                                f"at row {expect}, found {item.key!r}; rebuild the cache for these shards")
            srcs.append(augment.SourceImage(item.data))
            expect += 1
            if expect % mb == 0 or expect == n:
                s0 = expect - len(srcs)
                yield (keys[s0:expect], srcs, seeds[s0:expect], labels[s0:expect], ids[s0:expect], probs[s0:expect], None)
                srcs = []
        if expect != n:
            raise UserError(f"shard {ref.path} ended at row {expect} of the cache's {n} (key {keys[expect]!r} "
                            f"missing); rebuild the cache for these shards")

    def _hard_blocks(self, ref: ShardRef, stats: list):
        """Blocks of a shard's valid, non-excluded samples, seeds from (training seed, epoch, key)."""
        mb = self.spec.policy.mix_block
        keys, srcs, labels, seeds, params = [], [], [], [], []
        empty = np.zeros(0, np.int64)

        def block():
            return keys, srcs, seeds, labels, [empty] * len(keys), [empty] * len(keys), params

        seen = set()
        for item in shardio.iter_shard(ref.path):
            if isinstance(item, Skip) or item.key in seen:
                stats[1] += 1
                continue
            seen.add(item.key)
            if item.key in self.exclude:
                stats[0] += 1
                continue
            if shardio.check_label(item.label, self.num_classes):
                stats[1] += 1
                continue
            seed = augment.derive_seed(self.seed, self.epoch, item.key)
            try:   # decode now (memoised for the view) so that a broken image is skipped, not fatal
                src = augment.SourceImage(item.data)
                p = views.params(self.spec, seed, src)
                src.at(augment.draft_factor(p, self.size))
            except Exception:
                stats[1] += 1
                continue
            keys.append(item.key)
            srcs.append(src)
            labels.append(int(item.label))
            seeds.append(seed)
            params.append(p)
            if len(keys) == mb:
                yield block()
                keys, srcs, labels, seeds, params = [], [], [], [], []
        if keys:
            yield block()


def _fixed(t, name: str) -> np.ndarray:
    col = t.column(name).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


class ValStream(IterableDataset):
    """Batches of deterministic centre views (``augment.decode_center``) with their labels."""

    def __init__(self, shards: list[ShardRef], *, image_size: int, batch_size: int, num_classes: int,
                 rank: int = 0, world: int = 1, mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD):
        super().__init__()
        self.shards, self.size, self.batch_size, self.num_classes = list(shards), image_size, batch_size, num_classes
        self.rank, self.world, self.mean, self.std = rank, world, tuple(mean), tuple(std)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        images, labels = [], []
        for ref in split_shards(self.shards, 0, 0, self.rank, self.world, worker, workers, shuffle=False):
            for item in shardio.iter_shard(ref.path):
                if isinstance(item, Skip) or shardio.check_label(item.label, self.num_classes):
                    continue
                try:
                    src = augment.SourceImage(item.data)
                    images.append(augment.view(src, augment.decode_center(src.width, src.height), self.size,
                                               self.mean, self.std))
                except Exception:
                    continue
                labels.append(int(item.label))
                if len(images) == self.batch_size:
                    yield {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.int64)}
                    images, labels = [], []
        if images:
            yield {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.int64)}


def shard_refs(paths: list[Path]) -> list[ShardRef]:
    return [ShardRef(str(p), p.name) for p in paths]


def _init_worker(_):
    torch.set_num_threads(1)


def loader(ds: IterableDataset, workers: int, pin_memory: bool = False):
    """A DataLoader over a dataset that yields whole batches (no re-batching, no per-sample pickling)."""
    if workers <= 0:
        return ds
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       worker_init_fn=_init_worker, prefetch_factor=4)

"""Which samples each (DDP rank, loader worker) reads in an epoch, in which order, and where a stopped
epoch resumes: integers only, no pixels.

**The split.** Per training epoch ``e`` the shards are laid end to end in an order shuffled by (seed,
``e``), each taking as many *places* as it gives samples per epoch. Of these N places rank ``r`` of
``W`` takes the ``N // W`` from ``r * N // W`` and cuts them into one contiguous run of whole batches
per loader worker (``worker_range``; ``epoch_segments`` turns a run into shard segments). A
(rank, worker) *stream* reads its segments a block at a time, up to ``open_shards`` at once, through a
shuffle buffer (``schedule``), with a generator seeded by (seed, epoch, rank, worker).

**The resume point** (``ResumePoint``; ``DistillLoader.state_dict``) is the split (world, workers,
batch size, drop_last) and the batches each worker's stream had given: a dict of a few integers. A
stream's order is a function of integers and the cache's row counts, so the samples a stream gave in
its first ``c`` batches are found again by running its order without reading a pixel (a *dry* run).

* Same split: every stream goes on where it stopped; the batches are those of an uninterrupted run.
* Another split (other world size or worker count: *elastic*): the samples not yet given, stream after
  stream in (rank, worker) order, form the epoch's *rest*; it is split again over the new ranks and
  workers (rank r' takes ``r' * M // W'`` to ``(r' + 1) * M // W'``; every rank makes the same number of
  batches, the last ones shorter). A rest is a list of *runs* ``(rank, worker, lo, hi)``: output
  positions [lo, hi) of a stream of the epoch's first split, so a rest of a rest is again a list of
  runs, and a worker renders its runs by running those streams with only its positions wanted.

Every sample is given once per epoch whatever the resumes; each one's view depends on (seed, epoch,
key) and its block only, so it is the same in every split.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


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


def shard_refs(paths: list[Path], counts: Sequence[int] | None = None) -> list[ShardRef]:
    """Refs of shard files; ``counts``: the samples each gives per epoch (else counted when needed)."""
    counts = [None] * len(paths) if counts is None else list(counts)
    return [ShardRef(str(p), p.name, None if n is None else int(n)) for p, n in zip(paths, counts)]


# ----------------------------------------------------------------------------- the first split of an epoch

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


def stream_rng(seed: int, epoch: int, rank: int, worker: int) -> random.Random:
    return random.Random(f"distill-buffer:{seed}:{epoch}:{rank}:{worker}")


def schedule(segments: list, rng: random.Random, open_shards: int, buffer: int) -> Iterator:
    """A stream's items in output order. ``segments``: per segment an iterator of blocks (lists of
    items); up to ``open_shards`` segments are open at once and the next block comes from one drawn at
    random; items pass a swap buffer of ``buffer`` places, the rest leaves in random order. The draws
    depend on the blocks' lengths only, so a dry run (items are places) and a rendering run (items carry
    pixels) of the same stream give the same order."""
    def interleaved():
        pending, open_ = list(segments), []
        while pending or open_:
            while pending and len(open_) < open_shards:
                open_.append(pending.pop(0))
            i = rng.randrange(len(open_))
            block = next(open_[i], None)
            if block is None:
                open_.pop(i)
                continue
            yield from block

    buf: list = []
    for item in interleaved():
        if len(buf) < buffer:
            buf.append(item)
            continue
        j = rng.randrange(len(buf))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


# ----------------------------------------------------------------------------- resume points

@dataclass(frozen=True)
class Split:
    world: int
    workers: int
    batch_size: int
    drop_last: bool


def member_order(world: int, workers: int) -> list[tuple[int, int]]:
    return [(r, w) for r in range(world) for w in range(workers)]


def even_batches(n: int, nb: int) -> list[int]:
    """Sizes of ``nb`` batches of ``n`` samples, as even as can be (the first ones smaller)."""
    return [(i + 1) * n // nb - i * n // nb for i in range(nb)]


@dataclass(frozen=True)
class Level:
    """One split of an epoch: the first (``runs`` None: the epoch's places) or a resumed one (the
    rest of the level before it, as runs)."""
    split: Split
    runs: tuple | None            # the rest this level splits, or None for the epoch's first split


def first_lengths(total: int, split: Split) -> dict:
    """Items each stream of the epoch's first split gives: {(rank, worker): n}."""
    out = {}
    for r, w in member_order(split.world, split.workers):
        lo, hi = worker_range(total, r, split.world, w, split.workers, split.batch_size, split.drop_last)
        out[(r, w)] = hi - lo
    return out


def level_members(level: Level, total: int) -> dict:
    """{(rank, worker): (runs, batch sizes)} of a level. Runs of the first level are a stream's own
    positions; a resumed level cuts its rest: rank r' takes ``r' * M // W'`` onwards, in ``nb`` batches
    (the same number on every rank), its workers contiguous whole batches."""
    s = level.split
    if level.runs is None:
        out = {}
        for m, n in first_lengths(total, s).items():
            sizes = [s.batch_size] * (n // s.batch_size) + ([n % s.batch_size] if n % s.batch_size else [])
            out[m] = ([(m[0], m[1], 0, n)], sizes)
        return out
    runs = list(level.runs)
    m_all = sum(hi - lo for _, _, lo, hi in runs)
    per_rank_max = -(-m_all // s.world)
    nb = max(1, -(-per_rank_max // s.batch_size))
    out = {}
    for r in range(s.world):
        a, b = r * m_all // s.world, (r + 1) * m_all // s.world
        sizes = even_batches(b - a, nb)
        at = a
        for w in range(s.workers):
            mine = sizes[nb * w // s.workers:nb * (w + 1) // s.workers]
            out[(r, w)] = (cut_runs(runs, at, at + sum(mine)), mine)
            at += sum(mine)
    return out


def cut_runs(runs: Sequence[tuple], a: int, b: int) -> list[tuple]:
    """Positions [a, b) of the sequence the runs make, as runs."""
    out, at = [], 0
    for r, w, lo, hi in runs:
        n = hi - lo
        x, y = max(a, at), min(b, at + n)
        if x < y:
            out.append((r, w, lo + x - at, lo + y - at))
        at += n
        if at >= b:
            break
    return out


def rest(level: Level, taken: Sequence[int], total: int) -> tuple:
    """The runs not yet given when each worker's stream of every rank had given ``taken[w]`` batches."""
    out = []
    for (r, w), (runs, sizes) in level_members(level, total).items():
        done = sum(sizes[:taken[w]])
        out.extend(cut_runs(runs, done, sum(hi - lo for _, _, lo, hi in runs)))
    return tuple(out)


@dataclass(frozen=True)
class ResumePoint:
    """Where an epoch stopped: its split history (``levels``, the last one current) and the batches
    each loader worker of the current split had given (the same on every rank)."""
    epoch: int
    seed: int
    samples: int                 # the epoch's places: a resume point is for a dataset of that size only
    levels: tuple                # ({"world", "workers", "batch_size", "drop_last", "taken", "next"}, ...)

    def to_dict(self) -> dict:
        return {"version": 1, "epoch": self.epoch, "seed": self.seed, "samples": self.samples,
                "levels": [dict(x) for x in self.levels]}

    @classmethod
    def from_dict(cls, d: dict) -> "ResumePoint":
        if not isinstance(d, dict) or d.get("version") != 1 or not d.get("levels"):
            raise ValueError(f"not a DistillLoader state: {str(d)[:200]}")
        levels = []
        for x in d["levels"]:
            levels.append({"world": int(x["world"]), "workers": int(x["workers"]), "batch_size": int(x["batch_size"]),
                           "drop_last": bool(x["drop_last"]), "taken": [int(t) for t in x["taken"]],
                           "next": int(x.get("next", 0))})
        return cls(int(d["epoch"]), int(d["seed"]), int(d["samples"]), tuple(levels))


def plan_levels(point: ResumePoint | None, split: Split, total: int) -> tuple[Level, list[int], list[dict], Split, int]:
    """The level this run reads and where its workers start: (level, batches already given per worker,
    the split history a new resume point records before the current level, the epoch's first split,
    whose streams the runs name, the worker whose batch was next). Same split as the point's current
    one: the streams go on, loader worker j playing worker ``(j + next) mod workers`` so that the
    loader's round robin gives the batches in the uninterrupted order; else the rest is split anew
    (elastic)."""
    if point is None:
        return Level(split, None), [0] * split.workers, [], split, 0
    history: list[dict] = []
    level = None
    for x in point.levels:
        s = Split(x["world"], x["workers"], x["batch_size"], x["drop_last"])
        if len(x["taken"]) != s.workers:
            raise ValueError(f"resume point: {len(x['taken'])} worker counts for {s.workers} workers")
        level = Level(s, None) if level is None else Level(s, rest(level, history[-1]["taken"], total))
        history.append(x)
    first = Split(**{k: history[0][k] for k in ("world", "workers", "batch_size", "drop_last")})
    last, cur = history[-1], level.split
    same = (cur.world, cur.workers, cur.batch_size) == (split.world, split.workers, split.batch_size)
    if same and (level.runs is not None or cur.drop_last == split.drop_last):
        return level, list(last["taken"]), history[:-1], first, int(last.get("next", 0)) % split.workers
    new = Level(Split(split.world, split.workers, split.batch_size, False), rest(level, last["taken"], total))
    return new, [0] * split.workers, history, first, 0

"""Views of one mixing block: the single place where cache-teacher (teacher side) and the student
loader / notebooks (student side) turn (image, seed) into tensors, so that both make the same view.

Positions in a shard are the rows of its cache file (valid, non-excluded samples in shard order);
mix pairs never leave a block of ``policy.mix_block`` consecutive positions.
"""
from __future__ import annotations

from typing import Sequence

from . import augment


def block_views(policy: "augment.Policy", srcs: Sequence["augment.SourceImage"], params: Sequence[dict],
                seeds: Sequence[int], size: int, mean, std, guard=None) -> list:
    """Tensors of one epoch for one block: view of each sample, mixed with its partner when the
    policy mixes. ``srcs[i]``, ``params[i]`` and ``seeds[i]`` belong to position i of the block.
    ``guard``: a context manager factory entered around each view (cache-teacher's CPU gate)."""
    if guard is None:
        views = [augment.view(s, p, size, mean, std) for s, p in zip(srcs, params)]
    else:
        views = []
        for s, p in zip(srcs, params):
            with guard():
                views.append(augment.view(s, p, size, mean, std))
    if not policy.mixing:
        return views
    plan = augment.mix_plan(policy, list(seeds))
    return [v if pl is None else augment.mix(v, views[pl["partner"]], pl) for v, pl in zip(views, plan)]


def block_plan(policy: "augment.Policy", seeds: Sequence[int]) -> list:
    return augment.mix_plan(policy, list(seeds)) if policy.mixing else [None] * len(seeds)


"""The one replay path: (how the cache made its views, seed, image) -> the view.

cache-teacher's worker, the student loader, the cache reader and the notebook figures all call
these functions, so they cannot disagree about a view. How views are made is a property of the
cache's manifest (``ViewSpec.from_manifest``): augmented views decoded from each seed by the
manifest's policy, or, for filter-labels' scoring caches (manifest ``view.center_crop``), one
deterministic centre view per sample whatever the seed.

Positions in a shard are the rows of its cache file (valid, non-excluded samples in shard order);
mix pairs never leave a block of ``policy.mix_block`` consecutive positions.

A view fingerprint (``fingerprint``) is the sha256 of the uint8 pixels ``render`` makes: it pins the
decoder (Pillow, libjpeg-turbo) and the augmentation code, and is recorded per shard in the manifest
(``view_fingerprints``) so that a replay on another machine is checked before training.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from ..files import UserError
from . import augment


@dataclass(frozen=True)
class ViewSpec:
    """How a cache's views were made: ``policy`` (crop/flip/ops/erase/mix), or a fixed centre view
    of ``center_crop`` of the short side (scoring caches; no augmentation, no mixing)."""
    policy: augment.Policy
    center_crop: float | None = None

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ViewSpec":
        """The spec a manifest (or a cache's run identity) records; refuses a policy this code cannot replay."""
        pol = manifest["policy"]
        if pol["version"] != augment.POLICY_VERSION:
            raise UserError(f"cache was built with augmentation policy version {pol['version']}, "
                            f"this distill replays version {augment.POLICY_VERSION}")
        p = augment.Policy.from_dict({k: v for k, v in pol["canonical"].items() if k != "version"})
        if p.id != pol["id"]:
            raise UserError(f"policy id mismatch: manifest {pol['id']}, recomputed {p.id}")
        return cls(p, (manifest.get("view") or {}).get("center_crop"))

    @classmethod
    def scoring(cls, size: int, center_crop: float) -> "ViewSpec":
        """filter-labels' scoring views: one centre crop per sample, nothing random."""
        if not 0 < center_crop <= 1:
            raise UserError(f"--crop-pct must be in (0, 1], got {center_crop}")
        return cls(augment.Policy(size=size, auto_augment=None, hflip=0.0, re_prob=0.0), float(center_crop))

    def views_of(self) -> dict:
        """The run identity's ``policy`` and ``view`` entries (``from_manifest`` reads them back)."""
        return {"policy": {"canonical": self.policy.canonical(), "id": self.policy.id, "version": augment.POLICY_VERSION},
                "view": self.manifest_view()}

    def manifest_view(self) -> dict:
        """The manifest's ``view`` entry for this spec."""
        return {"center_crop": self.center_crop} if self.center_crop else {"augment": True}

    @property
    def mixing(self) -> bool:
        return self.center_crop is None and self.policy.mixing

    def params(self, seed: int, width: int, height: int) -> dict:
        """The view parameters of one (sample, epoch) of a width x height image."""
        if self.center_crop:
            return augment.decode_center(width, height, self.center_crop)
        return augment.decode(self.policy, seed, width, height)


def params(spec: ViewSpec, seed: int, src: "augment.SourceImage") -> dict:
    return spec.params(seed, src.width, src.height)


def render(spec: ViewSpec, seed: int, src: "augment.SourceImage", size: int):
    """The view as a size x size RGB PIL image, before normalisation (erasing and mixing act later)."""
    return augment.render(src, params(spec, seed, src), size)


def fingerprint(spec: ViewSpec, seed: int, src: "augment.SourceImage", size: int) -> str:
    """sha256 of the uint8 pixels of ``render`` (first 16 hex digits)."""
    return hashlib.sha256(render(spec, seed, src, size).tobytes()).hexdigest()[:16]


def block_plan(spec: ViewSpec, seeds: Sequence[int]) -> list:
    """Mix partners of one block's positions (None everywhere when the spec does not mix)."""
    return augment.mix_plan(spec.policy, list(seeds)) if spec.mixing else [None] * len(seeds)


def view_tensor(spec: ViewSpec, srcs: dict, keys: Sequence[str], seeds: Sequence[int], pos: int, size: int,
                mean, std):
    """The model's input for position ``pos`` of a block (``keys``/``seeds`` of the whole block;
    ``srcs``: key -> SourceImage for at least ``keys[pos]`` and its mix partner): its rendered view
    and its partner's, finished by ``augment.finish``."""
    plan = block_plan(spec, seeds)[pos]

    def rendered(i: int):
        src = srcs[keys[i]]
        p = params(spec, seeds[i], src)
        return augment.pixels(augment.render(src, p, size)), p

    own, p = rendered(pos)
    if plan is None:
        return augment.finish(own, [p], [None], mean, std)[0]
    other, q = rendered(plan["partner"])
    return augment.finish(own, [p], [plan], mean, std, partners=other, partner_params=[q])[0]

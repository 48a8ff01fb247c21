"""Copy a shard directory with a fraction of its labels flipped (a noisy-label benchmark).

Exactly round(FRAC * N) samples are flipped: those with the smallest hash of (seed, key), so the
choice does not depend on order; a flipped label is replaced by a different class, uniformly. Image bytes, keys,
shard sizes and order are unchanged. ``OUT/flips.json`` records the truth:
``{"frac": 0.2, "seed": 0, "flipped": {key: {"true": 3, "given": 7}, ...}, "samples": N}``.

    python tools/flip_labels.py shards/demo/train out/flipped --frac 0.2 --seed 0
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from distill.format import Skip
from distill.files import UserError, atomic_write_json
from distill.data.shards import Sample, iter_shard, resolve_shards, write_shards  # noqa: E402


def _uniform(seed: int, key: str, what: str) -> float:
    h = hashlib.blake2b(f"flip:{seed}:{what}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def other_label(label: int, key: str, num_classes: int, seed: int) -> int:
    """The wrong label a flipped sample gets: uniform over the other classes."""
    other = min(int(_uniform(seed, key, "c") * (num_classes - 1)), num_classes - 2)
    return other + (other >= label)


def flip_labels(src: str, out: str, frac: float = 0.2, seed: int = 0) -> dict:
    paths, index = resolve_shards(src)
    if index is None:
        raise UserError(f"{src} has no index.json (needed for the class names)")
    if not 0.0 <= frac <= 1.0:
        raise UserError(f"--frac must be in [0, 1], got {frac}")
    n_classes = index.num_classes
    flips: dict[str, dict] = {}
    counts = {"samples": 0}
    sizes = [e.samples for e in index.shards]
    if len(set(sizes[:-1])) > 1 or (len(sizes) > 1 and sizes[-1] > sizes[0]):
        raise UserError("shards of unequal sizes: this tool keeps shard boundaries only for equal-sized shards")
    prefix = paths[0].name.rsplit("-", 1)[0]
    keys = [it.key for p in paths for it in iter_shard(p) if not isinstance(it, Skip)]
    chosen = set(sorted(keys, key=lambda k: _uniform(seed, k, "p"))[:round(frac * len(keys))]) if n_classes > 1 else set()

    def samples():
        for p in paths:
            for item in iter_shard(p):
                if isinstance(item, Skip):
                    continue
                new = other_label(item.label, item.key, n_classes, seed) if item.key in chosen else item.label
                if new != item.label:
                    flips[item.key] = {"true": item.label, "given": new}
                counts["samples"] += 1
                yield Sample(item.key, item.data, item.ext, new)

    write_shards(samples(), out, prefix, max(sizes), index.classes)
    truth = {"frac": frac, "seed": seed, "source": str(src), "samples": counts["samples"],
             "flipped_count": len(flips), "flipped": flips}
    atomic_write_json(Path(out) / "flips.json", truth)
    return truth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="shard directory (with index.json)")
    ap.add_argument("out", help="output shard directory")
    ap.add_argument("--frac", type=float, default=0.2, help="fraction of labels to flip (default 0.2)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t = flip_labels(a.src, a.out, a.frac, a.seed)
    print(f"flipped {t['flipped_count']} of {t['samples']} labels ({t['flipped_count'] / max(t['samples'], 1):.1%}) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

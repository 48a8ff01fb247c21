"""cache-teacher against a cache written by an earlier version (issue 29): ``tests/data/view-fixture/`` holds
tiny inputs and the cache that commit 9c6da6f wrote from them (``tools/make_view_fixture.py``, which checked
that its --view-workers 0, 1 and 2 caches were identical). Today's code, with 0, 1 and 2 view workers, must
write the same records.

What is compared, and why not every byte of every file:
* each Arrow file's record batches, byte for byte (keys, labels, digests, seeds, top-K classes and
  probabilities: everything a record holds), and its schema;
* the Arrow file's metadata, all of it but ``run_id`` (a digest of the run's identity, which names the
  teacher file by its path: this checkout's, not the one the fixture was made in), the shard entry's
  ``mtime_ns`` (the input shard's modification time: when it was checked out) and the ``meta`` checksum
  (the CRC of that metadata);
* the manifest's shard entries (counts, skips with their reasons, exclusions, view fingerprints, teacher
  agreement) but for the same ``mtime_ns`` and the file's size and sha256 (which cover the two values
  above), and its totals and teacher agreement. The rest of the manifest names this checkout's paths.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest

FIXTURE = Path(__file__).resolve().parent / "data" / "view-fixture"
sys.path.insert(0, str(FIXTURE.parents[2] / "tools"))
pytestmark = pytest.mark.usefixtures("ray_local")
ENV_DEPENDENT = {"mtime_ns", "file_bytes", "file_sha256"}


def _arrow(path: Path):
    """(schema without metadata, record batches' bytes, metadata with the checkout-dependent values left out)."""
    t = pa.ipc.open_file(str(path)).read_all()
    meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    del meta["run_id"]
    entry = json.loads(meta.pop("entry"))
    checksums = json.loads(meta.pop("checksums"))
    entry.pop("mtime_ns", None)                 # (files before 2026-12-08 held the input's mtime)
    del checksums["meta"]
    batches = [b.serialize().to_pybytes() for b in t.to_batches()]
    return t.schema.remove_metadata(), batches, meta, entry, checksums


def _manifest(path: Path) -> dict:
    m = json.loads(path.read_text())
    return {"shards": [{k: v for k, v in e.items() if k not in ENV_DEPENDENT} for e in m["shards"]],
            "totals": m["totals"], "teacher_agreement": m["teacher_agreement"], "run": {
                k: m[k] for k in ("policy", "view", "epochs", "topk", "cache_seed", "prob_dtype", "num_classes")}}


@pytest.mark.parametrize("view_workers", [0, 1, 2])
def test_the_cache_equals_the_one_9c6da6f_wrote(view_workers, tmp_path):
    from make_view_fixture import run
    want = _manifest(FIXTURE / "cache" / "manifest.json")
    run(FIXTURE, tmp_path, view_workers)
    assert _manifest(tmp_path / "manifest.json") == want
    for e in want["shards"]:
        got, ref = _arrow(tmp_path / e["file"]), _arrow(FIXTURE / "cache" / e["file"])
        assert got[0].equals(ref[0]), e["file"]
        assert got[1] == ref[1], f"{e['file']}: the records differ"
        assert got[2:] == ref[2:], e["file"]

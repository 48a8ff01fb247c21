"""The cache encoding round-trips exactly (including empty shards and float32), and a hand reader
following FORMAT.md gets the same records."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from distill import format as F


def _records(n, e, k, c, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.array([[rng.choice(c, k, replace=False) for _ in range(e)] for _ in range(n)], dtype=np.int64).reshape(n, e, k)
    prob = np.sort(rng.random((n, e, k)).astype(np.float32), -1)[..., ::-1] / k
    seeds = rng.integers(0, 2 ** 32, (n, e), dtype=np.uint64).astype(np.uint32)
    return [f"k{i}" for i in range(n)], rng.integers(0, c, n), seeds, ids, prob, prob[..., 0]


@pytest.mark.parametrize("n,e,k,c,dtype", [(5, 3, 4, 10, "float16"), (0, 2, 5, 10, "float16"),
                                            (3, 2, 10, 70000, "float32"), (2, 40, 10, 21841, "float16")])
def test_round_trip(n, e, k, c, dtype):
    keys, labels, seeds, ids, prob, lp = _records(n, e, k, c)
    t = F.encode_cache_shard(keys, labels, seeds, ids, prob, lp, num_classes=c, prob_dtype=dtype, shard="s.tar")
    back = pa.ipc.open_file(pa.BufferReader(F.ipc_bytes(t))).read_all()
    L = F.decode_cache_shard(back)
    assert L.num_rows == n * e
    assert L.schema.field("topk_idx").type.value_type == (pa.uint16() if c <= 65536 else pa.int32())
    got_ids = L.column("topk_idx").combine_chunks().values.to_numpy().reshape(n, e, k)
    got_p = L.column("topk_prob").combine_chunks().values.to_numpy().reshape(n, e, k)
    assert (got_ids == ids).all() and (got_p == prob.astype(dtype)).all()
    assert (L.column("seed").to_numpy().reshape(n, e) == seeds).all()
    assert L.column("key").to_pylist() == [kk for kk in keys for _ in range(e)]
    sub = F.decode_cache_shard(back, epochs=[e - 1], columns=["key", "epoch"])
    assert sub.column_names == ["key", "epoch"] and set(sub.column("epoch").to_pylist()) <= {e - 1}


def test_more_than_256_distinct_classes_use_wide_local_ids():
    keys, labels, seeds, ids, prob, lp = _records(1, 40, 10, 21841)
    t = F.encode_cache_shard(keys, labels, seeds, ids, prob, lp, num_classes=21841)
    assert t.schema.field("local").type.value_type == pa.uint16()
    assert (F.decode_cache_shard(t).column("topk_idx").combine_chunks().values.to_numpy().reshape(1, 40, 10) == ids).all()


def test_keys_and_errors():
    assert F.check_key("n01440764_10026") and F.sanitize_key("a.b c") == "a_b_c"
    with pytest.raises(F.FormatError):
        F.check_key("a.b")
    t = F.encode_cache_shard(*_records(2, 2, 2, 5), num_classes=5)
    with pytest.raises(F.UserError, match="out of range"):
        F.decode_cache_shard(t, epochs=[2])
    with pytest.raises(F.FormatError):
        F.cache_meta(pa.table({"x": [1]}))


def _round_trip_local(ids, num_classes):
    n, e, k = ids.shape
    rng = np.random.default_rng(1)
    prob = np.sort(rng.random((n, e, k)), -1)[..., ::-1].astype(np.float16)
    seeds = np.zeros((n, e), dtype=np.uint32)
    t = F.encode_cache_shard([f"k{i}" for i in range(n)], np.zeros(n, int), seeds, ids, prob, prob[..., 0],
                             num_classes=num_classes, prob_dtype="float16")
    back = pa.ipc.open_file(pa.BufferReader(F.ipc_bytes(t))).read_all()
    got = F.decode_cache_shard(back, columns=["topk_idx"]).column("topk_idx").combine_chunks().values.to_numpy()
    assert (got.reshape(n, e, k) == ids).all()
    return back.schema.field("local").type.value_type


def test_more_than_65536_distinct_classes_in_a_row_use_uint32_local_ids():
    # one sample, 7 epochs x 10,000 classes, all 70,000 distinct: uint16 local ids would wrap
    ids = np.random.default_rng(0).permutation(100_000)[:7 * 10_000].reshape(1, 7, 10_000)
    assert _round_trip_local(ids, 100_000) == pa.uint32()
    assert F._local_dtype(65_536) is np.uint16 and F._local_dtype(65_537) is np.uint32


def test_at_most_256_distinct_classes_use_uint8_local_ids():
    rng = np.random.default_rng(0)
    pool = rng.permutation(100_000)[:256]
    # each sample: 8 epochs x 64 classes from the same 256 ids, the first 4 epochs covering all of them
    ids = np.stack([np.concatenate([rng.permutation(pool).reshape(4, 64),
                                    [rng.choice(pool, 64, replace=False) for _ in range(4)]]) for _ in range(3)])
    assert all(len(np.unique(r)) == 256 for r in ids)
    assert _round_trip_local(ids, 100_000) == pa.uint8()

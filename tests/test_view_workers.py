"""View producers as processes (issue 16): byte-identical records for every number of producers, the
uint8 -> device normalisation, the producers-per-GPU sizing, and the bf16 teacher path on CPU."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import DEMO_POLICY, cache_config, demo_head, image_bytes, write_tar
from distill.cache import cache_teacher
from distill.cache.reader import open_cache
from distill.cache.stage import _placement
from distill.config import CacheConfig
from distill.data import augment
from distill.format import MANIFEST_NAME

pytestmark = pytest.mark.usefixtures("ray_local")
SHARDS = ["train-000000.tar", "train-000001.tar"]
# erasing and Mixup/CutMix on: the finishing steps that happen after the uint8 views are made
POLICY = dict(DEMO_POLICY, re_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.8, mix_block=16)


def _files(out) -> dict:
    """Every cache file's bytes (the Arrow files hold records, keys, skips and fingerprints)."""
    m = json.loads((out / MANIFEST_NAME).read_text())
    return {e["file"]: (out / e["file"]).read_bytes() for e in m["shards"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The first 96 samples of 2 demo shards: pieces of 64 and 32 per shard and epoch for the producers."""
    return demo_head(tmp_path_factory.mktemp("vw"), 96, SHARDS)


def test_records_are_byte_identical_for_0_1_2_view_workers(shards, tmp_path):
    outs = {}
    for n in (0, 1, 2):
        res = cache_teacher(cache_config(shards, tmp_path / f"n{n}", epochs=3, view_workers=n), POLICY)
        assert not res.failed, res.failed
        outs[n] = tmp_path / f"n{n}"
    ref = _files(outs[0])
    for n in (1, 2):
        assert _files(outs[n]) == ref, n
    m = [json.loads((outs[n] / MANIFEST_NAME).read_text()) for n in (0, 2)]
    assert [e["view_fingerprints"] for e in m[0]["shards"]] == [e["view_fingerprints"] for e in m[1]["shards"]]
    # and the records are the teacher's on the replayed views (not just equal among themselves)
    assert open_cache(outs[2]).to_table().equals(open_cache(outs[0]).to_table())


def test_bad_samples_are_skipped_alike_with_producer_processes(tmp_path):
    d = tmp_path / "bad"
    good = image_bytes("JPEG", (40, 40), seed=1)
    more = [item for i in range(20) for item in ((f"m{i}.jpg", image_bytes("JPEG", (48, 36), seed=10 + i)),
                                                  (f"m{i}.cls", str(i % 10).encode()))]
    # cut inside the scan: the header parses (the reader passes it on), the decode fails in a producer,
    # which sends the shard back to be read again without it; and a second one in another block
    cut = image_bytes("JPEG", (64, 48), seed=5)
    cut = cut[:len(cut) * 4 // 5]
    write_tar(d / "s-000000.tar", [
        ("ok0.jpg", good), ("ok0.cls", b"3"), ("corrupt.jpg", good[:60]), ("corrupt.cls", b"1"),
        ("nolabel.jpg", good), ("outofrange.jpg", good), ("outofrange.cls", b"12"),
        ("cutscan.jpg", cut), ("cutscan.cls", b"2"),
        ("ok1.png", image_bytes("PNG", (30, 50), seed=2)), ("ok1.cls", b"4")] + more[:30]
        + [("cutscan2.jpg", cut), ("cutscan2.cls", b"5")] + more[30:])
    a = cache_teacher(cache_config(d, tmp_path / "a", epochs=2), POLICY)
    b = cache_teacher(cache_config(d, tmp_path / "b", epochs=2, view_workers=2), POLICY)
    assert not a.failed and not b.failed
    ma, mb = (json.loads((tmp_path / x / MANIFEST_NAME).read_text()) for x in "ab")
    assert ma["shards"][0]["skipped"] == mb["shards"][0]["skipped"]
    reasons = {s["key"]: s["reason"] for s in ma["shards"][0]["skipped"]}
    assert set(reasons) == {"corrupt", "nolabel", "outofrange", "cutscan", "cutscan2"}
    assert reasons["cutscan"].startswith("cannot decode image: OSError: image file is truncated")
    assert mb["shards"][0]["samples"] == 22 and mb["totals"]["records"] == 44
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_uint8_normalisation_on_the_device_equals_the_float_path():
    """normalize_u8 (the device path) against to_tensor (Pillow -> float -> normalise) on CPU and, when
    there is one, on CUDA: max |diff| <= 1e-6 (bit-identical on CPU)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    ref = torch.stack([augment.to_tensor(Image.fromarray(p), {}) for p in px])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        got = augment.normalize_u8(torch.from_numpy(px).to(dev)).cpu()
        assert got.shape == ref.shape and float((got - ref).abs().max()) <= 1e-6, dev
    assert torch.equal(augment.normalize_u8(torch.from_numpy(px)), ref)


def test_producers_per_gpu_sizing():
    def place(res, **kw):
        return _placement(CacheConfig(shards="s", teacher=("t",), out="o", **kw), res)
    p = place({"GPU": 8, "CPU": 128})                     # 16 cores per GPU: 15 producer processes
    assert (p.device, p.workers, p.view_workers, p.num_gpus) == ("cuda", 8, 15, 1)
    assert place({"GPU": 1, "CPU": 64}).view_workers == 16                     # at most 16
    assert place({"GPU": 4, "CPU": 4}).view_workers == 0                       # 1 core per GPU: threads
    assert place({"GPU": 8, "CPU": 128}, view_workers=4).view_workers == 4     # as given
    assert place({"CPU": 2}).view_workers == 0                                 # CPU: turn-taking threads
    assert place({"CPU": 2}, view_workers=2).view_workers == 2


def test_bf16_teacher_through_autocast_on_cpu(shards, tmp_path):
    """The GPU precision path (bf16 autocast) runs on CPU too and agrees with fp32 on top-1."""
    a = cache_teacher(cache_config(shards, tmp_path / "fp32", epochs=1), DEMO_POLICY)
    b = cache_teacher(cache_config(shards, tmp_path / "bf16", epochs=1, teacher_precision="bf16", device="cpu"),
                      DEMO_POLICY)
    assert not a.failed and not b.failed
    ta, tb = open_cache(tmp_path / "fp32").to_table(), open_cache(tmp_path / "bf16").to_table()
    k = open_cache(tmp_path / "fp32").topk
    top_a = ta.column("topk_idx").combine_chunks().values.to_numpy().reshape(-1, k)[:, 0]
    top_b = tb.column("topk_idx").combine_chunks().values.to_numpy().reshape(-1, k)[:, 0]
    assert json.loads((tmp_path / "bf16" / MANIFEST_NAME).read_text())["teacher"]["precision"] == "bf16"
    assert (top_a == top_b).mean() >= 0.98
    assert not pa.Table.equals(ta, tb)          # bf16 really ran: the probabilities differ


def _blocks(lengths):
    from distill.cache.producers import Block
    starts = np.cumsum([0] + list(lengths))
    return [Block(i, int(starts[i]), [0] * n, [], []) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("lengths,producers,epochs,batch", [
    ([64] * 22, 15, 90, 64), ([64] * 22, 7, 90, 256), ([64] * 15 + [12], 15, 90, 64), ([16] * 5, 2, 7, 32),
    ([64] * 3, 1, 8, 64), ([64], 4, 90, 64), ([64] * 8, 2, 8, 64), ([10] * 3, 2, 5, 40)])
def test_producer_tasks_cover_every_view_once_on_piece_boundaries(lengths, producers, epochs, batch):
    from distill.cache.producers import epochs_per_piece, tasks_of
    tasks = list(tasks_of(_blocks(lengths), producers, epochs, batch))
    seen: dict = {}
    for b, lo, hi in tasks:
        k = epochs_per_piece(batch, len(b.labels), epochs)
        assert lo % k == 0 and (hi % k == 0 or hi == epochs) and lo < hi, (b.index, lo, hi)
        assert seen.get(b.index, 0) == lo, (b.index, lo)                      # in order, no gap, no overlap
        seen[b.index] = hi
    assert seen == {i: epochs for i in range(len(lengths))}
    first = [t for t in tasks[:producers]]
    assert all((lo, hi) == (0, epochs) for _, lo, hi in first) or len(lengths) < producers
    if producers == 1:
        assert len(tasks) == len(lengths)                                     # nothing to share out


def test_a_shards_last_blocks_are_shared_out_by_epochs():
    """ImageNet-21K's shape: 22 blocks x 90 epochs on 15 producers. Whole blocks take two rounds of 90
    epochs, the second with 7 of 15 producers busy (73%); cut, the 7 last blocks go to 14 tasks of at most
    48 epochs (90 + 48 = 138 epochs' time against the ideal 132)."""
    from distill.cache.producers import tasks_of
    tasks = list(tasks_of(_blocks([64] * 22), 15, 90, 64))
    assert [(lo, hi) for _, lo, hi in tasks[:15]] == [(0, 90)] * 15
    rest = tasks[15:]
    assert 7 < len(rest) <= 15 and max(hi - lo for _, lo, hi in rest) <= 48, rest


def test_records_are_byte_identical_when_the_last_blocks_are_cut(tmp_path):
    """5 blocks of 16 x 7 epochs on 2 producers (batch 32: pieces of 2 epochs): the last block is cut into
    epochs [0, 4) and [4, 7); the cache equals the in-process one's, byte for byte."""
    from distill.cache.producers import tasks_of
    assert [(b.index, lo, hi) for b, lo, hi in tasks_of(_blocks([16] * 5), 2, 7, 32)][-2:] == [(4, 0, 4), (4, 4, 7)]
    d = demo_head(tmp_path / "in", 80)
    outs = []
    for n in (0, 2):
        res = cache_teacher(cache_config(d, tmp_path / f"n{n}", epochs=7, batch_size=32, view_workers=n), POLICY)
        assert not res.failed, res.failed
        outs.append(_files(tmp_path / f"n{n}"))
    assert outs[0] == outs[1]


def test_undecodable_images_give_the_same_bytes_embedded_and_with_view_workers(tmp_path):
    """An image Pillow cannot identify (the reader's header probe fails: its error names a BytesIO's address)
    and one whose header parses but whose decode fails (in a producer process with view workers): the skip
    reasons, hence the Arrow files and the manifests' shard entries, are the same bytes in both runs."""
    d = tmp_path / "bad"
    cut = image_bytes("JPEG", (64, 48), seed=5)
    members = [item for i in range(24) for item in ((f"m{i:02d}.jpg", image_bytes("JPEG", (48, 36), seed=10 + i)),
                                                    (f"m{i:02d}.cls", str(i % 10).encode()))]
    write_tar(d / "s-000000.tar", members[:10] + [("garbage.jpg", b"not an image at all"), ("garbage.cls", b"1"),
                                                  ("cut.jpg", cut[:len(cut) * 4 // 5]), ("cut.cls", b"2")] + members[10:])
    for n in (0, 2):
        res = cache_teacher(cache_config(d, tmp_path / f"n{n}", epochs=2, view_workers=n), POLICY)
        assert not res.failed, res.failed
    ma, mb = (json.loads((tmp_path / f"n{n}" / MANIFEST_NAME).read_text()) for n in (0, 2))
    reasons = {s["key"]: s["reason"] for s in ma["shards"][0]["skipped"]}
    assert set(reasons) == {"garbage", "cut"} and not any("0x" in r for r in reasons.values()), reasons
    assert reasons["garbage"].startswith("cannot decode image: UnidentifiedImageError: cannot identify image file")
    assert json.dumps(ma["shards"]) == json.dumps(mb["shards"])
    assert _files(tmp_path / "n0") == _files(tmp_path / "n2")

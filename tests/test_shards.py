from __future__ import annotations

import hashlib
import json
import importlib.util
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO, image_bytes, write_image_tree, write_tar
from distill.format import SHARD_SKIP_KEY, ShardIndex, Skip
from distill.files import FormatError, UserError
from distill.data.shards import Sample, check_label, iter_shard, make_shards, probe_image, resolve_shards, write_shards


def read_all(out):
    paths, index = resolve_shards(out)
    items = [item for p in paths for item in iter_shard(p)]
    return index, items


# ---------------------------------------------------------------------------------------------
# make_shards: image folder

def test_folder_round_trip(image_tree, tmp_path):
    src, written = image_tree
    index, skips = make_shards(src, tmp_path / "out", shard_size=4, shuffle=False)
    assert skips == []
    assert index.classes == ["bird", "cat", "dog"]
    assert [s.samples for s in index.shards] == [4, 4, 1]
    assert [s.name for s in index.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert ShardIndex.read(tmp_path / "out") == index
    _, items = read_all(tmp_path / "out")
    assert all(isinstance(s, Sample) for s in items)
    # order: class, then path; labels = class position; bytes unchanged; ext from the real format
    expected = sorted(written)
    assert [s.key for s in items] == [p.split("/")[1].split(".")[0] for p in expected]
    assert [index.classes[s.label] for s in items] == [p.split("/")[0] for p in expected]
    assert [s.data for s in items] == [written[p] for p in expected]
    assert [s.ext for s in items] == ["jpg", "png", "jpg", "jpg", "jpg", "png", "webp", "png", "jpg"]


def test_tar_members_and_headers_are_fixed(image_tree, tmp_path):
    src, _ = image_tree
    index, _ = make_shards(src, tmp_path / "out", shard_size=100, shuffle=False)
    with tarfile.open(tmp_path / "out" / index.shards[0].name) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos[:4]] == ["b0.jpg", "b0.cls", "b1.png", "b1.cls"]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_reproducible_bytes(image_tree, tmp_path):
    src, _ = image_tree
    a, _ = make_shards(src, tmp_path / "a", shard_size=3)
    b, _ = make_shards(src, tmp_path / "b", shard_size=3)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    for s in a.shards:
        assert hashlib.sha256((tmp_path / "a" / s.name).read_bytes()).hexdigest() == s.sha256
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()


def test_shuffled_by_default_reproducibly_and_mixed(tmp_path):
    """A class-ordered tree: --no-shuffle gives one class per shard; the default shuffle mixes every
    shard, is the same for the same seed, another for another seed, and index.json says which."""
    layout = {f"c{c}": [f"c{c}_{i}.png" for i in range(12)] for c in range(4)}
    write_image_tree(tmp_path / "src", layout)
    labels = lambda d: [[s.label for s in iter_shard(tmp_path / d / e.name)] for e in ShardIndex.read(tmp_path / d).shards]
    plain, _ = make_shards(tmp_path / "src", tmp_path / "plain", shard_size=12, shuffle=False)
    assert [set(x) for x in labels("plain")] == [{0}, {1}, {2}, {3}] and plain.order == {"shuffled": False, "seed": 0}
    a, _ = make_shards(tmp_path / "src", tmp_path / "a", shard_size=12)
    b, _ = make_shards(tmp_path / "src", tmp_path / "b", shard_size=12)
    c, _ = make_shards(tmp_path / "src", tmp_path / "c", shard_size=12, seed=1)
    assert all(len(set(x)) >= 3 for x in labels("a")), labels("a")
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    assert [e.sha256 for e in a.shards] == [e.sha256 for e in b.shards] != [e.sha256 for e in c.shards]
    assert json.loads((tmp_path / "a" / "index.json").read_text())["order"] == {"shuffled": True, "seed": 0}
    assert sorted(x for sh in labels("a") for x in sh) == sorted(x for sh in labels("plain") for x in sh)
    keys = lambda d: sorted(s.key for e in ShardIndex.read(tmp_path / d).shards for s in iter_shard(tmp_path / d / e.name))
    assert keys("a") == keys("plain")                                  # the same samples, another order
    from distill.cli import main                                       # the flags say the same
    assert main(["make-shards", str(tmp_path / "src"), str(tmp_path / "cli"), "--shard-size", "12", "--no-shuffle",
                 "--quiet"]) == 0
    assert labels("cli") == labels("plain") and ShardIndex.read(tmp_path / "cli").order["shuffled"] is False
    assert main(["make-shards", str(tmp_path / "src"), str(tmp_path / "cli1"), "--shard-size", "12", "--seed", "1",
                 "--quiet"]) == 0
    assert [e.sha256 for e in ShardIndex.read(tmp_path / "cli1").shards] == [e.sha256 for e in c.shards]


def test_png_named_jpg_is_stored_as_png(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    data = image_bytes("PNG")
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(data)
    make_shards(tmp_path / "src", tmp_path / "out", shuffle=False)
    [sample] = read_all(tmp_path / "out")[1]
    assert (sample.ext, sample.data) == ("png", data)


def test_keys_path_and_sanitising(tmp_path):
    write_image_tree(tmp_path / "src", {"a": ["sub dir/x.v2.jpg"], "b": ["x.v2.jpg"]})
    with pytest.raises(UserError, match=r"duplicate key 'x_v2' from a/sub dir/x\.v2\.jpg and b/x\.v2\.jpg: use --keys path"):
        make_shards(tmp_path / "src", tmp_path / "out", shuffle=False)
    make_shards(tmp_path / "src", tmp_path / "out", keys="path", shuffle=False)
    assert [s.key for s in read_all(tmp_path / "out")[1]] == ["a_sub_dir_x_v2", "b_x_v2"]


def test_bad_files_are_recorded_skips(image_tree, tmp_path):
    src, _ = image_tree
    (src / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "cat" / "notes.txt").write_text("hello")
    (src / "cat" / ".DS_Store").write_text("ignored")
    (src / "stray.jpg").write_bytes(image_bytes())
    gif = tmp_path / "g.gif"
    from PIL import Image
    Image.new("RGB", (4, 4)).save(gif)
    (src / "dog" / "anim.png").write_bytes(gif.read_bytes())
    index, skips = make_shards(src, tmp_path / "out", shuffle=False)
    got = {(s.shard, s.reason.split(":")[0].split(" (")[0]) for s in skips}
    assert got == {("stray.jpg", "file is not inside a class folder"), ("cat/notes.txt", "not an image file extension"),
                   ("cat/broken.jpg", "unreadable image"), ("dog/anim.png", "unsupported image format GIF")}
    assert index.skipped == skips and index.num_samples == 9


def test_classes_file_for_folder(image_tree, tmp_path):
    src, _ = image_tree
    (tmp_path / "classes.txt").write_text("dog\ncat\nbird\nfish\n")
    index, _ = make_shards(src, tmp_path / "out", classes_file=tmp_path / "classes.txt", shuffle=False)
    assert index.classes == ["dog", "cat", "bird", "fish"]
    assert [index.classes[s.label] for s in read_all(tmp_path / "out")[1]][:3] == ["bird"] * 3
    (tmp_path / "few.txt").write_text("cat\n")
    with pytest.raises(UserError, match="class folder 'bird' .* not listed in the classes file"):
        make_shards(src, tmp_path / "out2", classes_file=tmp_path / "few.txt", shuffle=False)


# ---------------------------------------------------------------------------------------------
# make_shards: CSV / TSV

def test_csv_input(image_tree, tmp_path):
    src, written = image_tree
    csv_path = src / "list.csv"
    csv_path.write_text("path,label\ncat/c0.jpg,3\ndog/d0.png,0\n\n" + f"{src / 'bird' / 'b1.png'},3\n")
    index, skips = make_shards(csv_path, tmp_path / "out", prefix="val", keys="path", shuffle=False)
    assert skips == [] and index.classes == ["0", "1", "2", "3"]
    _, items = read_all(tmp_path / "out")
    assert [(s.key, s.label, s.ext) for s in items] == [("cat_c0", 3, "jpg"), ("dog_d0", 0, "png"), ("bird_b1", 3, "png")]
    assert items[1].data == written["dog/d0.png"]
    assert index.shards[0].name == "val-000000.tar"


def test_tsv_with_classes_file_and_missing_file(image_tree, tmp_path):
    src, _ = image_tree
    (tmp_path / "names.txt").write_text("zero\none\n")
    tsv = src / "list.tsv"
    tsv.write_text("cat/c2.png\t1\ncat/missing.jpg\t0\n")
    index, skips = make_shards(tsv, tmp_path / "out", classes_file=tmp_path / "names.txt", shuffle=False)
    assert index.classes == ["zero", "one"] and index.num_samples == 1
    assert [(s.key, s.shard) for s in skips] == [("missing", "cat/missing.jpg")]
    tsv.write_text("cat/c2.png\t2\n")
    with pytest.raises(UserError, match=r"line 1: label 2 is out of range for the 2 classes"):
        make_shards(tsv, tmp_path / "out2", classes_file=tmp_path / "names.txt", shuffle=False)


# ---------------------------------------------------------------------------------------------
# make_shards: user errors, one clear line each

def test_user_errors(image_tree, tmp_path):
    src, _ = image_tree
    with pytest.raises(UserError, match="source not found: .*nowhere"):
        make_shards(tmp_path / "nowhere", tmp_path / "o1", shuffle=False)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found in .*empty"):
        make_shards(tmp_path / "empty", tmp_path / "o2", shuffle=False)
    bad = src / "bad.csv"
    bad.write_text("path,label\ncat/c0.jpg,1\ncat/c2.png,cat\n")
    with pytest.raises(UserError, match=r"bad\.csv line 3: label 'cat' is not an integer"):
        make_shards(bad, tmp_path / "o3", shuffle=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("x")
    with pytest.raises(UserError, match="OUT .*full is not empty .*holds no earlier make-shards output"):
        make_shards(src, tmp_path / "full", shuffle=False)
    with pytest.raises(UserError, match="holds, contains or is inside the input"):
        make_shards(src, src / "out", shuffle=False)
    with pytest.raises(UserError, match="keys must be 'stem' or 'path'"):
        make_shards(src, tmp_path / "o4", keys="name", shuffle=False)


def test_overwrite_replaces_old_shards(image_tree, tmp_path):
    src, _ = image_tree
    make_shards(src, tmp_path / "out", shard_size=2, shuffle=False)          # 5 shards
    (tmp_path / "out" / "keep.txt").write_text("x")
    index, _ = make_shards(src, tmp_path / "out", shard_size=100, overwrite=True, shuffle=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["index.json", "keep.txt", "train-000000.tar"] and index.num_samples == 9


def test_overwrite_never_takes_a_folder_of_someone_elses_tars(image_tree, tmp_path):
    """Tars named like make-shards' own, with no index and no make-shards mark, are another folder's:
    --overwrite is refused and leaves them; a make-shards run killed before its index (its mark and
    some shards left) is its own and --overwrite replaces it."""
    src, _ = image_tree
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "train-000000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(UserError, match="holds no earlier make-shards output"):
        make_shards(src, theirs, overwrite=True, shuffle=False)
    assert (theirs / "train-000000.tar").read_bytes() == b"someone else's shard"
    killed = tmp_path / "killed"
    make_shards(src, killed, shard_size=2, shuffle=False)
    (killed / "index.json").unlink()                           # as if killed before the index
    (killed / ".distill.make-shards.json").write_text('{"stage": "make-shards", "prefix": "train"}')
    index, _ = make_shards(src, killed, shard_size=100, overwrite=True, shuffle=False)
    assert sorted(p.name for p in killed.iterdir()) == ["index.json", "train-000000.tar"] and index.num_samples == 9


# ---------------------------------------------------------------------------------------------
# write_shards

def test_write_shards_validates_samples(tmp_path):
    ok = Sample("a", image_bytes(), "jpg", 0)
    with pytest.raises(UserError, match="duplicate sample key 'a'"):
        write_shards([ok, ok], tmp_path / "o", "t", 10, ["x"])
    with pytest.raises(UserError, match=r"label 2 out of range 0\.\.0"):
        write_shards([Sample("b", ok.data, "jpg", 2)], tmp_path / "o", "t", 10, ["x"])
    with pytest.raises(FormatError, match="invalid sample key 'a.b'"):
        write_shards([Sample("a.b", ok.data, "jpg", 0)], tmp_path / "o", "t", 10, ["x"])
    assert not (tmp_path / "o" / "index.json").exists()
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# iter_shard: skip and record, never raise

JPG = image_bytes()


def test_iter_shard_bad_samples(tmp_path):
    tar = write_tar(tmp_path / "s.tar", [
        ("good.jpg", JPG), ("good.cls", b"1"),
        ("nolabel.jpg", JPG),
        ("nolabelint.png", JPG), ("nolabelint.cls", b"one"),
        ("noimage.cls", b"2"),
        ("img.v2.jpg", JPG), ("img.v2.cls", b"2"),
        ("bad key.jpg", JPG), ("bad key.cls", b"2"),
        ("neg.jpeg", JPG), ("neg.cls", b" -1\n"),
        ("good.webp", JPG), ("good.cls", b"1"),
        ("__meta__", b"x"),
    ])
    items = list(iter_shard(tar))
    assert items[0] == Sample("good", JPG, "jpg", 1)
    assert items[6] == Sample("neg", JPG, "jpg", -1)        # range is the caller's job
    assert check_label(items[6].label, 10) == "label -1 out of range 0..9" and check_label(9, 10) is None
    skips = [(i.key, i.reason.split(":")[0].split(" '")[0].split(" (")[0]) for i in items if isinstance(i, Skip)]
    assert skips == [("nolabel", "no .cls label member"), ("nolabelint", "label b'one' is not an integer"),
                     ("noimage", "no image member"), ("img.v2", "key contains a dot"),
                     ("bad key", "invalid sample key"), ("good", "duplicate key in shard")]
    assert all(i.shard == "s.tar" for i in items if isinstance(i, Skip))
    unlabeled = [i for i in iter_shard(tar, require_label=False) if isinstance(i, Sample)]
    assert ("nolabel", None) in [(s.key, s.label) for s in unlabeled]


@pytest.mark.parametrize("cut", [0, 512 + 100, 200])  # between members, inside data, inside a header
def test_iter_shard_truncated(tmp_path, cut):
    tar = write_tar(tmp_path / "s.tar", [m for i in range(3) for m in ((f"k{i}.jpg", JPG), (f"k{i}.cls", b"0"))])
    with tarfile.open(tar) as t:
        k2 = t.getmember("k2.jpg").offset
    tar.write_bytes(tar.read_bytes()[:k2 + cut])
    items = list(iter_shard(tar))
    assert [i.key for i in items[:-1]] == ["k0", "k1"] and all(isinstance(i, Sample) for i in items[:-1])
    assert items[-1].key == SHARD_SKIP_KEY and items[-1].shard == "s.tar"
    assert items[-1].reason.startswith("truncated tar:")


def test_iter_shard_complete_pending_sample_and_corrupt_header(tmp_path):
    tar = write_tar(tmp_path / "s.tar", [("a.jpg", JPG), ("a.cls", b"0"), ("b.jpg", JPG), ("b.cls", b"1")])
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as t:
        off = t.getmember("b.jpg").offset
    data[off:off + 512] = b"\x07" * 512                         # garbage where b.jpg's header was
    tar.write_bytes(bytes(data))
    items = list(iter_shard(tar))
    assert [type(i).__name__ for i in items] == ["Sample", "Skip"]
    assert items[0].key == "a"                                  # complete when the damage was found
    assert items[1].key == "*" and items[1].reason.startswith("corrupt tar: invalid header")
    # cut after a.jpg: the pending sample is incomplete and named in the reason
    with tarfile.open(write_tar(tmp_path / "t.tar", [("a.jpg", JPG), ("a.cls", b"0")])) as t:
        off = t.getmember("a.cls").offset
    (tmp_path / "t.tar").write_bytes((tmp_path / "t.tar").read_bytes()[:off])
    [skip] = iter_shard(tmp_path / "t.tar")
    assert skip.key == "*" and "sample 'a' incomplete" in skip.reason


def test_iter_shard_not_a_tar(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"hello, not a tar" * 10)
    (tmp_path / "e.tar").write_bytes(b"")
    for name in ("x.tar", "e.tar"):
        [skip] = iter_shard(tmp_path / name)
        assert skip.key == "*" and skip.reason.startswith("not a tar file")
    with pytest.raises(UserError, match="shard not found"):
        list(iter_shard(tmp_path / "missing.tar"))


def test_probe_image():
    assert probe_image(JPG) is None and probe_image(image_bytes("PNG")) is None
    assert probe_image(b"garbage") == "not an image Pillow can identify"
    broken_png = bytearray(image_bytes("PNG"))
    broken_png[-20] ^= 0xFF                                     # inside IDAT: the checksum fails
    assert probe_image(bytes(broken_png)).startswith("unreadable image")
    truncated = JPG[: len(JPG) // 2]
    assert probe_image(truncated, decode=True).startswith("unreadable image")


# ---------------------------------------------------------------------------------------------
# resolve_shards

def test_resolve_shards(image_tree, tmp_path):
    src, _ = image_tree
    out = tmp_path / "out"
    index, _ = make_shards(src, out, shard_size=2, shuffle=False)               # 5 shards
    paths, got = resolve_shards(out)
    assert [p.name for p in paths] == [s.name for s in index.shards] and got == index
    paths, got = resolve_shards(f"{out}/train-{{000001..000003}}.tar")
    assert [p.name for p in paths] == ["train-000001.tar", "train-000002.tar", "train-000003.tar"]
    assert got.classes == index.classes and got.num_samples == 6
    paths, got = resolve_shards(str(out / "train-000004.tar"))
    assert len(paths) == 1 and got.num_samples == 1
    (out / "index.json").unlink()
    (out / "notes.txt").write_text("x")
    paths, got = resolve_shards(out)
    assert got is None and [p.name for p in paths] == [s.name for s in index.shards]
    with pytest.raises(UserError, match=r"1 of the 6 shards named by .* do not exist, e.g. .*train-000005\.tar"):
        resolve_shards(f"{out}/train-{{000000..000005}}.tar")
    with pytest.raises(UserError, match="shards not found: .*nothing"):
        resolve_shards(tmp_path / "nothing")
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="no .tar files in .*none"):
        resolve_shards(tmp_path / "none")


# ---------------------------------------------------------------------------------------------
# demo data (shards/demo) and its generator

def test_demo_shards_are_consistent(demo_dir):
    for split, n_shards in (("train", 4), ("val", 2)):
        paths, index = resolve_shards(demo_dir / split)
        assert len(paths) == n_shards and index.classes == [f"digit_{i}" for i in range(10)]
        for path, entry in zip(paths, index.shards):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    assert resolve_shards(demo_dir / "train")[1].num_samples + resolve_shards(demo_dir / "val")[1].num_samples == 1797
    first = next(iter_shard(paths[0]))
    assert first.ext == "jpg" and probe_image(first.data, decode=True) is None


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (tool-only dependency) not installed")
def test_demo_data_regenerates_byte_for_byte(demo_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--out", str(tmp_path)],
                   check=True, env=env, capture_output=True)
    for split in ("train", "val"):
        assert (tmp_path / split / "index.json").read_bytes() == (demo_dir / split / "index.json").read_bytes()
        for entry in ShardIndex.read(demo_dir / split).shards:
            assert hashlib.sha256((tmp_path / split / entry.name).read_bytes()).hexdigest() == entry.sha256


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_demo_teacher(demo_dir):
    torch = pytest.importorskip("torch")
    import json
    meta = json.loads((demo_dir / "teacher.json").read_text())
    assert hashlib.sha256((demo_dir / "teacher.pt").read_bytes()).hexdigest() == meta["sha256"]
    assert meta["input_size"] == 32 and meta["num_classes"] == 10 and meta["val_accuracy_centre"] >= 0.97
    model = torch.jit.load(str(demo_dir / "teacher.pt"))
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10) and model(torch.zeros(1, 3, 48, 40)).shape == (1, 10)


def test_read_samples_returns_the_named_samples_like_iter_shard(tmp_path):
    """The notebook's random access: the samples of some keys, equal to what a full read yields."""
    from distill.data.shards import iter_shard, read_samples
    from pathlib import Path
    shard = sorted((Path(__file__).resolve().parents[1] / "shards/demo/train").glob("*.tar"))[0]
    every = [x for x in iter_shard(shard) if not hasattr(x, "reason")]
    want = [every[3].key, every[-1].key, every[0].key, "no-such-key"]
    got = read_samples(shard, want)
    assert sorted(got) == sorted(want[:3])
    for x in every:
        if x.key in got:
            assert got[x.key] == x

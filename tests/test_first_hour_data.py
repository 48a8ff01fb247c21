"""A new user's first hour with data (issue 15 items 3-4): make-shards from a CSV of class names,
``inspect`` of any shards cache-teacher takes (also without index.json), and skipped samples named
with their reasons in the cache-teacher / filter-labels summaries and in ``inspect`` (``--skipped``: TSV)."""
from __future__ import annotations

import shutil

import pytest

from conftest import DEMO_DIR, DEMO_POLICY, DEMO_TEACHER, image_bytes, write_tar
from distill.cli import main
from distill.data.shards import iter_shard
from distill.format import ShardIndex


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _images(root, names) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / name).write_bytes(image_bytes("PNG" if name.endswith(".png") else "JPEG", seed=i))


def _labels(out) -> dict[str, int]:
    return {s.key: s.label for p in sorted(out.glob("*.tar")) for s in iter_shard(p)}


def _one_line_error(rc, err, *parts) -> None:
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


# ----------------------------------------------------------------------------- make-shards: class-name labels

def test_make_shards_csv_of_class_names(tmp_path, capsys):
    _images(tmp_path / "img", ["a.jpg", "b.png", "c.jpg", "d.jpg"])
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nimg/a.jpg,dog\nimg/b.png,cat\nimg/c.jpg,dog\nimg/d.jpg,bird\nimg/missing.jpg,cat\n")
    # no --classes: the sorted set of names
    rc, out, err = _run(capsys, "make-shards", csv, tmp_path / "o1", "--quiet", "--no-shuffle")
    assert rc == 0, err
    assert "wrote 4 samples in 1 shard(s) of 3 classes" in out
    assert ShardIndex.read(tmp_path / "o1").classes == ["bird", "cat", "dog"]
    assert _labels(tmp_path / "o1") == {"a": 2, "b": 1, "c": 2, "d": 0}
    # --classes FILE: its order, extra names allowed
    (tmp_path / "classes.txt").write_text("dog\ncat\nbird\nfish\n")
    rc, _, err = _run(capsys, "make-shards", csv, tmp_path / "o2", "--classes", tmp_path / "classes.txt", "--quiet")
    assert rc == 0, err
    assert ShardIndex.read(tmp_path / "o2").classes == ["dog", "cat", "bird", "fish"]
    assert _labels(tmp_path / "o2") == {"a": 0, "b": 1, "c": 0, "d": 2}
    # a name the classes file lacks: one line naming the name, the line and the file
    (tmp_path / "few.txt").write_text("dog\ncat\n")
    rc, _, err = _run(capsys, "make-shards", csv, tmp_path / "o3", "--classes", tmp_path / "few.txt", "--quiet")
    _one_line_error(rc, err, "labels.csv line 5", "'bird'", "few.txt")
    assert not (tmp_path / "o3").exists()
    # a TSV of names with a header, and a single-row CSV of a name (no header to guess)
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("file\tclass\nimg/a.jpg\tzebra\nimg/b.png\tant\n")
    rc, _, err = _run(capsys, "make-shards", tsv, tmp_path / "o4", "--quiet")
    assert rc == 0, err
    assert ShardIndex.read(tmp_path / "o4").classes == ["ant", "zebra"] and _labels(tmp_path / "o4") == {"a": 1, "b": 0}
    one = tmp_path / "one.csv"
    one.write_text("img/c.jpg,owl\n")
    rc, _, err = _run(capsys, "make-shards", one, tmp_path / "o5", "--quiet")
    assert rc == 0, err
    assert ShardIndex.read(tmp_path / "o5").classes == ["owl"] and _labels(tmp_path / "o5") == {"c": 0}


def test_make_shards_integer_labels_unchanged_and_mixed_refused(tmp_path, capsys):
    _images(tmp_path / "img", ["a.jpg", "b.png"])
    (tmp_path / "names.txt").write_text("zero\none\n")
    ints = tmp_path / "ints.csv"
    ints.write_text("path,label\nimg/a.jpg,1\nimg/b.png,0\n")
    rc, _, err = _run(capsys, "make-shards", ints, tmp_path / "o1", "--classes", tmp_path / "names.txt", "--quiet")
    assert rc == 0, err
    assert ShardIndex.read(tmp_path / "o1").classes == ["zero", "one"] and _labels(tmp_path / "o1") == {"a": 1, "b": 0}
    ints.write_text("img/a.jpg,2\nimg/b.png,0\n")
    rc, _, err = _run(capsys, "make-shards", ints, tmp_path / "o2", "--quiet")
    assert rc == 0, err
    assert ShardIndex.read(tmp_path / "o2").classes == ["0", "1", "2"] and _labels(tmp_path / "o2") == {"a": 2, "b": 0}
    # integers then a name, and a name then an integer: one line naming both lines
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("path,label\nimg/a.jpg,1\nimg/b.png,cat\n")
    rc, _, err = _run(capsys, "make-shards", mixed, tmp_path / "o3", "--quiet")
    _one_line_error(rc, err, "mixed.csv line 3: label 'cat' is not an integer but line 2's label 1 is")
    mixed.write_text("img/a.jpg,cat\nimg/b.png,1\n")
    rc, _, err = _run(capsys, "make-shards", mixed, tmp_path / "o4", "--quiet")
    _one_line_error(rc, err, "mixed.csv line 2: label '1' is an integer but line 1's label 'cat' is a class name")


def test_inspect_shards_lists_make_time_skips(tmp_path, capsys):
    _images(tmp_path / "img", ["a.jpg"])
    csv = tmp_path / "labels.csv"
    csv.write_text("img/a.jpg,cat\nimg/gone.jpg,dog\nimg/notes.txt,dog\n")
    assert _run(capsys, "make-shards", csv, tmp_path / "out", "--quiet")[0] == 0
    rc, out, err = _run(capsys, "inspect", tmp_path / "out")
    assert rc == 0, err
    assert "skipped at creation: 2" in out
    assert "gone (img/gone.jpg): cannot read file: No such file or directory" in out
    assert f"full list: {tmp_path / 'out' / 'index.json'}" in out and "--skipped" in out
    rc, out, err = _run(capsys, "inspect", tmp_path / "out", "--skipped")
    assert rc == 0, err
    rows = out.splitlines()
    assert rows[0] == "shard\tkey\treason" and len(rows) == 3
    assert "img/gone.jpg\tgone\tcannot read file: No such file or directory" in rows
    assert any(r.startswith("img/notes.txt\tnotes\tnot an image file extension") for r in rows)


# ----------------------------------------------------------------------------- inspect: shards without index.json

def test_inspect_a_bare_folder_of_tars_and_a_pattern(tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        shutil.copy2(DEMO_DIR / "train" / name, bare / name)
    good = image_bytes("JPEG", (32, 32), seed=3)
    write_tar(bare / "extra-000000.tar", [("e0.jpg", good), ("e0.cls", b"4"), ("nolabel.jpg", good)])
    rc, out, err = _run(capsys, "inspect", bare)
    assert rc == 0, err
    assert f"shards: {bare} (no index.json; 3 .tar file(s)" in out
    assert "721 samples, 10 distinct labels (0..9), 1 skipped: counted from the tar headers and labels of all 3 shard(s)" in out
    assert "nolabel (extra-000000.tar): no .cls label member" in out
    assert "train-000000.tar: 360 samples" in out and "classes from the teacher" in out
    rc, out, err = _run(capsys, "inspect", bare, "--skipped")
    assert rc == 0 and out.splitlines() == ["shard\tkey\treason", "extra-000000.tar\tnolabel\tno .cls label member"], err
    # a brace pattern, as cache-teacher takes it
    rc, out, err = _run(capsys, "inspect", f"{bare}/train-{{000000..000001}}.tar")
    assert rc == 0, err
    assert "(no index.json; 2 .tar file(s)" in out and "720 samples, 10 distinct labels (0..9), 0 skipped" in out
    # a folder of neither: one line
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(capsys, "inspect", tmp_path / "empty")
    _one_line_error(rc, err, "is not a distill shard (index.json or .tar files)")


# ----------------------------------------------------------------------------- skips named: cache-teacher, filter-labels

def _bad_shards(tmp_path):
    """Two tars without an index (10 classes from the teacher): 3 bad samples in one, 9 unlabelled in the other."""
    d = tmp_path / "bad"
    good = image_bytes("JPEG", (40, 40), seed=1)
    write_tar(d / "s-000000.tar", [
        ("ok0.jpg", good), ("ok0.cls", b"3"),
        ("corrupt.jpg", good[:60]), ("corrupt.cls", b"1"),      # truncated JPEG
        ("nolabel.jpg", good),                                  # no .cls
        ("outofrange.jpg", good), ("outofrange.cls", b"12"),    # 10 classes
        ("ok1.png", image_bytes("PNG", (30, 50), seed=2)), ("ok1.cls", b"4")])
    write_tar(d / "s-000001.tar", [("ok2.jpg", good), ("ok2.cls", b"5")] + [(f"nl{i}.jpg", good) for i in range(9)])
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\n" + "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in DEMO_POLICY.items()) + "\n")
    return d, policy


@pytest.mark.usefixtures("ray_local")
def test_cache_teacher_summary_and_inspect_name_the_skips(tmp_path, capsys):
    shards, policy = _bad_shards(tmp_path)
    cache = tmp_path / "cache"
    rc, out, err = _run(capsys, "cache-teacher", "--shards", shards, "--teacher", DEMO_TEACHER, "--out", cache,
                        "--epochs", "1", "--topk", "5", "--teacher-input-size", "32", "--policy", policy,
                        "--workers", "1", "--threads", "1", "--quiet")
    assert rc == 0, (out, err)
    assert "skipped 12" in out
    assert (f"  skipped 12 sample(s), first 10 shown (full list: {cache / 'manifest.json'}, \"skipped\" of each "
            f"shard, or: distill inspect {cache} --skipped):") in out
    assert "    corrupt (s-000000.tar): cannot decode image" in out
    assert "    nolabel (s-000000.tar): no .cls label member" in out
    assert "    outofrange (s-000000.tar): label 12 out of range 0..9" in out
    assert "    ... and 2 more" in out and out.count("(s-000001.tar): no .cls label member") == 7
    # inspect CACHE: the same list and where the full one is
    rc, out, err = _run(capsys, "inspect", cache)
    assert rc == 0, err
    assert "skipped 12, excluded 0" in out and "first 10 shown" in out and f"distill inspect {cache} --skipped" in out
    assert "    corrupt (s-000000.tar): cannot decode image" in out and "first records:" in out
    # inspect CACHE --skipped: all of them, as TSV
    rc, out, err = _run(capsys, "inspect", cache, "--skipped")
    assert rc == 0, err
    rows = [r.split("\t") for r in out.splitlines()]
    assert rows[0] == ["shard", "key", "reason"] and len(rows) == 13 and all(len(r) == 3 for r in rows)
    why = {(r[0], r[1]): r[2] for r in rows[1:]}
    assert set(why) == {("s-000000.tar", k) for k in ("corrupt", "nolabel", "outofrange")} | {
        ("s-000001.tar", f"nl{i}") for i in range(9)}
    assert why[("s-000000.tar", "outofrange")] == "label 12 out of range 0..9"
    assert why[("s-000001.tar", "nl8")] == "no .cls label member"


@pytest.mark.usefixtures("ray_local")
def test_filter_labels_summary_and_inspect_name_the_skips(tmp_path, capsys):
    shards, _ = _bad_shards(tmp_path)
    out_dir = tmp_path / "filter"
    rc, out, err = _run(capsys, "filter-labels", "--shards", shards, "--scorer", DEMO_TEACHER, "--out", out_dir,
                        "--scorer-input-size", "32", "--topk", "5", "--rule", "topk:5", "--workers", "1",
                        "--threads", "1", "--quiet")
    assert rc == 0, (out, err)
    assert (f"  skipped 12 sample(s), first 10 shown (full list: {out_dir / 'summary.json'}, \"skipped\", "
            f"or: distill inspect {out_dir} --skipped):") in out
    assert "    corrupt (s-000000.tar): cannot decode image" in out and "    ... and 2 more" in out
    rc, out, err = _run(capsys, "inspect", out_dir)
    assert rc == 0, err
    assert "skipped 12" in out and "    outofrange (s-000000.tar): label 12 out of range 0..9" in out
    rc, out, err = _run(capsys, "inspect", out_dir, "--skipped")
    assert rc == 0, err
    rows = out.splitlines()
    assert rows[0] == "shard\tkey\treason" and len(rows) == 13 and "s-000001.tar\tnl0\tno .cls label member" in rows

"""The command line: every subcommand has --help, user errors are one line with exit 2, make-shards
round-trips a folder tree, pipeline files and flags set the same options, layering holds."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, SMALL_TREE, run_group, write_image_tree
from distill import config as C
from distill.cli import build_parser
from distill.format import ShardIndex
from distill.files import UserError
from distill.data.shards import iter_shard

COMMANDS = ["make-shards", "adapt-teacher", "filter-labels", "cache-teacher", "train-student", "verify", "inspect", "run", "demo"]


def distill(*argv, cwd=None):
    return run_group([sys.executable, "-m", "distill.cli", *argv], env=dict(os.environ, PYTHONPATH=str(REPO)),
                     cwd=cwd, timeout=300)


def test_help_lists_every_subcommand():
    r = distill("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout
    parser = build_parser()
    for c in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([c, "--help"])
        assert e.value.code == 0


def test_make_shards_round_trip_through_the_cli(tmp_path):
    written = write_image_tree(tmp_path / "src", SMALL_TREE)
    r = distill("make-shards", tmp_path / "src", tmp_path / "out", "--shard-size", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "wrote 9 samples in 3 shard(s) of 3 classes" in r.stdout and "skipped 0" in r.stdout
    idx = ShardIndex.read(tmp_path / "out")
    assert idx.classes == ["bird", "cat", "dog"] and [s.samples for s in idx.shards] == [4, 4, 1]
    got = {s.key: s for p in sorted((tmp_path / "out").glob("*.tar")) for s in iter_shard(p)}
    for rel, data in written.items():
        cls, name = rel.split("/")
        s = got[name.rsplit(".", 1)[0]]
        assert s.data == data and s.label == idx.classes.index(cls)


@pytest.mark.parametrize("case", ["missing", "empty", "badlabel", "duplicate"])
def test_make_shards_bad_input_exit_2(tmp_path, case):
    src = tmp_path / "src"
    if case == "empty":
        src.mkdir()
    elif case == "badlabel":
        write_image_tree(tmp_path / "img", {"a": ["x.jpg"]})
        src = tmp_path / "list.csv"
        src.write_text("path,label\nimg/a/x.jpg,0\nimg/a/x.jpg,cat\n")   # integers and a class name: refused
    elif case == "duplicate":
        write_image_tree(src, {"a": ["same.jpg"], "b": ["same.png"]})
    r = distill("make-shards", src, tmp_path / "out", "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert {"missing": "not found", "empty": "no images", "badlabel": "integer", "duplicate": "same"}[case] in r.stderr.lower()


def test_pipeline_and_flags_set_the_same_options(tmp_path):
    pipe = tmp_path / "p.toml"
    pipe.write_text('[data]\ntrain = "a"\nval = "v"\n[cache-teacher]\nteacher = ["t.pt"]\nout = "o"\nepochs = 3\n'
                    'teacher-mean = [0.5, 0.5, 0.5]\n[train-student]\nout = "r"\nimage-size = 64\n')
    args = build_parser().parse_args(["cache-teacher", "--config", str(pipe), "--epochs", "5", "--topk", "7",
                                      "--teacher-std", "0.2,0.2,0.2"])
    from distill.cli import _stage_config
    cfg, _ = _stage_config(C.CacheConfig, "cache-teacher", args)
    assert (cfg.shards, cfg.teacher, cfg.out, cfg.epochs, cfg.topk) == ("a", ("t.pt",), "o", 5, 7)
    assert cfg.teacher_mean == (0.5, 0.5, 0.5) and cfg.teacher_std == (0.2, 0.2, 0.2)
    t = C.build(C.TrainConfig, C.load_pipeline(pipe).stage_layer("train-student"))
    assert t.val_shards == "v" and t.image_size == 64
    with pytest.raises(UserError, match="unknown key 'epoch'"):
        C.build(C.CacheConfig, {"epoch": 3, "shards": "a", "out": "o"})
    pipe.write_text("[cache-teacher]\nepochs = 'many'\n")
    with pytest.raises(UserError, match="bad value for epochs"):
        C.build(C.CacheConfig, {"shards": "a", "out": "o"}, C.load_pipeline(pipe).stage_layer("cache-teacher"))


def test_unreadable_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache-teacher\n")
    r = distill("run", bad)
    assert r.returncode == 2 and "cannot parse" in r.stderr and r.stderr.count("\n") == 1
    r = distill("run", tmp_path / "none.toml")
    assert r.returncode == 2 and "not found" in r.stderr


def test_layering_format_and_trainer_imports():
    """format/config import neither torch nor Ray; the trainer never imports teacher code."""
    code = ("import sys, distill.format, distill.files, distill.config, distill.filter.rules, distill.cache.reader; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad; "
            "import distill.train, distill.train.losses; assert 'distill.teachers' not in sys.modules; "
            "assert 'ray' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr


def test_ci_runs_the_readme_test_command():
    import re
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_cmd = [line for b in blocks for line in b.splitlines() if "pytest" in line and not line.startswith("#")][0]
    assert test_cmd.strip() in (REPO / ".ci" / "run").read_text()

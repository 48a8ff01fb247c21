"""Nothing silently wrong: each test pins one way a cache or a student could be wrong without a word
(issue "trust the cache"): scoring caches, teacher weights and precision, duplicates, corrupt files,
concurrent runs, replay drift, unfair baselines, late validation, import-time side effects."""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEMO_POLICY, DEMO_TEACHER, REPO, cache_config, demo_head, demo_subset, image_bytes, run_group, write_tar, one_line_error
from distill.cache import cache_teacher, open_cache, verify_cache
from distill.config import FilterConfig, TrainConfig
from distill.files import LOCK_NAME, UserError
from distill.format import MANIFEST_NAME, RUN_NAME

pytestmark = pytest.mark.usefixtures("ray_local")
SHARDS = ["train-000000.tar", "train-000001.tar"]


def _cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *(env or {}).pop("PYTHONPATH", "").split(os.pathsep)]),
               **(env or {}))
    return run_group([sys.executable, "-m", "distill.cli", *args], env=env, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """Demo shards (2, their first 96 samples each), a cache over them and a filter's scoring cache."""
    from distill.filter import filter_labels
    tmp = tmp_path_factory.mktemp("trust")
    shards = demo_head(tmp, 96, SHARDS)
    cache_teacher(cache_config(shards, tmp / "cache", epochs=2), DEMO_POLICY)
    filter_labels(FilterConfig(shards=str(shards), scorer=(str(DEMO_TEACHER),), out=str(tmp / "filter"),
                               scorer_input_size=32, topk=5, quiet=True, workers=1, threads=1))
    return tmp, shards


def _train_args(shards, cache, out, *extra):
    return ["train-student", "--shards", shards, "--cache", cache, "--out", out, "--model", "tinyvit-tiny",
            "--image-size", "32", "--batch-size", "64", "--epochs", "1", "--quiet", *extra]


def _copy_cache(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- 1. one replay path

def test_train_student_refuses_a_scoring_cache(built, tmp_path):
    tmp, shards = built
    r = _cli(*_train_args(shards, tmp / "filter" / "scoring", tmp_path / "run"))
    one_line_error(r, "scoring cache")
    assert not (tmp_path / "run").exists()


def test_every_consumer_replays_a_scoring_cache_as_centre_views(built):
    """reader, figures' tensor path and the student loader all get the centre view of a scoring cache."""
    from distill.data import augment, views
    from distill.data.shards import iter_shard
    tmp, shards = built
    c = open_cache(tmp / "filter" / "scoring")
    key = c.keys()[0]
    item = next(x for x in iter_shard(shards / SHARDS[0]) if getattr(x, "key", None) == key)
    src = augment.SourceImage(item.data)
    centre = augment.view(src, augment.decode_center(src.width, src.height, 0.875), 32, c.teacher["mean"], c.teacher["std"])
    assert torch.equal(c.view_tensor(key, 0, "teacher"), centre)
    assert c.augmentation(key, 0)["crop"] == augment.decode_center(src.width, src.height, 0.875)["crop"]
    spec = views.ViewSpec.from_manifest(c.manifest)
    for seed in (0, 1, 2 ** 32 - 1):     # whatever the seed, one view
        assert spec.params(seed, src.width, src.height) == augment.decode_center(src.width, src.height, 0.875)


# ----------------------------------------------------------------------------- 2. teacher identity = weights

def test_timm_teacher_without_checkpoint_exits_2(tmp_path):
    r = _cli("cache-teacher", "--shards", REPO / "shards/demo/train", "--teacher", "timm:test_vit",
             "--out", tmp_path / "c", "--quiet")
    if "timm teachers need the timm extra" in r.stderr:
        one_line_error(r, "timm")
        pytest.skip("timm not installed: the refusal of a checkpoint-less timm teacher is tested in test_teachers.py")
    one_line_error(r, "random", "--teacher-checkpoint")
    assert not (tmp_path / "c").exists()


WEIGHTS_TEACHER = '''
from pathlib import Path
import torch
from torch import nn

def build():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    m.load_state_dict(torch.load(Path(__file__).with_name("w.pt"), weights_only=True))
    return m
'''


def test_resume_with_other_weights_is_refused(tmp_path):
    """A module:callable teacher whose weights file changes (same source file) is another teacher."""
    mod = tmp_path / "mod"
    mod.mkdir()
    (mod / "wteacher.py").write_text(WEIGHTS_TEACHER)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10))
    torch.save(net.state_dict(), mod / "w.pt")
    shards = demo_head(tmp_path, 64)
    args = ["cache-teacher", "--shards", shards, "--teacher", "wteacher:build", "--out", tmp_path / "c",
            "--teacher-input-size", "32", "--epochs", "1", "--topk", "3", "--workers", "1", "--threads", "1", "--quiet"]
    env = {"PYTHONPATH": str(mod)}
    first = _cli(*args, env=dict(env))
    assert first.returncode == 0, first.stderr[-2000:]
    members = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())["teacher"]["members"]
    assert members[0]["weights_sha256"]
    with torch.no_grad():
        net[-1].bias[0] += 1e-3                     # one weight changes; the module's source does not
    torch.save(net.state_dict(), mod / "w.pt")
    again = _cli(*args, env=dict(env))
    one_line_error(again, "different teacher")


# ----------------------------------------------------------------------------- 3. teacher precision

def test_precision_and_device_are_recorded_and_verified(tmp_path):
    shards = demo_head(tmp_path, 64)
    cache_teacher(cache_config(shards, tmp_path / "c", epochs=1, teacher_precision="bf16"), DEMO_POLICY)
    m = open_cache(tmp_path / "c").manifest
    assert m["teacher"]["precision"] == "bf16" and m["teacher"]["device_type"] == "cpu"
    res = verify_cache(tmp_path / "c", recompute=8, teacher=(str(DEMO_TEACHER),))
    assert res.precision == "bf16" and res.recomputed == 8 and res.ok, res.summary()
    assert "at bf16" in res.summary()
    # the same command at another precision is another cache: refused, not mixed
    with pytest.raises(UserError, match="different teacher"):
        cache_teacher(cache_config(shards, tmp_path / "c", epochs=1, teacher_precision="fp32"), DEMO_POLICY)
    with pytest.raises(UserError, match="precision"):
        cache_teacher(cache_config(shards, tmp_path / "d", epochs=1, teacher_precision="int8"), DEMO_POLICY)


# ----------------------------------------------------------------------------- 4. duplicates inside a shard

def test_duplicate_keys_inside_a_shard_fail_the_run(tmp_path):
    d = tmp_path / "dup"
    img = image_bytes("JPEG", (40, 40))
    write_tar(d / "a-000000.tar", [("k0.jpg", img), ("k0.cls", b"0"), ("k1.jpg", img), ("k1.cls", b"1"),
                                   ("k1.jpg", img), ("k1.cls", b"2")])
    res = cache_teacher(cache_config(d, tmp_path / "c", epochs=1), DEMO_POLICY)
    assert res.failed and "duplicate keys" in res.failed[-1] and "k1 (a-000000.tar)" in res.failed[-1], res.failed
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()


# ----------------------------------------------------------------------------- 6. corrupt cache files

def test_a_flipped_byte_stops_train_student_before_any_step(built, tmp_path):
    tmp, shards = built
    cache = _copy_cache(tmp / "cache", tmp_path / "cache")
    f = cache / "train-000001.arrow"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01                        # same size, one bit
    f.write_bytes(bytes(data))
    r = _cli(*_train_args(shards, cache, tmp_path / "run"))
    one_line_error(r, "train-000001.arrow", "distill verify")
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_under_ddp_each_rank_checks_part_and_all_ranks_stop(built, tmp_path):
    """2 gloo ranks: the damaged file is in rank 1's half of the check; both ranks stop with its name."""
    tmp, shards = built
    cache = _copy_cache(tmp / "cache", tmp_path / "cache")
    f = cache / "train-000001.arrow"                   # manifest order: shard 1 is checked by rank 1
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys, torch
torch.set_num_threads(1)
from distill.cli import main
sys.exit(main({_train_args(str(shards), str(cache), str(tmp_path / 'run'), '--device', 'cpu')!r}))
""")
    t0 = time.time()
    r = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script],
                  cwd=REPO, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert r.returncode != 0 and time.time() - t0 < 120
    errors = [line for line in r.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 2 and all("train-000001.arrow" in e and "distill verify" in e for e in errors), r.stderr[-3000:]
    assert not (tmp_path / "run" / "config.json").exists()


def test_readers_check_each_file_before_use(built, tmp_path):
    from distill.files import FormatError
    tmp, _ = built
    cache = _copy_cache(tmp / "cache", tmp_path / "cache")
    f = cache / "train-000000.arrow"
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="train-000000.arrow.*checksum differs.*distill verify"):
        open_cache(cache).to_table()
    with pytest.raises(FormatError, match="train-000000.arrow"):
        open_cache(cache).record(open_cache(tmp / "cache").keys()[0], 0)


# ----------------------------------------------------------------------------- 7. one run per output directory

# slow: two real cache-teacher runs; test_out_dirs' lock test covers the refusal in seconds
@pytest.mark.slow
def test_second_concurrent_cache_teacher_exits_2_naming_the_first(tmp_path):
    shards = demo_subset(tmp_path, SHARDS)
    out = tmp_path / "c"
    args = ["cache-teacher", "--shards", shards, "--teacher", DEMO_TEACHER, "--teacher-input-size", "32",
            "--epochs", "6", "--topk", "5", "--out", out, "--workers", "1", "--threads", "1", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, "-m", "distill.cli", *map(str, args)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / LOCK_NAME).exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert (out / LOCK_NAME).exists(), "the first run never took the lock"
    os.kill(first.pid, signal.SIGSTOP)          # held while the second tries: it cannot finish first
    try:
        second = _cli(*args, "--overwrite")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    one_line_error(second, "in use", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert not (out / LOCK_NAME).exists()
    res = verify_cache(out, recompute=4, teacher=(str(DEMO_TEACHER),))
    assert res.ok, res.summary()
    assert open_cache(out).num_records == 6 * open_cache(out).num_samples


def test_a_failed_rerun_keeps_the_old_manifest(built, tmp_path):
    tmp, shards = built
    cache = _copy_cache(tmp / "cache", tmp_path / "cache")
    before = (cache / MANIFEST_NAME).read_bytes()
    (cache / "train-000001.arrow").unlink()            # one shard to redo; its worker dies every time
    from distill.hooks import KILL_ONCE_ENV as FAULT_ENV
    marker = tmp_path / "never"
    os.environ[FAULT_ENV] = str(marker)
    try:                                                # the fault hook travels to the workers (engine.run_pool)
        res = cache_teacher(cache_config(shards, cache, epochs=2, retries=0), DEMO_POLICY)
    finally:
        del os.environ[FAULT_ENV]
    assert res.failed
    assert (cache / MANIFEST_NAME).read_bytes() == before


def test_overwrite_never_deletes_a_cache_being_read(built, tmp_path):
    from distill.files import live_readers
    tmp, shards = built
    cache = _copy_cache(tmp / "cache", tmp_path / "cache")
    code = ("import sys, time; from distill.files import ReaderMark\n"
            f"with ReaderMark({str(cache)!r}, 'train-student'):\n    print('reading', flush=True); time.sleep(60)")
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert reader.stdout.readline().strip() == "reading"
        files = sorted(p.name for p in cache.iterdir())
        with pytest.raises(UserError, match=f"being read by distill train-student \\(pid {reader.pid}"):
            cache_teacher(cache_config(shards, cache, epochs=3, overwrite=True), DEMO_POLICY)
        assert sorted(p.name for p in cache.iterdir()) == files          # nothing deleted
    finally:
        reader.kill()
        reader.wait()
    assert live_readers(cache) == [] and not list(cache.glob(".distill.reader.*"))   # a dead reader's mark is cleared


def test_train_student_locks_its_run_directory(built, tmp_path):
    from distill.files import DirLock
    tmp, shards = built
    with DirLock(tmp_path / "run", "train-student").acquire():
        r = _cli(*_train_args(shards, tmp / "cache", tmp_path / "run"))
    one_line_error(r, "in use", f"pid {os.getpid()}")


def test_filter_labels_locks_its_directory(tmp_path):
    from distill.files import DirLock
    args = ["filter-labels", "--shards", REPO / "shards/demo/train", "--scorer", DEMO_TEACHER,
            "--scorer-input-size", "32", "--out", tmp_path / "f", "--quiet"]
    with DirLock(tmp_path / "f", "filter-labels").acquire():
        r = _cli(*args)
    one_line_error(r, "in use", "filter-labels", f"pid {os.getpid()}")
    assert not (tmp_path / "f" / "scoring").exists()


# ----------------------------------------------------------------------------- 8. replay environment

def test_manifest_records_versions_and_fingerprints(built):
    import PIL
    tmp, _ = built
    m = open_cache(tmp / "cache").manifest
    env = m["replay_env"]
    assert env["pillow"] == PIL.__version__ and env["numpy"] == np.__version__ and "libjpeg_turbo" in env
    for e in m["shards"]:
        fp = e["view_fingerprints"]
        assert {f["epoch"] for f in fp} == {0, 1} and len({f["key"] for f in fp}) == 2
        assert all(len(f["sha256"]) == 16 and f["size"] == 32 for f in fp)


def test_a_cache_without_fingerprints_is_said_not_checked(built, tmp_path):
    from distill.train import prepare_data
    tmp, shards = built
    cache = _copy_cache(tmp / "cache", tmp_path / "cache")
    m = json.loads((cache / MANIFEST_NAME).read_text())
    for e in m["shards"]:
        del e["view_fingerprints"]
    (cache / MANIFEST_NAME).write_text(json.dumps(m))
    data = prepare_data(TrainConfig(shards=str(shards), cache=str(cache), out=str(tmp_path / "r"), model="tinyvit-tiny",
                                    image_size=32, quiet=True), None)
    assert any("no view fingerprints" in n for n in data.notes)


def test_inspect_shows_precision_agreement_and_scoring(built):
    tmp, _ = built
    r = _cli("inspect", tmp / "cache")
    assert r.returncode == 0, r.stderr
    assert "fp32 on cpu" in r.stdout and "teacher vs given labels: top-1" in r.stdout and "first records:" in r.stdout
    r = _cli("inspect", tmp / "filter" / "scoring")
    assert r.returncode == 0 and "scoring: centre views" in r.stdout, r.stderr


def _tamper_fingerprint(src: Path, dst: Path) -> Path:
    cache = _copy_cache(src, dst)
    m = json.loads((cache / MANIFEST_NAME).read_text())
    fp = m["shards"][1]["view_fingerprints"][0]
    fp["sha256"] = ("0" if fp["sha256"][0] != "0" else "1") + fp["sha256"][1:]
    (cache / MANIFEST_NAME).write_text(json.dumps(m))
    return cache


def test_a_drifted_view_stops_train_student_and_verify(built, tmp_path):
    tmp, shards = built
    cache = _tamper_fingerprint(tmp / "cache", tmp_path / "cache")
    r = _cli(*_train_args(shards, cache, tmp_path / "run"))
    one_line_error(r, "replay drift", "train-000001.tar", "--allow-replay-drift")
    assert not (tmp_path / "run" / "config.json").exists()
    res = verify_cache(cache)
    assert not res.ok and any("train-000001.tar" in p for p in res.problems)
    assert verify_cache(cache, allow_replay_drift=True).ok
    ok = _cli(*_train_args(shards, cache, tmp_path / "run2", "--allow-replay-drift"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert any("allow-replay-drift" in n and "train-000001.tar" in n for n in summary["notes"])


# ----------------------------------------------------------------------------- 9. fair baseline, honest summaries

def _flag_some(src: Path, dst: Path, n: int) -> Path:
    """A copy of a filter directory whose first n scored samples are flagged (keep = false)."""
    import pyarrow as pa
    from distill.files import atomic_write_bytes
    from distill.format import FILTER_SCORES_NAME, ipc_bytes, read_ipc
    _copy_cache(src, dst)
    t = read_ipc(dst / FILTER_SCORES_NAME)
    keep = t.column("keep").to_numpy(zero_copy_only=False).copy()
    keep[:n] = False
    t = t.set_column(t.schema.get_field_index("keep"), "keep", pa.array(keep))
    atomic_write_bytes(dst / FILTER_SCORES_NAME, ipc_bytes(t))
    from distill.files import sha256_file
    from distill.format import FILTER_SUMMARY_NAME          # the summary describes the new scores
    summary = json.loads((dst / FILTER_SUMMARY_NAME).read_text())
    summary.update(dropped=int((~keep).sum()), scores_sha256=sha256_file(dst / FILTER_SCORES_NAME))
    (dst / FILTER_SUMMARY_NAME).write_text(json.dumps(summary))
    return dst


def test_hard_label_baseline_replays_the_cache_views_and_schedule(built, tmp_path):
    """--hard-labels given --cache: same views per epoch (epoch mod E), same samples and steps, with --exclude."""
    from distill.train import prepare_data
    from distill.train.data import DistillDataset
    tmp, shards = built
    kw = dict(shards=str(shards), cache=str(tmp / "cache"), model="tinyvit-tiny", image_size=32, quiet=True,
              exclude=str(_flag_some(tmp / "filter", tmp_path / "filter", 30)))
    soft = prepare_data(TrainConfig(out=str(tmp_path / "a"), **kw), None)
    hard = prepare_data(TrainConfig(out=str(tmp_path / "b"), hard_labels=True, **kw), None)
    assert hard.samples == soft.samples and hard.excluded == soft.excluded == 30
    assert hard.spec == soft.spec and hard.source == "hard labels"

    def epoch(data, e):
        ds = DistillDataset(data.refs, spec=data.spec, image_size=32, batch_size=64, seed=0, shuffle_buffer=64,
                         cache=data.cache, num_classes=data.num_classes, exclude=data.exclude, drop_last=False)
        ds.set_epoch(e)
        return [(k, x) for b in ds for k, x in zip(b["key"], b["image"])]

    a, b = epoch(soft, 3), epoch(hard, 3)               # E = 2: epoch 3 replays cached epoch 1
    assert [k for k, _ in a] == [k for k, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    one, three = dict(epoch(soft, 1)), dict(a)          # other order (shuffled per epoch), same view per key
    assert one.keys() == three.keys() and all(torch.equal(one[k], three[k]) for k in one)
    assert len(one) == soft.samples


def test_cache_teacher_reports_agreement_and_warns_near_chance(tmp_path):
    shards = demo_head(tmp_path, 64)       # observed top-1 agreement: 0.875 at 32 px, 0.078 at 224 px
    good = cache_teacher(cache_config(shards, tmp_path / "good", epochs=1), DEMO_POLICY)
    assert good.top1_agreement > 0.8 and not good.warnings
    assert open_cache(tmp_path / "good").manifest["teacher_agreement"]["top1"] == good.top1_agreement
    assert "teacher vs given labels" in good.summary()
    # the 32 px demo teacher fed 224 px views (the old default) agrees near chance: one warning line
    bad = cache_teacher(cache_config(shards, tmp_path / "bad", epochs=1, teacher_input_size=224), DEMO_POLICY)
    assert bad.top1_agreement < 0.2 and len(bad.warnings) == 1 and "--teacher-input-size (224)" in bad.warnings[0]


def test_missing_input_size_is_taken_from_a_pt2_teacher_or_warned(tmp_path):
    shards = demo_head(tmp_path, 32)
    res = cache_teacher(cache_config(shards, tmp_path / "ts", epochs=1, teacher_input_size=0), DEMO_POLICY)
    assert any("--teacher-input-size not given" in w for w in res.warnings)
    from helpers.tiny_teacher import build
    prog = torch.export.export(build().eval(), (torch.zeros(2, 3, 48, 48),),
                               dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(prog, tmp_path / "teacher.pt2")
    res = cache_teacher(cache_config(shards, tmp_path / "pt2", epochs=1, teacher_input_size=0,
                                     teacher=(str(tmp_path / "teacher.pt2"),)), DEMO_POLICY)
    assert not any("not given" in w or "differs" in w for w in res.warnings), res.warnings
    assert open_cache(tmp_path / "pt2").teacher["input_size"] == 48


def test_validation_runs_before_anything_is_written(tmp_path):
    args = ["cache-teacher", "--shards", REPO / "shards/demo/train", "--teacher", DEMO_TEACHER,
            "--teacher-input-size", "32", "--out", tmp_path / "c", "--epochs", "1", "--quiet"]
    one_line_error(_cli(*args, "--topk", "11"), "--topk 11 exceeds the teacher's 10 classes")
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- 10. shape

def test_import_distill_changes_no_process_state():
    code = ("import os; os.umask(0o027); import distill, distill.format, distill.files, distill.cache.reader; "
            "u = os.umask(0); print(oct(u))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.stdout.strip() == "0o27", r.stderr


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports (module level and inside functions)."""
    mod = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if mod.endswith(".__init__"):
        mod = mod[: -len(".__init__")]
        base = mod.split(".")
    else:
        base = mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            root = base[: len(base) - node.level + 1] if node.level else []
            name = ".".join(root + ([node.module] if node.module else [])) if node.level else node.module
            if name and name.split(".")[0] == package:
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == package)
    return out


def test_the_package_has_no_import_cycle():
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "distill").rglob("*.py")}
    graph = {m: {d for d in _imports(p, "distill") if d in files and d != m and not m.startswith(d + ".")}
             for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_stage_functions_stay_short():
    long = []
    for p in (REPO / "distill").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 85:
                long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long, long

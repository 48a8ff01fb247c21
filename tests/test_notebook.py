"""Notebook readers on small demo outputs: open_cache (tables, records, soft targets, augmentation,
replay, show), open_filter, open_run, the README snippets and examples/explore.ipynb run headless."""
from __future__ import annotations

import importlib.util
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import DEMO_POLICY, DEMO_TEACHER, REPO, cache_config, demo_subset
import distill
import distill.cache.reader
from distill.data import augment
from distill.format import encode_cache_shard, cache_manifest, ipc_bytes, read_ipc, CACHE_FORMAT, CACHE_VERSION, MANIFEST_NAME
from distill.files import FormatError, UserError, atomic_write_json

pytestmark = pytest.mark.usefixtures("ray_local")
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
SHARD = "train-000000.tar"
MIX_POLICY = dict(DEMO_POLICY, mixup_alpha=0.8, cutmix_alpha=1.0, re_prob=0.5, mix_block=8)


@pytest.fixture(scope="module")
def outs(tmp_path_factory, ray_local):
    """Demo outputs on one shard with 10% flipped labels: filter, cache (2 epochs, flagged keys excluded) and a
    2-epoch tinyvit-tiny run with its hard-labels baseline."""
    from distill.cache import cache_teacher
    from distill.config import FilterConfig, TrainConfig
    from distill.filter import filter_labels
    from distill.train import train_student
    sys.path.insert(0, str(REPO / "tools"))
    from flip_labels import flip_labels
    tmp = tmp_path_factory.mktemp("nb")
    flip_labels(str(demo_subset(tmp / "src", [SHARD])), str(tmp / "train"), frac=0.1, seed=0)
    val = demo_subset(tmp, ["val-000000.tar"], "val")
    filter_labels(FilterConfig(shards=str(tmp / "train"), scorer=(str(DEMO_TEACHER),), out=str(tmp / "filter"),
                               scorer_input_size=32, topk=5, quiet=True, workers=1, threads=1))
    cache_teacher(cache_config(tmp / "train", tmp / "cache", exclude=str(tmp / "filter")), DEMO_POLICY)
    train_student(TrainConfig(shards=str(tmp / "train"), cache=str(tmp / "cache"), out=str(tmp / "run"),
                              val_shards=str(val), model="tinyvit-tiny", epochs=2, image_size=32, batch_size=64,
                              exclude=str(tmp / "filter"), compare_hard_labels=True, quiet=True, threads=1))
    return {"train": tmp / "train", "filter": tmp / "filter", "cache": tmp / "cache", "run": tmp / "run", "tmp": tmp}


@pytest.fixture(scope="module")
def mixed(outs):
    """A 1-epoch cache of the same shard with Mixup/CutMix and random erasing."""
    from distill.cache import cache_teacher
    out = outs["tmp"] / "mixed"
    cache_teacher(cache_config(outs["train"], out, epochs=1), MIX_POLICY)
    return out


def _producer_views(cache, exclude=(), shard: str | None = None) -> dict:
    """{(key, epoch): tensor} exactly as cache-teacher's worker feeds them to the teacher for one shard:
    its reader, view loader (no worker process) and ``finish_piece``, on the CPU."""
    import torch
    from distill.cache.producers import ShardReader, ViewLoader, finish_piece, until_decodable
    t, spec, epochs, size, batch = cache.teacher, cache.view_spec, cache.epochs, cache.teacher["input_size"], 64
    loader = ViewLoader(0, spec.views_of(), epochs, size, batch)

    def attempt(undecodable: dict) -> dict:
        reader = ShardReader(cache.shard_path(shard or SHARD), spec=spec, epochs=epochs,
                             cache_seed=cache.manifest["cache_seed"], size=size, num_classes=cache.num_classes,
                             exclude=frozenset(exclude),
                             undecodable=undecodable)
        out = {}
        for p in loader.pieces(reader.blocks()):
            x = finish_piece(p, tuple(t["mean"]), tuple(t["std"]), torch.device("cpu"))
            for row, (s, e) in enumerate(p.where):
                out[reader.samples[s][0], int(e)] = x[row]
        return out
    return until_decodable(attempt)


def _teacher():
    import torch
    return torch.jit.load(str(DEMO_TEACHER)).eval()


# ----------------------------------------------------------------------------- import and laziness

def test_import_distill_is_light_and_exposes_the_readers():
    code = ("import sys, distill; f = (distill.open_cache, distill.open_filter, distill.open_run, distill.Cache); "
            "bad = [m for m in ('torch', 'ray', 'matplotlib', 'pandas') if m in sys.modules]; assert not bad, bad; "
            "assert 'open_run' in dir(distill)\n"
            "try:\n    distill.no_such_thing\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr


def test_cache_facts_tables_and_lazy_reads(outs, monkeypatch):
    c = distill.open_cache(outs["cache"])
    m = json.loads((outs["cache"] / MANIFEST_NAME).read_text())
    assert c.manifest == m and c.classes == m["classes"] and c.epochs == 2
    assert c.num_records == len(c) == m["totals"]["records"] == c.num_samples * 2
    assert "2 epochs" in repr(c) and c.column_names[0] == "key"
    t = c.to_table()
    assert t.num_rows == c.num_records and t.column_names == c.column_names
    assert t.equals(pa.concat_tables(c.iter_tables()))
    keys = c.keys()
    assert keys == t.column("key").to_pylist()[::2] and len(set(keys)) == c.num_samples
    flagged = set(distill.open_filter(outs["filter"]).flagged().column("key").to_pylist())
    assert flagged and flagged.isdisjoint(keys)                       # --exclude held
    e1 = c.to_table(epochs=[1], columns=["label_prob", "key"])
    assert e1.column_names == ["label_prob", "key"] and e1.num_rows == c.num_samples
    sel = t.filter(pa.compute.equal(t["epoch"], 1))
    assert e1.column("label_prob").equals(sel.column("label_prob"))
    df = c.to_pandas(epochs=[0], columns=["key", "label", "topk_idx"])
    assert list(df.columns) == ["key", "label", "topk_idx"] and len(df) == c.num_samples
    assert list(df["topk_idx"].iloc[0]) == t.column("topk_idx")[0].as_py()

    assert c[0] == t.slice(0, 1).to_pylist()[0] and c[-1] == t.slice(t.num_rows - 1).to_pylist()[0]
    assert c[2 * c.num_samples - 1] == t.slice(2 * c.num_samples - 1, 1).to_pylist()[0]
    assert c["label_prob"].equals(t.column("label_prob")) and next(iter(c)) == c[0]
    with pytest.raises(IndexError):
        c[len(c)]

    reads = []
    real = distill.format.CacheFile.fetch
    monkeypatch.setattr(distill.format.CacheFile, "fetch", lambda self, e, cols, a, b: reads.append(
        (Path(self.path).name, e, cols)) or real(self, e, cols, a, b))
    c.to_table(epochs=[1], columns=["key", "seed"])
    # one file; the keys from epoch 0's batches, the seeds from epoch 1's: nothing else is read
    assert sorted(reads) == [("train-000000.arrow", 0, ["key"]), ("train-000000.arrow", 1, ["seed"])]
    assert c.physical(SHARD, ["seed"]).column_names == ["seed"]
    with pytest.raises(UserError, match="unknown cache column"):
        c.to_table(columns=["nope"])
    with pytest.raises(UserError, match="no shard"):
        c.to_table(shards=["nope.tar"])


def test_to_table_over_many_shards_matches_per_shard_decoding(tmp_path):
    """Files decoded in runs (one uint16-local file among uint8 ones) equal shard-by-shard decoding."""
    rng = np.random.default_rng(0)
    E, K, C = 30, 10, 5000
    entries = []
    for i, n in enumerate([7, 1, 5, 9, 6]):   # (n=0 hits a format.encode_cache_shard bug, reported)
        if i == 3:        # 300 distinct classes per sample: this file's local ids are uint16
            ids = np.stack([rng.permutation(C)[:E * K].reshape(E, K) for _ in range(n)])
        else:
            ids = np.zeros((n, E, K), int) + rng.permutation(30)[:K]
        prob = np.sort(rng.random((n, E, K)), -1)[..., ::-1] / K
        name = f"s-{i:06d}.tar"
        t = encode_cache_shard([f"k{i}_{j}" for j in range(n)], rng.integers(0, C, n), rng.integers(0, 2 ** 32, (n, E)),
                               ids, prob, prob[..., 0], num_classes=C, shard=name)
        data = ipc_bytes(t)
        (tmp_path / f"s-{i:06d}.arrow").write_bytes(data)
        entries.append({"name": name, "file": f"s-{i:06d}.arrow", "samples": n, "records": n * E,
                        "file_bytes": len(data), "file_sha256": hashlib.sha256(data).hexdigest()})
    local = [read_ipc(tmp_path / e["file"]).schema.field("local").type.value_type for e in entries]
    assert local == [pa.uint8(), pa.uint8(), pa.uint8(), pa.uint16(), pa.uint8()]
    atomic_write_json(tmp_path / MANIFEST_NAME, cache_manifest({"epochs": E, "topk": K, "num_classes": C}, entries))
    c = distill.open_cache(tmp_path)
    for epochs in (None, [2], [0, 29]):
        for cols in (None, ["shard"], ["key", "shard", "topk_idx"], ["epoch", "topk_prob", "label_prob"]):
            got = c.to_table(epochs=epochs, columns=cols)
            want = pa.concat_tables([c.shard_table(n, epochs, cols) for n in c.shard_names])
            assert got.equals(want), (epochs, cols)


# ----------------------------------------------------------------------------- records

def test_record_soft_target_and_augmentation(outs):
    c = distill.open_cache(outs["cache"])
    t = c.to_table()
    row = t.slice(9, 1).to_pylist()[0]
    key, epoch = row["key"], row["epoch"]
    assert c.record(key, epoch) == row
    u = c.soft_target(key, epoch)
    r = c.soft_target(key, epoch, fill="renorm")
    assert u.shape == r.shape == (c.num_classes,) and u.dtype == np.float32
    assert abs(u.sum() - 1) < 1e-3 and abs(r.sum() - 1) < 1e-6
    idx = np.array(row["topk_idx"])
    assert np.allclose(u[idx], row["topk_prob"]) and np.allclose(r[idx], np.array(row["topk_prob"]) / sum(row["topk_prob"]))
    rest = np.setdiff1d(np.arange(c.num_classes), idx)
    assert np.all(r[rest] == 0) and np.allclose(u[rest], u[rest][0])
    with pytest.raises(UserError, match="fill"):
        c.soft_target(key, epoch, fill="spread")
    with pytest.raises(IndexError):
        c.record(key, 2)
    with pytest.raises(KeyError):
        c.record("no_such_key", 0)
    # the parameters are a pure function of (policy, seed from cache seed + epoch + key, image size)
    img = c.image(key)
    params = c.augmentation(key, epoch)
    seed = augment.derive_seed(c.manifest["cache_seed"], epoch, key)
    assert seed == row["seed"]
    assert params == augment.decode(augment.Policy.from_dict(DEMO_POLICY), seed, img.width, img.height)
    assert "mix" not in params and json.loads(json.dumps(params)) == params


def test_replay_gives_the_pixels_cache_teacher_fed_the_teacher(outs):
    """The teacher-side replay, normalised, equals bit for bit the tensors cache-teacher's own producer made
    (recomputed here from the shard) and Cache.view_tensor; the teacher on it reproduces the stored top-K."""
    import torch
    c = distill.open_cache(outs["cache"])
    excluded = distill.open_filter(outs["filter"]).flagged().column("key").to_pylist()
    fed = _producer_views(c, excluded)
    assert len(fed) == c.num_records
    t = c.teacher
    keys = c.keys()[:40:5]
    batch, recs = [], []
    for key in keys:
        for e in range(c.epochs):
            img = c.replay(key, e)
            assert img.size == (t["input_size"],) * 2 and img.mode == "RGB"
            x = augment.to_tensor(img, {}, t["mean"], t["std"])
            assert torch.equal(x, fed[key, e]), (key, e)
            assert torch.equal(x, c.view_tensor(key, e, "teacher"))
            batch.append(x)
            recs.append(c.record(key, e))
    with torch.inference_mode():
        p = torch.softmax(_teacher()(torch.stack(batch)).float(), -1)
    k = c.topk
    top = torch.topk(p, k)
    for i, rec in enumerate(recs):
        assert top.indices[i].tolist() == rec["topk_idx"], i
        assert np.allclose(top.values[i].numpy(), rec["topk_prob"], atol=1e-3, rtol=1e-3)
        assert abs(float(p[i, rec["label"]]) - rec["label_prob"]) < 1e-3
    # the student side: policy.size by default, any size on request, same content
    key = keys[0]
    assert c.replay(key, 1, view="student").size == (c.policy.size,) * 2
    big = c.replay(key, 1, view="student", size=64)
    assert big.size == (64, 64)
    with pytest.raises(UserError, match="view must be"):
        c.replay(key, 1, view="both")


def test_replay_with_mixing_and_erasing(mixed):
    """Mixed records: replay is the sample's own view before erasing and mixing; erasing (to_tensor with the
    params) then mixing with the partner's view (augmentation()['mix']) gives what cache-teacher fed the teacher."""
    import torch
    c = distill.open_cache(mixed)
    assert c.policy.mixing
    fed = _producer_views(c)
    t = c.teacher
    seen_mix = seen_erase = 0
    for key in c.keys()[:16]:
        params = c.augmentation(key, 0)
        x = augment.to_tensor(c.replay(key, 0), params, t["mean"], t["std"])
        plan = params.get("mix")
        if plan is not None:
            partner = plan["partner_key"]
            pp = c.augmentation(partner, 0)
            assert pp["mix"]["partner_key"] == key and pp["mix"]["lam"] == plan["lam"]
            x = augment.mix(x, augment.to_tensor(c.replay(partner, 0), pp, t["mean"], t["std"]), plan)
            seen_mix += 1
        seen_erase += bool(params["erase"])
        assert torch.equal(x, fed[key, 0]), key
        assert torch.equal(x, c.view_tensor(key, 0))
    assert seen_mix >= 8 and seen_erase >= 1


def test_scoring_cache_replays_the_centre_view(outs):
    """filter-labels' scoring cache holds one centre view per sample: augmentation, replay and view_tensor
    use it (the scorer on the replayed view reproduces the stored scores)."""
    import torch
    f = distill.open_filter(outs["filter"])
    c = f.scoring
    key = f.flagged(1).column("key")[0].as_py()
    img = c.image(key)
    assert c.augmentation(key, 0)["crop"] == augment.decode_center(img.width, img.height, 0.875)["crop"]
    x = augment.to_tensor(c.replay(key, 0), {}, c.teacher["mean"], c.teacher["std"])
    assert torch.equal(x, c.view_tensor(key, 0))
    with torch.inference_mode():
        p = torch.softmax(_teacher()(x[None]), -1)[0]
    rec = c.record(key, 0)
    assert torch.topk(p, c.topk).indices.tolist() == rec["topk_idx"]
    assert abs(float(p[rec["label"]]) - rec["label_prob"]) < 1e-6


def test_bench_tool_runs_on_a_small_cache(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    from bench_notebook import main
    assert main(["--dir", str(tmp_path / "bench"), "--shards", "12", "--samples", "20", "--epochs", "2",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "open_cache(12 shards)" in out and "240 records" in out and "PASS" in out
    assert len(distill.open_cache(tmp_path / "bench").to_table(epochs=[1])) == 240


# ----------------------------------------------------------------------------- figures

def test_show_draws_views_and_top_k_bars_by_class_name(outs, mixed, tmp_path):
    pytest.importorskip("matplotlib")
    c = distill.open_cache(outs["cache"])
    key = c.keys()[2]
    fig = c.show(key, epochs=[1, 0])
    assert len(fig.axes) == 2 * 3 and fig.axes[2].get_title().startswith("epoch 1")
    rec = c.record(key, 0)
    bars = fig.axes[-1]
    assert [tl.get_text() for tl in bars.get_yticklabels()] == [c.classes[i] for i in rec["topk_idx"]]
    assert [round(p.get_width(), 4) for p in bars.patches] == [round(p, 4) for p in rec["topk_prob"]]
    fig.savefig(tmp_path / "show.png")
    assert (tmp_path / "show.png").stat().st_size > 1000
    assert len(c.show(key, epochs=1, view="student", size=48).axes) == 4
    assert len(c.show(key).axes) == 2 * (1 + c.epochs)
    with pytest.raises(IndexError):
        c.show(key, epochs=[5])
    m = distill.open_cache(mixed)
    k = next(k for k in m.keys() if "mix" in m.augmentation(k, 0))
    title = m.show(k).axes[2].get_title()
    assert "mixup" in title or "cutmix" in title
    assert fig._repr_png_()[:4] == b"\x89PNG"                       # drawn inline in Jupyter


def test_missing_viz_extras_say_how_to_install(outs, monkeypatch):
    c = distill.open_cache(outs["cache"])
    import distill.figures as figs
    monkeypatch.setattr(figs, "_FIGURE_CLASS", None)
    for mod in ("matplotlib", "matplotlib.figure", "pandas"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=re.escape("pip install 'distill[viz]'")):
        c.show(c.keys()[0])
    with pytest.raises(ImportError, match="matplotlib"):
        distill.open_run(outs["run"]).plot()
    with pytest.raises(ImportError, match=re.escape("Cache.to_pandas needs pandas")):
        c.to_pandas()
    with pytest.raises(ImportError, match="pandas"):
        distill.open_run(outs["run"]).metrics
    assert c.to_table(columns=["key"]).num_rows == c.num_records         # tables need neither


# ----------------------------------------------------------------------------- filter and run

def test_open_filter(outs, tmp_path):
    f = distill.open_filter(outs["filter"])
    summary = json.loads((outs["filter"] / "summary.json").read_text())
    assert f.summary == summary and len(f) == summary["samples"] == 360 and f.num_flagged == summary["dropped"] > 10
    t = f.to_table()
    for col in ("key", "label", "label_prob", "keep", "reason", "margin", "label_rank", "topk_idx", "topk_prob"):
        assert col in t.column_names
    assert t.num_rows == 360 and f.to_table(["key", "keep"]).column_names == ["key", "keep"]
    flagged = f.flagged()
    assert flagged.num_rows == f.num_flagged and not any(flagged.column("keep").to_pylist())
    margins = flagged.column("margin").to_pylist()
    assert margins == sorted(margins)
    r = flagged.slice(0, 1).to_pylist()[0]
    assert r["label_name"] == f.classes[r["label"]] and r["pred"] == r["topk_idx"][0] and r["reason"]
    assert r["pred_name"] == f.classes[r["pred"]]
    truth = json.loads((outs["train"] / "flips.json").read_text())["flipped"]
    assert r["key"] in truth and truth[r["key"]]["true"] == r["pred"]        # the scorer found the real class
    assert len(f.to_pandas()) == 360
    if HAVE_MPL:
        fig = f.show_flagged(5)
        titled = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title() for ax in titled] == flagged.column("key").to_pylist()[:5]
        assert all(ax.images for ax in titled)
        assert f"given {r['label_name']}" in titled[0].get_xlabel()
        fig.savefig(tmp_path / "flagged.png")
        empty = f.show_flagged(0)
        assert "no samples flagged" in empty.axes[0].texts[0].get_text()
    with pytest.raises(UserError, match="not found"):
        distill.open_filter(tmp_path / "none")
    with pytest.raises(FormatError):
        distill.open_filter(tmp_path)


def test_open_run_on_a_real_run(outs):
    run = distill.open_run(outs["run"])
    df = run.metrics
    for col in ("epoch", "train_loss", "lr", "val_top1", "val_top5", "img_s"):
        assert col in df.columns
    assert df["epoch"].tolist() == [1, 2] and len(run) == 2 and run.complete
    assert run.summary["epochs"] == 2 and run.config is not None
    assert run.to_table().num_rows == 2
    base = run.baseline
    assert base is not None and base.summary["source"] == "hard labels" and len(base.metrics) == 2
    assert base.baseline is None and "baseline" in repr(run)
    pytest.importorskip("matplotlib")
    fig = run.plot()
    soft_ax, hard_ax, acc_ax = fig.axes             # the two losses are different quantities: own axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["soft-target loss", "hard-label cross-entropy", "val accuracy (%)"]
    assert len(soft_ax.lines) == 1 and len(hard_ax.lines) == 1 and len(acc_ax.lines) == 4   # top-1/top-5 each
    assert list(soft_ax.lines[0].get_xdata()) == [1, 2]


def test_open_run_in_progress_and_bad_directories(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    with pytest.raises(UserError, match="not a train-student run"):
        distill.open_run(d)
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 2.0, "lr": 1e-3, "val_top1": None,
                                                 "val_top5": None, "img_s": 10.0}) + "\n")
    run = distill.open_run(d)
    assert not run.complete and run.summary is None and run.baseline is None and len(run) == 1
    with (d / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"epoch": 2, "train_loss": 1.5, "lr": 5e-4, "val_top1": 40.0, "val_top5": 90.0,
                             "img_s": 12.0}) + "\n")
    assert run.metrics["train_loss"].tolist() == [2.0, 1.5]            # re-read: follows a live run
    if HAVE_MPL:
        assert len(run.plot().axes[1].lines) == 2
    (d / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(FormatError, match="metrics.jsonl:1"):
        run.rows


# ----------------------------------------------------------------------------- README snippets and the notebook

def _python_blocks(path: Path) -> list[str]:
    """The python blocks of the README's "From notebooks" section (what a user copies)."""
    text = path.read_text()
    section = text[text.index("## From notebooks"):text.index("## Your own training loop")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_snippets_run_and_match_the_reader(outs, capsys):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    pytest.importorskip("duckdb")
    blocks = _python_blocks(REPO / "README.md")
    assert len(blocks) == 4
    ns: dict = {}
    for code in blocks:
        code = (code.replace("out/demo/cache", str(outs["cache"])).replace("out/demo/filter", str(outs["filter"]))
                .replace("out/demo/student", str(outs["run"])))
        exec(compile(code, "README.md", "exec"), ns)
    assert ns["records"].equals(distill.open_cache(outs["cache"]).to_table())   # plain pyarrow == the reader
    out = capsys.readouterr().out
    assert "mean_label_prob" in out and "epoch" in out


def test_example_notebook_runs_headless_and_saves_figures(outs, monkeypatch):
    for mod in ("nbclient", "nbformat", "ipykernel", "matplotlib", "pandas"):
        pytest.importorskip(mod)
    import nbclient
    import nbformat
    figures = outs["run"] / "figures"
    for k, v in {"DISTILL_CACHE": outs["cache"], "DISTILL_FILTER": outs["filter"], "DISTILL_RUN": outs["run"],
                 "DISTILL_FIGURES": figures}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    nb = nbformat.read(REPO / "examples" / "explore.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "examples")}}).execute()
    pngs = sorted(p.name for p in figures.glob("*.png"))
    assert pngs == ["cache_show.png", "filter_flagged.png", "replay_teacher_student.png", "run.png"]
    assert all((figures / p).stat().st_size > 1000 for p in pngs)
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) >= 4                               # the figures are drawn inline too
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors

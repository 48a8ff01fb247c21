"""Figures a new user meets in the first hour (issue 15 item 8), drawn from real outputs and inspected as
rendered: run.plot() keeps the soft-target loss and the hard-label loss on their own axes, montage titles
show long keys whole inside their panel, and show_flagged with nothing flagged is a readable figure.

The outputs come from the real pipeline: make-shards over a folder tree of demo digits with long keys
(half of them under a wrong class, so the scorer flags them), filter-labels, cache-teacher and a short
train-student run with its ``--compare-hard-labels`` baseline."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import DEMO_DIR, DEMO_POLICY, DEMO_TEACHER, cache_config

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import distill  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_local")
LONG = "astronaut_train_{:03d}_with_a_long_suffix"
SEPARATORLESS = "supercalifragilisticexpialidociousastronauttrainimage"   # nowhere to break but characters


def build(root: Path, per_class: int = 6, train: bool = True) -> dict:
    """Long-key shards from demo digits (the second half of each class filed under the next class), then
    filter-labels (confident rule: flags the misfiled ones; topk:10 rule: flags nothing), cache-teacher
    and, with ``train``, 2-epoch tinyvit-tiny runs from the cache with their hard-labels baselines (``run``:
    soft targets only; ``run_alpha``: ``--alpha 0.5``, which also records the hard-label part)."""
    from distill.cache import cache_teacher
    from distill.config import FilterConfig, TrainConfig
    from distill.data.shards import iter_shard, make_shards
    from distill.filter import filter_labels
    from distill.format import ShardIndex
    from distill.train import train_student
    classes = ShardIndex.read(DEMO_DIR / "train").classes
    taken: dict[int, int] = {}
    n = 0
    for s in iter_shard(DEMO_DIR / "train" / "train-000000.tar"):
        if taken.get(s.label, 0) >= per_class:
            continue
        i = taken[s.label] = taken.get(s.label, 0) + 1
        label = s.label if i <= per_class // 2 else (s.label + 1) % len(classes)
        key = SEPARATORLESS if n == per_class - 1 else LONG.format(n)    # the first class's last: misfiled
        d = root / "src" / classes[label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.{s.ext}").write_bytes(s.data)
        n += 1
    make_shards(root / "src", root / "train")
    common = dict(shards=str(root / "train"), scorer=(str(DEMO_TEACHER),), scorer_input_size=32, topk=5, quiet=True,
                  workers=1, threads=1)
    filter_labels(FilterConfig(out=str(root / "filter"), **common))
    filter_labels(FilterConfig(out=str(root / "clean"), **dict(common, topk=10), rule="topk:10"))
    cache_teacher(cache_config(root / "train", root / "cache"), DEMO_POLICY)
    out = {k: root / k for k in ("train", "filter", "clean", "cache", "run", "run_alpha")}
    if train:
        for name, alpha in (("run", 0.0), ("run_alpha", 0.5)):
            train_student(TrainConfig(shards=str(root / "train"), cache=str(root / "cache"), out=str(root / name),
                                      val_shards=str(root / "train"), model="tinyvit-tiny", epochs=2, image_size=32,
                                      batch_size=16, alpha=alpha, compare_hard_labels=True, quiet=True, threads=1))
    return out


@pytest.fixture(scope="module")
def outs(tmp_path_factory, ray_local):
    return build(tmp_path_factory.mktemp("first_hour"))


# ----------------------------------------------------------------------------- rendered-figure helpers

def _drawn(fig):
    """The figure drawn on an Agg canvas (as savefig would), and its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _texts(fig):
    """Every visible, non-empty text artist of the figure (titles, labels, tick labels, legends, free text)."""
    from matplotlib.text import Text
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and t.figure is not None]


def _inside(inner, outer, tol: float = 0.5) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol and inner.x1 <= outer.x1 + tol
            and inner.y1 <= outer.y1 + tol)


def _clipped(fig, renderer) -> list[str]:
    """What leaves the figure as drawn: an axes' tight box (its title, labels, drawn tick labels, legend and
    texts) or a figure-level text (the suptitle, free text)."""
    box = fig.bbox
    out = [f"axes {i} ({ax.get_title()!r})" for i, ax in enumerate(fig.axes)
           if not _inside(ax.get_tightbbox(renderer), box)]
    return out + [t.get_text() for t in fig.texts if t.get_visible() and not _inside(t.get_window_extent(renderer), box)]


# ----------------------------------------------------------------------------- run.plot

def test_run_plot_keeps_soft_and_hard_label_losses_on_their_own_axes(outs):
    run = distill.open_run(outs["run"])
    base = run.baseline
    assert base is not None
    assert "soft_loss" in run.rows[0] and "hard_loss" in base.rows[0] and "soft_loss" not in base.rows[0]
    fig = run.plot()
    renderer = _drawn(fig)
    by_label = {ax.get_ylabel(): ax for ax in fig.axes}
    soft = next(ax for label, ax in by_label.items() if "soft-target" in label)
    hard = next(ax for label, ax in by_label.items() if "hard-label" in label)
    acc = next(ax for label, ax in by_label.items() if "accuracy" in label)
    assert soft is not hard and len({soft, hard, acc}) == 3
    # the soft axis holds the cache run's soft loss only; the hard axis the baseline's hard-label CE
    assert [ln.get_label() for ln in soft.lines] == ["from cache"]
    assert list(soft.lines[0].get_ydata()) == pytest.approx([r["soft_loss"] for r in run.rows])
    assert [ln.get_label() for ln in hard.lines] == ["from hard labels"]
    assert list(hard.lines[0].get_ydata()) == pytest.approx([r["hard_loss"] for r in base.rows])
    # the shared metric: val top-1/top-5 of both runs on one axis, each curve named
    assert sorted(ln.get_label() for ln in acc.lines) == sorted(
        f"{k} {n}" for k in ("top-1", "top-5") for n in ("from cache", "from hard labels"))
    assert all(ax.get_xlabel() == "epoch" for ax in (soft, hard, acc))
    assert not _clipped(fig, renderer)


def test_run_plot_puts_the_hard_label_ce_of_both_runs_on_one_axis(outs):
    """With --alpha the cache run records its hard-label part too: the same quantity as the baseline's loss,
    so the two share the hard-label axis; the soft part keeps its own."""
    run = distill.open_run(outs["run_alpha"])
    assert "soft_loss" in run.rows[0] and "hard_loss" in run.rows[0]
    fig = run.plot()
    renderer = _drawn(fig)
    hard = next(ax for ax in fig.axes if "hard-label" in ax.get_ylabel())
    soft = next(ax for ax in fig.axes if "soft-target" in ax.get_ylabel())
    assert [ln.get_label() for ln in hard.lines] == ["from cache", "from hard labels"]
    assert list(hard.lines[0].get_ydata()) == pytest.approx([r["hard_loss"] for r in run.rows])
    assert list(hard.lines[1].get_ydata()) == pytest.approx([r["hard_loss"] for r in run.baseline.rows])
    assert [ln.get_label() for ln in soft.lines] == ["from cache"]
    assert not _clipped(fig, renderer)


def test_run_plot_without_baseline_names_the_loss_it_draws(outs):
    fig = distill.open_run(outs["run"] / "hard-labels").plot()
    _drawn(fig)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert any("hard-label" in s for s in labels) and not any("soft-target" in s for s in labels)


# ----------------------------------------------------------------------------- montage titles

def _title_ok(fig, renderer, ax, key):
    title = ax.title
    assert title.get_text().replace("\n", "") == key                      # whole, at most broken into lines
    ext = title.get_window_extent(renderer)
    assert _inside(ext, fig.bbox), (key, ext, fig.bbox)
    return ext


def test_flagged_montage_titles_show_long_keys_whole_inside_their_panel(outs):
    f = distill.open_filter(outs["filter"])
    keys = f.flagged().column("key").to_pylist()
    assert len(keys) >= 6 and all(len(k) > 30 for k in keys)
    cols = 4
    fig = f.show_flagged(len(keys), cols=cols)
    renderer = _drawn(fig)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == len(keys)
    width = fig.bbox.width / cols                                         # each panel's column of the figure
    for ax, key in zip(titled, keys):
        ext = _title_ok(fig, renderer, ax, key)
        assert ext.width <= width, (key, ext.width, width)
        # the title stays over its own panel: its column, not the neighbours'
        col = int((ax.get_position().x0 * fig.bbox.width + 1) // width)
        assert col * width - 0.5 <= ext.x0 and ext.x1 <= (col + 1) * width + 0.5, key
        assert ax.title.get_fontsize() >= 5
    if SEPARATORLESS in keys:
        assert "\n" in titled[keys.index(SEPARATORLESS)].get_title()
    assert not _clipped(fig, renderer)


def test_views_figure_shows_a_long_key_whole(outs):
    c = distill.open_cache(outs["cache"])
    for key in (LONG.format(3), SEPARATORLESS):
        fig = c.show(key, epochs=[0, 1])
        renderer = _drawn(fig)
        texts = [t.get_text().replace("\n", "") for t in _texts(fig)]
        assert any(key in t for t in texts), texts
        assert not _clipped(fig, renderer), key
        # the info panel's key does not run into the neighbouring panels (bars of epoch 0)
        info = fig.axes[1]
        bars = fig.axes[3]
        for t in info.texts:
            assert t.get_window_extent(renderer).x1 <= bars.get_tightbbox(renderer).x0 + 0.5, t.get_text()


# ----------------------------------------------------------------------------- nothing flagged

def test_show_flagged_with_nothing_flagged_is_a_readable_figure(outs):
    f = distill.open_filter(outs["clean"])
    assert f.num_flagged == 0 and f.num_samples > 0
    fig = f.show_flagged()
    w, h = fig.get_size_inches()
    assert w >= 4 and h >= 1.5
    renderer = _drawn(fig)
    texts = [t.get_text() for t in _texts(fig)]
    assert any("no samples flagged" in t for t in texts), texts
    assert any(f"{f.num_samples} scored" in t for t in texts), texts
    assert not _clipped(fig, renderer)
    assert all(t.get_fontsize() >= 8 for t in _texts(fig))


if __name__ == "__main__":          # build the outputs once for looking at the figures by hand
    print(build(Path(sys.argv[1])))

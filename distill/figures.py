"""Figures of the notebook API (matplotlib, the ``viz`` extra, imported only when a figure is drawn).

Figures are plain ``matplotlib.figure.Figure`` objects made without pyplot, so they work headless
and never pile up in pyplot's global state. Nothing here imports the readers: they call in.
"""
from __future__ import annotations

import numpy as np

from .files import UserError

GIVEN, OTHER = "#2a9d55", "#9aa5b1"        # bar colours: the given label, the other classes


# ----------------------------------------------------------------------------- matplotlib, optional

_FIGURE_CLASS = None


def _figure(what: str, width: float, height: float):
    """A new pyplot-free Figure; a clear ImportError naming the extra when matplotlib is missing."""
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError(f"{what} draws with matplotlib, which is not installed: pip install 'distill[viz]' "
                              f"(or pip install matplotlib)") from None

        class NotebookFigure(Figure):
            """A Figure that Jupyter/IPython draws inline as PNG whatever the backend (no pyplot needed)."""

            def _repr_png_(self) -> bytes:
                import io
                buf = io.BytesIO()
                self.savefig(buf, format="png", dpi=100)
                return buf.getvalue()

        _FIGURE_CLASS = NotebookFigure
    return _FIGURE_CLASS(figsize=(width, height), layout="constrained")


def _epochs(cache, epochs) -> list[int]:
    if epochs is None:
        return list(range(min(cache.epochs, 8)))
    ep = [int(epochs)] if np.isscalar(epochs) else list(dict.fromkeys(int(e) for e in epochs))
    for e in ep:
        cache._check_epoch(e)
    if not ep:
        raise UserError("show: no epochs given")
    return ep


def _to_image(x, mean, std) -> np.ndarray:
    """A normalised C x H x W tensor back to H x W x 3 floats in [0, 1] (for display)."""
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.clip(x.numpy() * s + m, 0.0, 1.0).transpose(1, 2, 0)


def _describe(params: dict, plan: dict | None, partner: str | None) -> str:
    bits = [f"{o['op']} {o['magnitude']:.3g}" if isinstance(o["magnitude"], (int, float)) else o["op"]
            for o in params["ops"]]
    if params["flip"]:
        bits.append("flip")
    if params.get("jitter"):
        bits.append("jitter")
    if params["erase"]:
        bits.append(f"erase x{len(params['erase'])}")
    if plan is not None:
        bits.append(f"{plan['mode']} {partner} lam {plan['lam']:.2f}")
    return ", ".join(bits) if bits else "crop only"


def show_cache_views(cache, key: str, epochs=None, view: str = "teacher", size: int | None = None):
    """The figure behind ``Cache.show``: source image with each epoch's crop box, then per epoch the
    exact tensor the ``view`` side got (erasing and mixing included, de-normalised for display) over
    bars of the record's top-K classes by name (the given label in green)."""
    from .data import augment, views
    eps = _epochs(cache, epochs)
    fig = _figure("Cache.show", 1.9 * (len(eps) + 1) + 0.6, 4.6)
    size, mean, std = cache.side(view, size)
    shard, keys, pos = cache._block(key)
    _, row = cache.locate(key)
    by_epoch = {r["epoch"]: r for r in cache._row(shard, row, eps)}
    recs = [by_epoch[e] for e in eps]
    seeds = {e: cache._seeds(shard, keys, e) for e in eps}
    plans = {e: views.block_plan(cache.view_spec, seeds[e])[pos] for e in eps}
    need = {key} | {keys[p["partner"]] for p in plans.values() if p is not None}
    srcs = cache._sources(shard, sorted(need))
    src = srcs[key]
    grid = fig.add_gridspec(2, len(eps) + 1, height_ratios=[1.0, 0.85])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(augment.open_image(src.data))
    colours = [f"C{i % 10}" for i in range(len(eps))]
    from matplotlib.patches import Rectangle
    params = {}
    for c, e in zip(colours, eps):
        params[e] = views.params(cache.view_spec, seeds[e][pos], src)
        x0, y0, x1, y1 = params[e]["crop"]
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=1.5))
    ax.set_title(f"source {src.width}x{src.height}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    info = fig.add_subplot(grid[1, 0])
    info.axis("off")
    label = recs[0]["label"]
    info.text(0.0, 1.0, f"key {key}\nshard {shard}\nlabel {cache.classes[label]} ({label})\n"
              f"{view} view {size}px\npolicy {cache.manifest['policy']['id']}", va="top", fontsize=8,
              family="monospace", transform=info.transAxes)
    for j, (c, e, rec) in enumerate(zip(colours, eps, recs)):
        plan = plans[e]
        partner = keys[plan["partner"]] if plan is not None else None
        x = views.view_tensor(cache.view_spec, srcs, keys, seeds[e], pos, size, mean, std)
        ax = fig.add_subplot(grid[0, j + 1])
        ax.imshow(_to_image(x, mean, std), interpolation="nearest")
        ax.set_title(f"epoch {e}\n{_describe(params[e], plan, partner)}", fontsize=8, color=c)
        ax.set_xticks([])
        ax.set_yticks([])
        bars = fig.add_subplot(grid[1, j + 1])
        idx, prob = rec["topk_idx"], [float(p) for p in rec["topk_prob"]]
        ypos = np.arange(len(idx))
        bars.barh(ypos, prob, color=[GIVEN if i == label else OTHER for i in idx])
        bars.set_yticks(ypos, [cache.classes[i] for i in idx], fontsize=7)
        bars.invert_yaxis()
        bars.set_xlim(0, 1)
        bars.tick_params(axis="x", labelsize=7)
        bars.set_xlabel(f"p(label) {rec['label_prob']:.3f}", fontsize=8)
    fig.suptitle(f"{key}: {len(eps)} cached view(s) and the teacher's top-{cache.topk}", fontsize=10)
    return fig

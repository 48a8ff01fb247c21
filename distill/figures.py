"""Figures of the notebook API (matplotlib, the ``viz`` extra, imported only when a figure is drawn).

Figures are plain ``matplotlib.figure.Figure`` objects made without pyplot, so they work headless
and never pile up in pyplot's global state. Nothing here imports the readers: they call in.
"""
from __future__ import annotations

import re

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


# ----------------------------------------------------------------------------- text that fits its panel

_BREAKS = (re.compile(r"(?<= )"),              # a line breaks after a space if it can, else after '_', '-', '.',
           re.compile(r"(?<=[_\-./:,;])"))    # '/', ':', ',' or ';', else between characters
_TEXT_TO_PATH = None
FIT_MARGIN = 0.94                            # of the width: Agg's hinted glyphs run a little wider than the outlines


def text_width(s: str, fontsize: float, family: str | None = None) -> float:
    """Width in points of one line of ``s`` at ``fontsize`` (matplotlib's font outlines, no renderer needed)."""
    global _TEXT_TO_PATH
    from matplotlib.font_manager import FontProperties
    if _TEXT_TO_PATH is None:
        from matplotlib.textpath import TextToPath
        _TEXT_TO_PATH = TextToPath()
    prop = FontProperties(size=fontsize, family=family) if family else FontProperties(size=fontsize)
    return _TEXT_TO_PATH.get_text_width_height_descent(s, prop, ismath=False)[0] if s else 0.0


def wrap_text(s: str, width: float, fontsize: float, family: str | None = None) -> list[str]:
    """``s`` in lines of at most ``width`` points, filled greedily: words (split after spaces) stay whole
    where they fit on a line; a word too long for a line of its own is split after '_', '-', '.', '/', ':',
    ',' or ';', and a part still too long between characters. Nothing is dropped: ``"".join(lines) == s``."""
    width *= FIT_MARGIN

    def fits(t: str) -> bool:
        return text_width(t, fontsize, family) <= width

    def split(piece: str, level: int) -> list[str]:
        if fits(piece):
            return [piece]
        if level == len(_BREAKS):
            return list(piece)
        return [q for p in _BREAKS[level].split(piece) if p for q in split(p, level + 1)]

    lines, line = [], ""
    for word in (p for p in _BREAKS[0].split(s) if p):
        parts = split(word, 1) if not fits(word) else [word]
        if len(parts) == 1 and line and not fits(line + word):
            lines.append(line)                 # a word that fits a line of its own starts one
            line = ""
        for part in parts:
            if line and not fits(line + part):
                lines.append(line)
                line = ""
            line += part
    if line or not lines:
        lines.append(line)
    return lines


def fit_text(s: str, width: float, fontsize: float, *, min_fontsize: float = 5.0, max_lines: int = 2,
             family: str | None = None) -> tuple[str, float]:
    """(text, fontsize) that show all of ``s`` within ``width`` points: on one line at ``fontsize`` if it fits,
    else wrapped onto up to ``max_lines`` lines, the font shrunk (in half points, down to ``min_fontsize``) if
    needed; below that, at ``min_fontsize`` on as many lines as it takes. Never truncated. Each of the
    (newline-separated) lines of ``s`` is wrapped on its own."""
    fs = float(fontsize)
    given = s.split("\n")
    while True:
        lines = [w for line in given for w in wrap_text(line, width, fs, family)]
        if len(lines) <= max(max_lines, len(given)) or fs - 0.5 < min_fontsize:
            return "\n".join(lines), fs
        fs -= 0.5


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


COLUMN_IN = 1.9                              # Cache.show: inches per column (the source, then one per epoch)
COLUMN_PT = (COLUMN_IN - 0.2) * 72           # what a column's title or text may take, in points


def _suptitle(fig, text: str, fontsize: float = 10) -> None:
    """A figure title fitted to the figure's width (wrapped, or in a smaller font: never cut)."""
    text, fs = fit_text(text, (fig.get_figwidth() - 0.3) * 72, fontsize, min_fontsize=7)
    fig.suptitle(text, fontsize=fs)


def show_cache_views(cache, key: str, epochs=None, view: str = "teacher", size: int | None = None):
    """The figure behind ``Cache.show``: source image with each epoch's crop box, then per epoch the
    exact tensor the ``view`` side got (erasing and mixing included, de-normalised for display) over
    bars of the record's top-K classes by name (the given label in green)."""
    from .data import augment, views
    eps = _epochs(cache, epochs)
    fig = _figure("Cache.show", COLUMN_IN * (len(eps) + 1) + 0.6, 4.6)
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
    facts = (f"key {key}\nshard {shard}\nlabel {cache.classes[label]} ({label})\n"
             f"{view} view {size}px\npolicy {cache.manifest['policy']['id']}")
    text, fs = fit_text(facts, COLUMN_PT, 8, min_fontsize=6.5, max_lines=7, family="monospace")
    info.text(0.0, 1.0, text, va="top", fontsize=fs, family="monospace", transform=info.transAxes)
    for j, (c, e, rec) in enumerate(zip(colours, eps, recs)):
        plan = plans[e]
        partner = keys[plan["partner"]] if plan is not None else None
        x = views.view_tensor(cache.view_spec, srcs, keys, seeds[e], pos, size, mean, std)
        ax = fig.add_subplot(grid[0, j + 1])
        ax.imshow(_to_image(x, mean, std), interpolation="nearest")
        text, fs = fit_text(f"epoch {e}\n{_describe(params[e], plan, partner)}", COLUMN_PT, 8, min_fontsize=6.5,
                            max_lines=4)
        ax.set_title(text, fontsize=fs, color=c)
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
    _suptitle(fig, f"{key}: {len(eps)} cached view(s) and the teacher's top-{cache.topk}")
    return fig


# ----------------------------------------------------------------------------- filter: flagged samples

FLAG_COLOUR = "#c0392b"
TILE_IN = 1.8                                # show_flagged: inches per column


def show_flagged(flt, n: int = 24, cols: int = 6):
    """The figure behind ``FilterOutput.show_flagged``: the ``n`` most suspicious flagged samples, each with
    its whole key as the title (wrapped or in a smaller font when long), the given label (red) and the
    scorer's top-1 (green) with their probabilities; with nothing flagged, a short figure that says so."""
    top = flt.flagged(n)
    m = top.num_rows
    if m == 0:
        return _nothing_flagged(flt)
    cols = max(1, min(cols, m))
    rows = -(-m // cols)
    fig = _figure("FilterOutput.show_flagged", TILE_IN * cols + 0.4, 2.2 * rows + 0.5)
    fig.get_layout_engine().set(h_pad=0.1)       # the pred line and the next row's key apart
    width = (TILE_IN - 0.15) * 72
    r = top.to_pylist()
    imgs = flt.images([x["key"] for x in r], [x["shard"] for x in r])
    for i, x in enumerate(r):
        ax = fig.add_subplot(rows, cols, i + 1)
        if x["key"] in imgs:
            ax.imshow(imgs[x["key"]])
        ax.set_xticks([])
        ax.set_yticks([])
        title, fs = fit_text(x["key"], width, 7)
        ax.set_title(title, fontsize=fs)
        given, fs = fit_text(f"given {x['label_name']} {x['label_prob']:.2f}", width, 7)
        ax.set_xlabel(given, fontsize=fs, color=FLAG_COLOUR)
        pred, fs = fit_text(f"pred {x['pred_name']} {x['topk_prob'][0]:.2f}", width, 7)
        ax.annotate(pred, xy=(0.5, 0.0), xycoords=ax.xaxis.label, xytext=(0, -1), textcoords="offset points",
                    fontsize=fs, color=GIVEN, ha="center", va="top")
    _suptitle(fig, f"{m} most suspicious of {flt.num_flagged} flagged (lowest margin), rule {flt.rule}")
    return fig


def _nothing_flagged(flt):
    """A short figure that says nothing was flagged, and how many samples were scored under which rule."""
    w, h = 6.0, 1.8
    fig = _figure("FilterOutput.show_flagged", w, h)
    fig.set_layout_engine("none")
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.axis("off")
    width = (w - 0.4) * 72
    head, fs = fit_text("no samples flagged", width, 13, min_fontsize=9)
    ax.text(0.5, 0.62, head, ha="center", va="center", fontsize=fs, transform=ax.transAxes)
    scored = flt.num_samples
    detail, fs = fit_text(f"{scored} scored sample{'s' if scored != 1 else ''} under rule {flt.rule}: "
                          f"every label kept", width, 10, min_fontsize=8)
    ax.text(0.5, 0.30, detail, ha="center", va="center", fontsize=fs, color="#555555", transform=ax.transAxes)
    return fig


# ----------------------------------------------------------------------------- run: curves

SOFT, HARD, DIST = "soft", "hard", "dist"
LOSS_AXES = {     # quantity -> (colour, y label, axis title)
    SOFT: ("C2", "soft-target loss", "soft-target loss: CE vs the teacher's top-K"),
    HARD: ("C3", "hard-label cross-entropy", "hard-label cross-entropy (train)"),
    DIST: ("C4", "distillation-head loss", "distillation head: CE vs the teacher (EfficientFormer)"),
}


def _run_losses(run, rows) -> dict[str, list]:
    """{quantity: values per row} of one run: the recorded ``soft_loss``/``hard_loss`` parts; a run whose
    rows have no parts (older metrics) gives its ``train_loss`` under ``hard`` when it trained from hard
    labels, else under ``train loss`` (a total of unknown parts, drawn on its own axis)."""
    out = {}
    for q in (SOFT, HARD, DIST):
        if any(r.get(f"{q}_loss") is not None for r in rows):
            out[q] = [np.nan if r.get(f"{q}_loss") is None else r[f"{q}_loss"] for r in rows]
    if not out and any(r.get("train_loss") is not None for r in rows):
        s, c = run.summary or {}, run.config or {}
        hard = s.get("source") == "hard labels" or bool(c.get("hard-labels", c.get("hard_labels")))
        out[HARD if hard else "train loss"] = [np.nan if r.get("train_loss") is None else r["train_loss"]
                                               for r in rows]
    return out


def plot_run(run):
    """The figure behind ``Run.plot``: one axis per loss quantity (the soft-target loss and the hard-label
    cross-entropy are different numbers and never share an axis), then validation top-1/top-5, each curve
    named by run (the hard-labels baseline dashed)."""
    from matplotlib.ticker import MaxNLocator
    base = run.baseline
    series = [("from cache" if base is not None else run.path.name, run, run.rows, dict(ls="-", marker="o"))]
    if base is not None:      # dashed, hollow squares: visible where both runs draw the same values
        series.append(("from hard labels", base, base.rows, dict(ls="--", marker="s", mfc="none")))
    losses = [(name, rows, style, _run_losses(r, rows)) for name, r, rows, style in series]
    quantities = [q for q in (SOFT, HARD) if any(q in ls for *_, ls in losses)]
    quantities += list(dict.fromkeys(q for *_, ls in losses for q in ls if q not in quantities))
    fig = _figure("Run.plot", max(8.0, 4.1 * (len(quantities) + 1) + 0.2), 3.8)
    axes = fig.subplots(1, len(quantities) + 1, squeeze=False)[0]
    for ax, q in zip(axes, quantities):
        colour, ylabel, title = LOSS_AXES.get(q, ("C7", q, f"{q} (total)"))
        for name, rows, style, ls in losses:
            if q in ls:
                ax.plot([r["epoch"] for r in rows], ls[q], color=colour, ms=4, label=name, **style)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
    acc = axes[-1]
    for name, rows, style, _ in losses:
        ep = [r["epoch"] for r in rows]
        for k, c in (("val_top1", "C0"), ("val_top5", "C1")):
            vals = [np.nan if r.get(k) is None else r[k] for r in rows]
            if not all(np.isnan(vals)):
                acc.plot(ep, vals, color=c, ms=4, label=f"top-{k[-1]} {name}", **style)
    acc.set_ylabel("val accuracy (%)")
    acc.set_title("validation top-1 / top-5", fontsize=9)
    if not acc.lines:
        acc.text(0.5, 0.5, "no validation metrics\n(train-student --val-shards)", ha="center", va="center",
                 fontsize=9, color="#555555", transform=acc.transAxes)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
    s = run.summary or {}
    what = " ".join(filter(None, [s.get("model"), s.get("source") and f"from {s['source']}"]))
    _suptitle(fig, run.path.name + (f": {what}" if what else "")
              + (" vs the hard-labels baseline" if base is not None else ""))
    return fig


# ----------------------------------------------------------------------------- run: class relations

def plot_class_relations(rel):
    """Student and teacher class-correlation matrices side by side (one colour scale, symmetric about 0 over
    both matrices' off-diagonal entries; the diagonal, always 1, left blank), their agreement in the title;
    class names on the axes when there are at most 30."""
    n = len(rel.classes)
    fig = _figure("Run.class_relations().plot", 11.0, 5.4)
    axes = fig.subplots(1, 2)
    off = ~np.eye(n, dtype=bool)
    lim = max(1e-3, float(np.abs(rel.student[off]).max(initial=0)), float(np.abs(rel.teacher[off]).max(initial=0)))
    for ax, mat, title in ((axes[0], rel.student, f"student: {rel.student_images} val images"),
                           (axes[1], rel.teacher, f"teacher: {rel.teacher_records} cached records")):
        shown = np.where(off, mat, np.nan)          # the diagonal (always 1) would flatten the colour scale
        im = ax.imshow(shown, vmin=-lim, vmax=lim, cmap="RdBu_r", interpolation="nearest")
        ax.set_title(title, fontsize=10)
        if n <= 30:
            ax.set_xticks(range(n), [str(c) for c in rel.classes], rotation=90, fontsize=7)
            ax.set_yticks(range(n), [str(c) for c in rel.classes], fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="Pearson correlation of class predictions")
    _suptitle(fig, f"class relations, {n} classes: agreement (off-diagonal Pearson) {rel.agreement:.3f}")
    return fig

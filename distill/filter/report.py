"""Filter report: report.md, a montage of the most suspicious images (Pillow) and a label_prob
histogram (matplotlib when installed, else a text histogram in the Markdown)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..format import FILTER_HIST_NAME, FILTER_MONTAGE_NAME, FILTER_REPORT_NAME, FILTER_SCORES_NAME, read_ipc
from ..files import atomic_write_bytes

MONTAGE_NAME, HIST_NAME = FILTER_MONTAGE_NAME, FILTER_HIST_NAME


def _montage(out: Path, scores, cache, classes: list[str], n: int = 24, tile: int = 96) -> bool:
    from ..data import augment, shards as shardio
    from ..format import Skip
    dropped = [i for i, k in enumerate(scores.column("keep").to_pylist()) if not k]
    if not dropped:
        return False
    margin = scores.column("margin").to_numpy()
    worst = sorted(dropped, key=lambda i: margin[i])[:n]
    keys = scores.column("key").to_pylist()
    shards = scores.column("shard").to_pylist()
    labels = scores.column("label").to_numpy()
    top1 = scores.column("topk_idx").combine_chunks().values.to_numpy().reshape(len(keys), -1)[:, 0]
    want: dict[str, list[int]] = {}
    for i in worst:
        want.setdefault(shards[i], []).append(i)
    images = {}
    for shard, rows in want.items():
        need = {keys[i] for i in rows}
        try:
            path = cache.shard_path(shard)
        except Exception:
            continue
        for item in shardio.iter_shard(path):
            if not isinstance(item, Skip) and item.key in need:
                images[item.key] = augment.open_image(item.data)
    cols = 6
    rows_n = (len(worst) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, rows_n * (tile + 28)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, i in enumerate(worst):
        x, y = j % cols * tile, j // cols * (tile + 28)
        if keys[i] in images:
            sheet.paste(images[keys[i]].resize((tile - 4, tile - 4)), (x + 2, y + 2))
        draw.text((x + 2, y + tile - 1), f"given {classes[labels[i]]}"[:16], fill="red")
        draw.text((x + 2, y + tile + 12), f"pred {classes[top1[i]]}"[:16], fill="green")
    import io
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out / MONTAGE_NAME, buf.getvalue())
    return True


def _histogram(out: Path, label_prob: np.ndarray, keep: np.ndarray) -> str:
    bins = np.linspace(0, 1, 11)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        h_keep, _ = np.histogram(label_prob[keep], bins)
        h_drop, _ = np.histogram(label_prob[~keep], bins)
        lines = ["| label_prob | kept | dropped |", "| --- | --- | --- |"]
        lines += [f"| {bins[i]:.1f}-{bins[i + 1]:.1f} | {h_keep[i]} | {h_drop[i]} |" for i in range(10)]
        return "\n".join(lines) + "\n\n(install distill[viz] for the PNG)"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([label_prob[keep], label_prob[~keep]], bins=20, stacked=True, label=["kept", "dropped"])
    ax.set_xlabel("scorer probability of the given label")
    ax.set_ylabel("samples")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / HIST_NAME, dpi=100)
    plt.close(fig)
    return f"![label_prob histogram]({HIST_NAME})"


def write_filter_report(out: Path, summary: dict, cache) -> None:
    scores = read_ipc(out / FILTER_SCORES_NAME, ["key", "shard", "label", "label_prob", "topk_idx", "margin", "keep"])
    keep = scores.column("keep").to_numpy(zero_copy_only=False)
    lp = scores.column("label_prob").to_numpy()
    classes = summary["classes"]
    n, d = summary["samples"], summary["dropped"]
    lines = ["# filter-labels report", "", f"Rule `{summary['rule']}` on {n} samples: dropped {d} "
             f"({d / n:.1%})" if n else "no samples", "",
             f"Guards kept {summary['guard_kept']} flagged samples (max-drop-frac {summary['max_drop_frac']}, "
             f"min-per-class {summary['min_per_class']}). Skipped (unreadable) samples: {len(summary['skipped'])}.", "",
             "## label_prob", "", _histogram(out, lp, keep), "", "## Per class", "",
             "| label | class | samples | dropped | fraction |", "| --- | --- | --- | --- | --- |"]
    for c in sorted(summary["per_class"], key=lambda c: -c["dropped_frac"])[:50]:
        lines.append(f"| {c['label']} | {c['name']} | {c['samples']} | {c['dropped']} | {c['dropped_frac']:.1%} |")
    if _montage(out, scores, cache, classes):
        lines += ["", "## Most suspicious (lowest margin): given label in red, scorer's top-1 in green", "",
                  f"![suspicious]({MONTAGE_NAME})"]
    atomic_write_bytes(out / FILTER_REPORT_NAME, ("\n".join(lines) + "\n").encode())

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
    """The n dropped samples of lowest margin: only their rows' keys, shards, labels and top-1 are read
    from scores.arrow (``scores``: its keep and margin columns), only their tar members from the shards."""
    from ..data import augment, shards as shardio
    keep = scores.column("keep").to_numpy(zero_copy_only=False)
    dropped = np.flatnonzero(~keep)
    if not len(dropped):
        return False
    margin = scores.column("margin").to_numpy()
    worst = dropped[np.argsort(margin[dropped], kind="stable")[:n]]
    rows = _rows(out / FILTER_SCORES_NAME, ["key", "shard", "label", "topk_idx"], worst)
    keys, shards = rows.column("key").to_pylist(), rows.column("shard").to_pylist()
    labels = rows.column("label").to_numpy()
    top1 = rows.column("topk_idx").combine_chunks().flatten().to_numpy().reshape(len(keys), -1)[:, 0]
    want: dict[str, list[str]] = {}
    for k, shard in zip(keys, shards):
        want.setdefault(shard, []).append(k)
    images = {}
    for shard, need in want.items():
        try:
            path = cache.shard_path(shard)
        except Exception:
            continue
        images.update({k: augment.open_image(x.data) for k, x in shardio.read_samples(path, need).items()})
    worst = range(len(keys))
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


def _rows(path: Path, columns: list[str], rows: np.ndarray):
    """Rows ``rows`` (in that order) of an Arrow IPC file, read one record batch at a time."""
    import pyarrow as pa
    with pa.memory_map(str(path)) as src:
        schema = pa.ipc.open_file(src).schema
        fields = sorted(schema.get_field_index(c) for c in columns)
        reader = pa.ipc.open_file(src, options=pa.ipc.IpcReadOptions(included_fields=fields))
        parts, start = [], 0
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            here = rows[(rows >= start) & (rows < start + batch.num_rows)]
            if len(here):
                parts.append(pa.Table.from_batches([batch.take(pa.array(here - start))]))
            start += batch.num_rows
    t = pa.concat_tables(parts).select(columns)          # rows in file order
    return t.take(pa.array(np.searchsorted(np.sort(rows), rows)))   # in the order asked (rows are distinct)


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
    scores = read_ipc(out / FILTER_SCORES_NAME, ["label_prob", "margin", "keep"])      # no per-sample strings
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
    pairs = summary.get("noise_pairs") or []
    lines += ["", "## Estimated label errors (calibrated confident joint, largest off-diagonal entries)", ""]
    if pairs:
        lines += ["| given class | likely true class | estimated errors |", "| --- | --- | --- |"]
        lines += [f"| {p['given']} {p['given_name']} | {p['true']} {p['true_name']} | {p['count']} |" for p in pairs]
    else:
        lines.append("No confident off-diagonal pair: the scorer agrees with the given labels.")
    if _montage(out, scores, cache, classes):
        lines += ["", "## Most suspicious (lowest margin): given label in red, scorer's top-1 in green", "",
                  f"![suspicious]({MONTAGE_NAME})"]
    atomic_write_bytes(out / FILTER_REPORT_NAME, ("\n".join(lines) + "\n").encode())

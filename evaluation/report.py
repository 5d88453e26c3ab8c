"""Tables and plots of a suite run: ``<suite>.md``, ``.csv``, ``.json``, ``.png`` and TensorBoard scalars.

A result row is one cell (checkpoint x dataset x recipe) with ``acc`` (its headline accuracy: kNN top-1 at the
first k, or the probe's test accuracy) and the protocol's other numbers; a ``mean`` row per checkpoint and dataset
averages ``acc`` over the dataset's ``reference_sizes`` and carries the reference (the paper's number) and the
difference.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["mean_rows", "columns", "format_markdown", "write_tables", "plot_suite", "log_scalars"]


def mean_rows(rows: Sequence[dict], references: dict[str, tuple[Optional[float], Sequence[int]]]) -> list[dict]:
    """One ``mean`` row per (checkpoint, dataset): mean ``acc`` over the reference sizes, reference, difference.

    ``references``: dataset row name -> (reference accuracy or None, sizes it averages)."""
    out = []
    seen = []
    for r in rows:
        key = (r["checkpoint"], r["dataset"])
        if key not in seen:
            seen.append(key)
    for ckpt, ds in seen:
        reference, sizes = references.get(ds, (None, ()))
        cells = [r for r in rows if r["checkpoint"] == ckpt and r["dataset"] == ds and r["size"] in sizes]
        if not cells or len(cells) != len(sizes):
            continue
        acc = sum(r["acc"] for r in cells) / len(cells)
        out.append({"checkpoint": ckpt, "dataset": ds, "size": "mean", "sizes": list(sizes), "acc": acc,
                    "reference": reference, "diff": None if reference is None else acc - reference})
    return out


def columns(rows: Sequence[dict]) -> list[str]:
    """Column order of the CSV / Markdown table: identity first, then numbers in first-seen order."""
    first = ["checkpoint", "dataset", "size", "native_size", "scale", "res", "recipe", "acc"]
    seen = [c for c in first if any(c in r for r in rows)]
    for r in rows:
        for c, value in r.items():
            if c not in seen and c != "sizes" and not isinstance(value, (dict, list)):  # those: JSON only
                seen.append(c)
    tail = [c for c in ("reference", "diff") if c in seen]
    return [c for c in seen if c not in tail] + tail


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return str(value)


def format_markdown(title: str, rows: Sequence[dict]) -> str:
    cols = columns(rows)
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out_dir: str | os.PathLike, name: str, result: dict) -> dict[str, Path]:
    """``{name}.json`` (everything), ``{name}.csv`` and ``{name}.md`` (cells then mean rows). Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(result["rows"]) + list(result["means"])
    paths = {"json": out / f"{name}.json", "csv": out / f"{name}.csv", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    cols = columns(rows)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    paths["md"].write_text(format_markdown(f"{name} ({result['protocol']})", rows))
    return paths


def plot_suite(rows: Sequence[dict], path: str | os.PathLike, ylabel: str) -> Optional[Path]:
    """The paper-style figure: one panel per dataset, accuracy against size / native size (the original plot
    script's relative-GSD axis, log 2), one line per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    if not datasets:
        return None
    cols = min(4, len(datasets))
    nrows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    for ax, ds in zip(axes.flat, datasets):
        for ckpt in dict.fromkeys(r["checkpoint"] for r in rows):
            cells = sorted((r for r in rows if r["dataset"] == ds and r["checkpoint"] == ckpt),
                           key=lambda r: r["scale"])
            if cells:
                ax.plot([r["scale"] for r in cells], [r["acc"] for r in cells], marker="o", label=ckpt)
        ax.set_xscale("log", base=2)
        scales = sorted({r["scale"] for r in rows if r["dataset"] == ds})
        ax.set_xticks(scales, [f"{s:.3g}" for s in scales], fontsize=7)
        ax.minorticks_off()
        ax.set_title(ds)
        ax.set_xlabel("size / native size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_scalars(log_dir: str | os.PathLike, suite: str, rows: Sequence[dict]) -> None:
    """TensorBoard: ``<suite>/<dataset>/<checkpoint>/<metric>`` with the image size as the step."""
    from harness import open_log_writer

    writer = open_log_writer(log_dir)
    for r in rows:
        for metric, value in r.items():
            if metric in ("size", "native_size", "scale", "res", "C") or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            writer.add_scalar(f"{suite}/{r['dataset']}/{r['checkpoint']}/{metric}", value, int(r["size"]))
    writer.close()

"""Figures from the aggregated tables: depth profiles per model and the slope of every run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def profile_figure(layers: pd.DataFrame, metric: str, out: Path) -> Path:
    """One panel per (model, objective): change vs depth, one line per control (mean over seeds)."""
    plt = _pyplot()
    data = layers[(layers.metric == metric) & layers.value.notna()]
    panels = sorted(data.groupby(["model", "objective"]).groups)
    cols = min(4, max(1, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, sharex=True)
    for ax, (model, objective) in zip(axes.flat, panels, strict=False):
        cell = data[(data.model == model) & (data.objective == objective)]
        for control, lines in cell.groupby("control"):
            mean = lines.groupby("depth").value.agg(["mean", "std"]).reset_index()
            ax.plot(mean.depth, mean["mean"], marker="o", ms=3, label=control)
            if lines.seed.nunique() > 1:
                ax.fill_between(mean.depth, mean["mean"] - mean["std"], mean["mean"] + mean["std"], alpha=0.2)
        ax.set_title(f"{model} / {objective}", fontsize=9)
        ax.set_xlabel("depth l/L")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = out / f"profiles_{metric}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def slope_figure(runs: pd.DataFrame, metric: str, out: Path) -> Path:
    """Every run's slope with its bootstrap CI, grouped by model and coloured by control."""
    plt = _pyplot()
    data = runs.dropna(subset=[f"{metric}_slope"]).sort_values(["family", "model", "objective", "control", "seed"])
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(data)), 3.6))
    colours = {c: f"C{i}" for i, c in enumerate(sorted(data.control.unique()))}
    for x, (_, row) in enumerate(data.iterrows()):
        lo, hi = row[f"{metric}_slope_lo"], row[f"{metric}_slope_hi"]
        err = None if pd.isna(lo) else [[row[f"{metric}_slope"] - lo], [hi - row[f"{metric}_slope"]]]
        ax.errorbar(x, row[f"{metric}_slope"], yerr=err, fmt="o", ms=3, color=colours[row.control])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(data)), [f"{r.model}/{r.objective}" for r in data.itertuples()], rotation=90, fontsize=6)
    ax.set_ylabel(f"{metric} slope")
    for control, colour in colours.items():
        ax.plot([], [], "o", color=colour, label=control)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"slopes_{metric}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

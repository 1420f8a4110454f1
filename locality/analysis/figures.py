"""Figures a researcher reads without the code: labelled axes with units, legends, readable at 240 runs.

- `profile_figure`: change vs depth, one panel per setting (model, objective, everything but the control),
  standard vs equal-step as distinct lines with a band over seeds (min to max).
- `slope_forest`: every run's slope with its CI, one row per configuration (its seeds side by side).
- `steepness_scatter`: steepness vs the training-free objective distance, with Spearman's rho.
- `dynamics_figure`: the slope vs training step, for runs that recorded dynamics.
- `head_energy_figure` (Ren et al. 2023): the four feature-adaptation metrics vs the energy at LP-FT's
  switch, at the last layer and summed over layers, one point per run.
- `cross_layer_figure`, `drop_top_figure` (Phang et al. 2021), one per run: the cross-layer CKA heatmaps
  (pretrained, fine-tuned, difference) and the task metrics vs the number of dropped top blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from locality.analysis.tables import trained

METRIC_LABELS = {
    "cosine_tokens": "cosine distance, per token (1 − cos)",
    "cosine": "cosine distance, mean-pooled (1 − cos)",
    "cka_linear": "1 − linear CKA",
    "cka_debiased": "1 − debiased linear CKA",
    "procrustes": "Procrustes distance",
    "euclidean": "relative Euclidean distance",
    "weight_rel": "relative weight change ‖ΔW‖/‖W‖",
}
CONTROL_STYLE = {
    "standard": {"color": "C0", "ls": "-", "marker": "o"},
    "equal_step": {"color": "C3", "ls": "--", "marker": "s"},
}


def label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _style(control: str, index: int) -> dict:
    return CONTROL_STYLE.get(control, {"color": f"C{index + 4}", "ls": ":", "marker": "^"})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


EXTRA_FORMATS: list[str] = []  # e.g. ["svg"] (`locality.analyze --svg`): each figure also in these formats


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    for extra in EXTRA_FORMATS:
        fig.savefig(path.with_suffix(f".{extra}"), bbox_inches="tight", metadata={"Date": None})
    _pyplot().close(fig)
    return path


def profile_figure(layers: pd.DataFrame, metric: str, out: Path) -> Path:
    plt = _pyplot()
    data = layers[(layers.metric == metric) & layers.value.notna()]
    panels = sorted(data.groupby(["family", "model", "objective", "setting_hash"]).groups)
    cols = min(6, max(1, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.1 * cols, 2.6 * rows + 0.6), squeeze=False, sharex=True, layout="constrained"
    )
    controls = sorted(data.control.unique(), key=lambda c: (c != "standard", c))
    for ax, (family, model, objective, setting) in zip(axes.flat, panels, strict=False):
        cell = data[(data.model == model) & (data.objective == objective) & (data.setting_hash == setting)]
        for i, control in enumerate(controls):
            lines = cell[cell.control == control]
            if lines.empty:
                continue
            by_depth = lines.groupby("depth").value.agg(["mean", "min", "max"]).reset_index()
            seeds = lines.seed.nunique()
            style = _style(control, i)
            ax.plot(by_depth.depth, by_depth["mean"], ms=3, lw=1.3, label=f"{control} (n={seeds})", **style)
            if seeds > 1:
                ax.fill_between(
                    by_depth.depth, by_depth["min"], by_depth["max"], color=style["color"], alpha=0.18
                )
        ax.set_title(f"{model} · {objective}\n{family}, setting {setting}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=6, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("depth l/L (0 = embeddings)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(label(metric), fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"Depth profile of change ({label(metric)}): mean over seeds, band = min–max", fontsize=10)
    return _save(fig, out / "figures" / f"profiles_{metric}.png")


def slope_forest(runs: pd.DataFrame, metric: str, out: Path, ci: float | None = None) -> Path:
    plt = _pyplot()
    slope, lo, hi = f"{metric}_slope", f"{metric}_slope_lo", f"{metric}_slope_hi"
    data = runs.dropna(subset=[slope]).assign(_equal=lambda d: d.control != "standard")
    data = data.sort_values(["family", "model", "objective", "setting_hash", "_equal", "control", "seed"])
    configs = list(
        dict.fromkeys(
            zip(data.family, data.model, data.objective, data.setting_hash, data.control, strict=True)
        )
    )
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.24 * len(configs)))
    controls = sorted(data.control.unique(), key=lambda c: (c != "standard", c))
    for row, key in enumerate(configs):
        family, model, objective, setting, control = key
        cell = data[
            (data.model == model)
            & (data.objective == objective)
            & (data.setting_hash == setting)
            & (data.control == control)
        ]
        offsets = np.linspace(-0.3, 0.3, len(cell)) if len(cell) > 1 else [0.0]
        style = _style(control, controls.index(control))
        for offset, (_, run) in zip(offsets, cell.iterrows(), strict=True):
            y = row + offset
            if pd.notna(run.get(lo)) and pd.notna(run.get(hi)):
                ax.plot([run[lo], run[hi]], [y, y], color=style["color"], lw=0.9, alpha=0.8)
            ax.plot(run[slope], y, marker=style["marker"], color=style["color"], ms=3.5, ls="none")
    ax.set_yticks(range(len(configs)), [f"{m} · {o} · {c} ({s})" for _, m, o, s, c in configs], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="grey", lw=0.8)
    level = f"{ci:.0%} " if ci else ""
    ax.set_xlabel(f"locality gradient: OLS slope of {label(metric)} vs depth l/L", fontsize=8)
    ax.set_title(
        f"Slope per run ({level}CI as lines; one row per configuration, its seeds stacked)", fontsize=9
    )
    for i, control in enumerate(controls):
        ax.plot(
            [],
            [],
            marker=_style(control, i)["marker"],
            color=_style(control, i)["color"],
            ls="none",
            label=control,
        )
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.25)
    return _save(fig, out / "figures" / f"slopes_{metric}.png")


def steepness_scatter(runs: pd.DataFrame, metric: str, out: Path, rho: dict | None = None) -> Path | None:
    y = f"{metric}_steepness"
    if "init_kl_norm" not in runs or y not in runs:
        return None
    data = runs.dropna(subset=["init_kl_norm", y])
    if data.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    markers = {"standard": "o", "equal_step": "s"}
    for (family, control), group in data.groupby(["family", "control"]):
        colour = f"C{sorted(data.family.unique()).index(family)}"
        ax.scatter(
            group.init_kl_norm,
            group[y],
            s=22,
            marker=markers.get(control, "^"),
            color=colour,
            alpha=0.8,
            label=f"{family}, {control}",
        )
    ax.set_xlabel("training-free objective distance: KL(target ‖ pretrained) / ln K at step 0", fontsize=8)
    ax.set_ylabel(
        f"steepness of {label(metric)}\n(e-folds of change per unit depth, blocks 1..L)", fontsize=8
    )
    if rho and np.isfinite(rho.get("rho", np.nan)):
        interval = (
            f"[{rho['rho_lo']:+.2f}, {rho['rho_hi']:+.2f}]" if np.isfinite(rho["rho_lo"]) else "(no interval)"
        )
        ax.set_title(
            f"Steepness vs objective distance: Spearman ρ = {rho['rho']:+.2f} {interval}, n = {rho['n']}",
            fontsize=9,
        )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.25)
    return _save(fig, out / "figures" / f"steepness_vs_distance_{metric}.png")


def dose_response_figure(runs: pd.DataFrame, table: pd.DataFrame, metric: str, out: Path) -> Path | None:
    """The profile's slope against the exact objective distance: every run (dots), the setting means
    (squares) and the fitted line with its b and interval, one panel per model x objective."""
    if "init_kl_excess" not in runs:
        return None
    data = trained(runs).dropna(subset=["init_kl_excess", f"{metric}_slope"])
    if data.empty:
        return None
    plt = _pyplot()
    panels = list(data.groupby(["model", "objective"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, ((model, objective), group) in zip(axes[0], panels, strict=True):
        for i, (control, runs_c) in enumerate(group.groupby("control")):
            style = _style(control, i)
            ax.scatter(
                runs_c.init_kl_excess, runs_c[f"{metric}_slope"], s=12, alpha=0.5, color=style["color"]
            )
            means = runs_c.groupby("setting_hash")[["init_kl_excess", f"{metric}_slope"]].mean()
            ax.scatter(means.init_kl_excess, means[f"{metric}_slope"], marker="s", color=style["color"])
            fit = table[
                (table.model == model)
                & (table.objective == objective)
                & (table.control == control)
                & (table.y == f"{metric}_slope")
            ]
            if len(fit) and np.isfinite(fit.b.iloc[0]):
                row = fit.iloc[0]
                xs = np.linspace(means.init_kl_excess.min(), means.init_kl_excess.max(), 50)
                intercept = means[f"{metric}_slope"].mean() - row.b * means.init_kl_excess.mean()
                ax.plot(
                    xs,
                    intercept + row.b * xs,
                    color=style["color"],
                    ls=style["ls"],
                    label=f"{control}: b = {row.b:+.3g} [{row.b_lo:+.3g}, {row.b_hi:+.3g}], "
                    f"one-sided p = {row.p_one_sided:.2g}",
                )
        ax.set_title(f"{model}, {objective}", fontsize=9)
        ax.set_xlabel("objective distance at step 0: excess divergence init.kl_excess, nats", fontsize=8)
        ax.set_ylabel(f"slope of {label(metric)} vs depth", fontsize=8)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.25)
    return _save(fig, out / "figures" / f"dose_response_{metric}.png")


def dynamics_figure(dynamics: pd.DataFrame, metric: str, out: Path) -> Path | None:
    data = dynamics[dynamics.metric == metric] if not dynamics.empty else dynamics
    if data.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    controls = sorted(data.control.unique(), key=lambda c: (c != "standard", c))
    for _, run in data.groupby("name"):
        control = run.control.iloc[0]
        style = _style(control, controls.index(control))
        ax.plot(run.step, run.slope, color=style["color"], ls=style["ls"], lw=1, alpha=0.7)
    for i, control in enumerate(controls):
        ax.plot([], [], color=_style(control, i)["color"], ls=_style(control, i)["ls"], label=control)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("training step (optimizer updates)", fontsize=8)
    ax.set_ylabel(f"slope of {label(metric)} vs depth", fontsize=8)
    ax.set_title("Locality gradient during training (one line per run)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.25)
    return _save(fig, out / "figures" / f"dynamics_{metric}.png")


HEAD_ENERGY_LABELS = {
    "euclidean": "Euclidean distance ‖z_T − z_0‖",
    "cosine": "cosine distance 1 − cos(z_0, z_T)",
    "dot": "dot product ⟨z_0, z_T⟩",
    "norm": "final feature norm ‖z_T‖",
}


def head_energy_figure(energy_runs: pd.DataFrame, trend: pd.DataFrame, out: Path) -> Path | None:
    """2 x 4 panels: each feature metric vs energy, at the last layer (top) and summed over layers (bottom);
    colour = label smoothing, the number beside each point = probing steps; titles carry Spearman's rho."""
    if energy_runs.empty:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.4), layout="constrained")
    smoothings = sorted(energy_runs.label_smoothing.fillna(0).unique())
    for col, (metric, name) in enumerate(HEAD_ENERGY_LABELS.items()):
        for row, where in enumerate(("last", "sum")):
            ax = axes[row, col]
            for i, ls in enumerate(smoothings):
                cell = energy_runs[energy_runs.label_smoothing.fillna(0) == ls]
                ax.scatter(
                    cell.energy, cell[f"{metric}_{where}"], s=28, color=f"C{i}", label=f"smoothing {ls:g}"
                )
                for _, run in cell.iterrows():
                    ax.annotate(
                        f"{run.probe_steps:g}",
                        (run.energy, run[f"{metric}_{where}"]),
                        fontsize=6,
                        xytext=(3, 2),
                        textcoords="offset points",
                    )
            stats = trend[(trend.metric == metric) & (trend["where"] == where)]
            rho = ", ".join(f"ρ={t.rho:+.2f} ({t.shape})" for t in stats.itertuples() if np.isfinite(t.rho))
            ax.set_title(
                f"{'last layer' if where == 'last' else 'sum over layers'}: {rho or 'ρ n/a'}", fontsize=8
            )
            ax.set_ylabel(name + ("" if where == "last" else ", summed"), fontsize=8)
            ax.set_xlabel("energy at the switch: mean ‖e_y − p(x)‖", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.25)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        "Feature adaptation vs head energy (Ren et al. 2023; paper: distances grow with energy, dot product "
        "and norm rise then fall). Numbers: probing steps",
        fontsize=10,
    )
    return _save(fig, out / "figures" / "head_energy.png")


def cross_layer_figure(result: dict, out: Path) -> Path | None:
    """figures/cross_layer/<run>.png from results.json["cross_layer"] (`measure.cross_layer=true`)."""
    from locality.analysis.cross_layer import cross_layer_heatmap, rows_label

    matrices = result.get("cross_layer")
    if not matrices:
        return None
    name = result["run"]["name"]
    return cross_layer_heatmap(
        matrices,
        out / "figures" / "cross_layer" / f"{name}.png",
        title=f"Cross-layer linear CKA of {name}, over {rows_label(matrices)}",
        layers=result.get("layers"),
    )


def drop_top_figure(result: dict, out: Path) -> Path | None:
    """figures/drop_top/<run>.png from results.json["drop_top_k"]: validation metrics vs dropped top blocks."""
    rows = result.get("drop_top_k")
    if not rows:
        return None
    plt = _pyplot()
    data = pd.DataFrame(rows).sort_values("k")
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    scores = [c for c in data.columns if c not in ("k", "loss")]
    for i, column in enumerate(scores):
        ax.plot(data.k, data[column], marker="o", color=f"C{i}", label=column)
    ax.set_xlabel("top blocks dropped (k; no retraining, same head)", fontsize=8)
    ax.set_ylabel("validation " + " / ".join(scores), fontsize=8)
    ax.set_xticks(data.k)
    ax.grid(alpha=0.25)
    if "loss" in data:
        twin = ax.twinx()
        twin.plot(data.k, data.loss, ls="--", marker="x", color="grey", label="loss")
        twin.set_ylabel("validation loss (dashed)", fontsize=8)
    ax.legend(fontsize=7, loc="center left")
    n = result["run"].get("n_layers")
    ax.set_title(f"Dropping top blocks of {result['run']['name']} ({n} blocks)", fontsize=8)
    return _save(fig, out / "figures" / "drop_top" / f"{result['run']['name']}.png")

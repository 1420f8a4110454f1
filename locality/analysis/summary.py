"""summary.md: the paper's tables in markdown, the per-setting slopes, and what is missing or failed."""

from __future__ import annotations

import math

import pandas as pd

from locality.analysis.aggregate import Inventory
from locality.analysis.tables import MIN_RELATIVE_SLOPE, is_effect, trained


def number(value: float, signed: bool = True) -> str:
    """Three significant digits, so a real value is never printed as 0.000 (4.4e-18 stays 4.4e-18)."""
    if pd.isna(value):
        return "-"
    return f"{value:+.3g}" if signed else f"{value:.3g}"


def _fmt_slope(group: pd.DataFrame, metric: str) -> str:
    slopes = group[f"{metric}_slope"].dropna()
    if slopes.empty:
        return "-"
    if len(slopes) == 1:
        lo, hi = group[f"{metric}_slope_lo"].iloc[0], group[f"{metric}_slope_hi"].iloc[0]
        ci = "" if pd.isna(lo) else f" [{number(lo)}, {number(hi)}]"
        return f"{number(slopes.iloc[0])}{ci}"
    return f"{number(slopes.mean())} ± {number(slopes.std(ddof=1), signed=False)} (n={len(slopes)})"


def survives(group: pd.DataFrame, metric: str) -> str:
    """'yes' when the standard runs' gradient is positive and every equal-step run keeps it as an effect
    (`tables.is_effect`: CI above zero and a relative slope of at least MIN_RELATIVE_SLOPE); runs that did not
    train are not counted."""
    group = trained(group)
    standard = group[group.control == "standard"][f"{metric}_slope"].dropna()
    equal = group[group.control == "equal_step"]
    if standard.empty or equal.empty:
        return "-"
    if standard.mean() <= 0:
        return "no positive gradient"
    return "yes" if is_effect(equal, metric).all() else "no"


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    if frame.empty:
        return "_(no runs to tabulate)_"

    def cell(value) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value) if value is not None and value != "" else "-"

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def settings_table(runs: pd.DataFrame, metric: str) -> str:
    runs = trained(runs)
    controls = sorted(runs.control.unique(), key=lambda c: (c != "standard", c))
    lines = [
        "| family | model | objective | setting | " + " | ".join(controls) + " | survives equal-step |",
        "|" + "---|" * (len(controls) + 5),
    ]
    # one row per setting: runs with other data or hyperparameters are never averaged together
    for (family, model, objective, setting), group in runs.groupby(
        ["family", "model", "objective", "setting_hash"]
    ):
        cells = [_fmt_slope(group[group.control == c], metric) for c in controls]
        lines.append(
            f"| {family} | {model} | {objective} | {setting} | "
            + " | ".join(cells)
            + f" | {survives(group, metric)} |"
        )
    return "\n".join(lines)


def did_not_train_section(runs: pd.DataFrame) -> list[str]:
    lines = []
    if "did_not_train" in runs and runs.did_not_train.any():
        left_out = runs[runs.did_not_train.astype(bool)]
        lines += [f"**{len(left_out)} runs did not train** (left out of every table below):", ""]
        lines += [f"- {row.name}: {row.did_not_train_reason}" for row in left_out.itertuples()] + [""]
    if "stopped_early" in runs and runs.stopped_early.any():
        early = runs[runs.stopped_early.astype(bool)]
        if "did_not_train" in early:
            early = early[~early.did_not_train.astype(bool)]
        lines += [f"**{len(early)} runs stopped early** (fewer steps than trainer.max_steps; counted):", ""]
        lines += [f"- {row.name}: {row.steps} steps" for row in early.itertuples()] + [""]
    return lines


def inventory_section(found: Inventory, missing: list[str] | None) -> list[str]:
    lines = []
    if missing:
        lines += [f"**{len(missing)} planned runs have no results yet** (from `locality.plan`):", ""]
        lines += [f"- {name}" for name in missing] + [""]
    if found.failed:
        lines += [
            f"**{len(found.failed)} failed runs** (failed.json):",
            "",
            "| run | step | reason |",
            "|---|---|---|",
        ]
        lines += [
            f"| {f['run']} | {f['step'] if f['step'] is not None else '-'} | {f['reason']} |"
            for f in found.failed
        ] + [""]
    if found.incomplete:
        lines += [
            f"**{len(found.incomplete)} incomplete runs** (config.yaml but no results.json: still running, "
            "or killed):",
            "",
        ]
        lines += [f"- {name}" for name in found.incomplete] + [""]
    if found.unreadable:
        lines += [f"**{len(found.unreadable)} results files could not be read** (skipped):", ""]
        lines += [f"- {u['path']}: {u['reason']}" for u in found.unreadable] + [""]
    return lines


def summary_markdown(
    runs: pd.DataFrame,
    metric: str,
    tables: dict[str, pd.DataFrame] | None = None,
    found: Inventory | None = None,
    missing: list[str] | None = None,
) -> str:
    tables = tables or {}
    lines = [f"# locality summary ({len(runs)} runs, metric `{metric}`)", ""]
    lines += inventory_section(found, missing) if found is not None else []
    lines += did_not_train_section(runs)
    titles = {
        "headline": "Headline: standard runs with a positive locality gradient, per metric",
        "equal_step_survival": f"Equal-step survival ({metric}): survivors have the slope's CI above zero and a "
        f"relative slope (slope / mean change) of at least {MIN_RELATIVE_SLOPE:g}",
        "steepness_vs_distance": "Slope and steepness vs training-free objective distance (Spearman ρ; "
        "Fisher-z interval and p-value, none below 8 points or for shared x)",
        "width_variance": f"Variance in width ({metric} width_count) explained by architecture vs objective",
        "step0_prediction": "Does the step-0 profile predict the trained one? (Spearman ρ across runs)",
        "dose_response": f"Dose-response: is the {metric} profile steeper where the objective is further? (OLS "
        "of the profile's slope on the exact excess divergence, one point per setting; hypothesis b > 0)",
        "linearized_vs_standard": f"Linearized vs standard fine-tuning ({metric} slope and final loss, mean over seeds)",
    }
    for key, title in titles.items():
        if key in tables:
            lines += [f"## {title}", "", markdown_table(tables[key]), ""]
    if "head_energy" in tables and "head_energy_trend" in tables:
        lines += head_energy_section(tables["head_energy"], tables["head_energy_trend"])
    lines += [
        "## Slope per setting",
        "",
        f"Slope of `{metric}` change vs normalized depth (positive: change concentrates near the output), "
        "with the bootstrap CI for single runs and mean ± sd over seeds otherwise. A setting is everything "
        "but the control and the seed (its hash); different settings are never pooled.",
        "",
        settings_table(runs, metric),
        "",
    ]
    return "\n".join(lines)


def head_energy_verdict(model: str, runs: pd.DataFrame, trend: pd.DataFrame) -> str:
    """One sentence: does this model show Ren et al.'s trend at the last layer?"""
    last = trend[(trend.model == model) & (trend["where"] == "last")].set_index("metric")
    if last.empty or (last.agrees == "-").all():
        return f"**{model}**: too few runs with distinct energies to tell (need 4)."
    parts = []
    for metric, row in last.iterrows():
        ci = "" if pd.isna(row["rho_lo"]) else f" [{row['rho_lo']:+.2f}, {row['rho_hi']:+.2f}]"
        peak = f", peak at energy {row['peak_energy']:.3f}" if pd.notna(row["peak_energy"]) else ""
        parts.append(f"{metric} ρ = {row['rho']:+.2f}{ci} ({row['shape']}{peak}; paper: {row['paper']})")
    strong = last.agrees == "yes"
    weak = last.agrees.isin(["yes", "direction only"])
    if strong.all():
        verdict = "yes"
    elif weak.all():
        verdict = "in direction only (a distance's rank correlation has no interval, n < 8, or one that includes zero)"
    else:
        verdict = "partly" if weak.any() else "no"
    energy = runs[runs.model == model].energy
    return (
        f"**{model}** ({len(energy)} runs, energy {energy.min():.3f} to {energy.max():.3f}): "
        + "; ".join(parts)
        + f". Shows the paper's trend at the last layer: **{verdict}** "
        f"({int(strong.sum())} of {len(last)} metrics agree, {int(weak.sum())} at least in direction)."
    )


def head_energy_section(runs: pd.DataFrame, trend: pd.DataFrame) -> list[str]:
    """Ren et al. 2023: the LP-FT runs' energy and feature metrics, the trend table and a verdict per model."""
    shown = ["name", "probe_steps", "label_smoothing", "energy", "energy_acc"]
    shown += [f"{m}_last" for m in ("euclidean", "cosine", "dot", "norm")]
    lines = [
        "## Head energy and feature adaptation (Ren et al. 2023)",
        "",
        "Energy = mean ‖e_y − p(x)‖ over fixed training examples at LP-FT's switch to full fine-tuning. "
        "Feature metrics are means over the probe set between the pretrained (z_0) and fine-tuned (z_T) "
        "features; `_last` = the last layer (with measure.pooling=first on an encoder, the head's input), "
        "`_sum` (tables/head_energy.csv) = summed over every layer. The paper: as energy grows, Euclidean and "
        "cosine distance grow, while the dot product and the final norm first rise, then fall (shape from a "
        "quadratic fit: a peak inside the observed energies).",
        "",
        markdown_table(runs[shown]),
        "",
        markdown_table(trend),
        "",
    ]
    lines += [head_energy_verdict(model, runs, trend) for model in sorted(runs.model.unique())] + [""]
    return lines

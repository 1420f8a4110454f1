"""A short markdown summary: does each (model, objective) profile survive the equal-step control?"""

from __future__ import annotations

import pandas as pd


def _fmt_slope(group: pd.DataFrame, metric: str) -> str:
    slopes = group[f"{metric}_slope"].dropna()
    if slopes.empty:
        return "-"
    if len(slopes) == 1:
        lo, hi = group[f"{metric}_slope_lo"].iloc[0], group[f"{metric}_slope_hi"].iloc[0]
        ci = "" if pd.isna(lo) else f" [{lo:+.3f}, {hi:+.3f}]"
        return f"{slopes.iloc[0]:+.3f}{ci}"
    return f"{slopes.mean():+.3f} ± {slopes.std(ddof=1):.3f} (n={len(slopes)})"


def survives(group: pd.DataFrame, metric: str) -> str:
    """'yes' when every equal-step run keeps the standard runs' sign and its CI excludes zero."""
    standard = group[group.control == "standard"][f"{metric}_slope"].dropna()
    equal = group[group.control == "equal_step"]
    if standard.empty or equal.empty:
        return "-"
    sign = 1 if standard.mean() > 0 else -1
    lo, hi = equal[f"{metric}_slope_lo"], equal[f"{metric}_slope_hi"]
    same_sign = (sign * equal[f"{metric}_slope"] > 0).all()
    excludes_zero = ((lo > 0) | (hi < 0)).all() if lo.notna().all() else same_sign
    return "yes" if same_sign and excludes_zero else "no"


def summary_markdown(runs: pd.DataFrame, metric: str) -> str:
    lines = [f"# locality summary ({len(runs)} runs, metric `{metric}`)", "",
             f"Slope of `{metric}` change vs normalized depth (positive: change concentrates near the output), "
             "with the 95% bootstrap CI for single runs and mean ± sd over seeds otherwise.", ""]
    controls = sorted(runs.control.unique())
    lines.append("| family | model | objective | " + " | ".join(controls) + " | survives equal-step |")
    lines.append("|" + "---|" * (len(controls) + 4))
    for (family, model, objective), group in runs.groupby(["family", "model", "objective"]):
        cells = [_fmt_slope(group[group.control == c], metric) for c in controls]
        lines.append(f"| {family} | {model} | {objective} | " + " | ".join(cells) + f" | {survives(group, metric)} |")
    return "\n".join(lines) + "\n"

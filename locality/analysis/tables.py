"""The paper's tables from the runs table: one function per table, each returning a pandas DataFrame.

Every table counts only runs that trained (`trained`; `locality.core.results.did_not_train` says why a run did not).

- `headline`: per metric, how many standard runs have a positive locality gradient (slope), how many with a
  CI above zero, and which runs are the exceptions. First row: the default metric.
- `equal_step_survival`: by block type x objective class (causal LM vs other) x scale band, how many
  equal-step runs keep a positive slope, with its CI above zero, and as an effect (`is_effect`: CI above zero
  and a relative slope of at least MIN_RELATIVE_SLOPE).
- `steepness_vs_distance`: Spearman rho between the training-free objective distance (`init.kl_norm`) and the
  profile's linear slope, then its steepness (one point per step-0 measurement).
- `dose_response`: for runs whose objective distance is exact (objective=distill, experiment=distance_dose):
  the OLS slope of the profile's linear slope (then steepness) on the distance, one point per setting, with a
  t interval and the one-sided p-value of the hypothesis that it is positive.
- `width_variance`: the share of variance in width explained by architecture vs objective (two-way ANOVA,
  eta squared, statsmodels).
- `step0_prediction`: does the profile at step 0 predict the trained one? Spearman rho across runs between
  the trained slope and the step-0 gradient profile's slope (and the first steps' update-ratio slope where
  recorded), per control.
- `head_energy_runs` / `head_energy_trend` (Ren et al. 2023, LP-FT runs): per run the energy at the switch
  and the four feature-adaptation metrics (at the last layer and summed over all layers); per metric the
  Spearman rho against energy and the shape of the relation (increasing, decreasing, rise then fall, ...),
  judged against the paper's trend: distances grow with energy, dot product and feature norm first rise
  and then fall.
- `linearized_vs_standard` (Afzal et al. 2025): per setting with both, the slope and final loss of the
  first-order Taylor model (`control=linearized`) beside standard fine-tuning's, averaged over seeds.

Statistics come from scipy and statsmodels. A rank correlation's interval and p-value come from one method
(Fisher's z, `spearman_with_ci`), and there is none for fewer than 8 points or for points that share an x.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from locality.core.results import Results


def _slope_cols(metric: str) -> tuple[str, str, str]:
    return f"{metric}_slope", f"{metric}_slope_lo", f"{metric}_slope_hi"


def trained(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that trained (`locality.core.results.did_not_train`): the only ones any table counts."""
    return runs[~runs.did_not_train.astype(bool)] if "did_not_train" in runs else runs


def headline(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Standard runs that trained: `metric, n_runs, n_positive, fraction_positive, n_ci_above_zero, exceptions`,
    and `n_did_not_train` (standard runs left out)."""
    standard = runs[runs.control == "standard"]
    left_out = len(standard) - len(trained(standard))
    standard = trained(standard)
    rows = []
    for metric in metrics:
        slope, lo, _ = _slope_cols(metric)
        if slope not in standard:
            continue
        have = standard.dropna(subset=[slope])
        positive = have[slope] > 0
        rows.append(
            {
                "metric": metric,
                "n_runs": len(have),
                "n_positive": int(positive.sum()),
                "fraction_positive": float(positive.mean()) if len(have) else math.nan,
                "n_ci_above_zero": int((have[lo] > 0).sum()) if lo in have else 0,
                "exceptions": ";".join(sorted(have.loc[~positive, "name"])),
                "n_did_not_train": left_out,
            }
        )
    columns = ["metric", "n_runs", "n_positive", "fraction_positive", "n_ci_above_zero", "exceptions"]
    return pd.DataFrame(rows, columns=[*columns, "n_did_not_train"])


def objective_class(objective: str) -> str:
    return "causal LM" if objective == "clm" else "other"


# A gradient "survives" equal-step only if it is an effect, not just a CI above zero: its slope must be at least
# this share of the profile's own level (mean change over depth). A linear profile from 0 to c has slope c and
# level c/2 (relative slope 2); 0.1 means the top of the profile exceeds the bottom by about a tenth of the
# level. Scale-free, so one threshold serves every metric and model.
MIN_RELATIVE_SLOPE = 0.1


def is_effect(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Per run: slope CI above zero (the slope itself where there is no CI) and relative slope >= the floor."""
    slope, lo, _ = _slope_cols(metric)
    bound = frame[lo].fillna(frame[slope]) if lo in frame else frame[slope]
    relative = frame.get(f"{metric}_slope_relative", pd.Series(math.inf, index=frame.index))
    return (bound > 0) & (relative.fillna(-math.inf) >= MIN_RELATIVE_SLOPE)


def equal_step_survival(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Equal-step runs that trained, by block_type x objective class x scale band: positive slopes, CI above
    zero, and survivors (CI above zero and relative slope >= MIN_RELATIVE_SLOPE)."""
    slope, lo, _ = _slope_cols(metric)
    equal = trained(runs[runs.control == "equal_step"]).dropna(subset=[slope]).copy()
    columns = ["block_type", "objective_class", "scale_band", "n_runs", "n_positive", "n_ci_above_zero"]
    columns += ["n_survive", "fraction_survive"]
    if equal.empty:
        return pd.DataFrame(columns=columns)
    equal["objective_class"] = equal.objective.map(objective_class)
    equal["ci_above_zero"] = equal[lo] > 0
    equal["survive"] = is_effect(equal, metric)
    table = equal.groupby(["block_type", "objective_class", "scale_band"], dropna=False).agg(
        n_runs=(slope, "size"),
        n_positive=(slope, lambda s: int((s > 0).sum())),
        n_ci_above_zero=("ci_above_zero", "sum"),
        n_survive=("survive", "sum"),
    )
    table["fraction_survive"] = table.n_survive / table.n_runs
    return table.reset_index()[columns]


MIN_POINTS_FOR_INTERVAL = 8
RHO_COLUMNS = ["n", "rho", "p_value", "rho_lo", "rho_hi", "interval"]


def spearman_with_ci(x: pd.Series, y: pd.Series, ci: float = 0.95) -> dict:
    """Spearman rho between paired points, with its CI and p-value from one method: Fisher's z = atanh(rho)
    with the standard error sqrt(1.06 / (n - 3)) of Fieller, Hartley & Pearson (1957), so p < 1 - ci exactly
    when the interval excludes zero. No interval or p-value below MIN_POINTS_FOR_INTERVAL points, or when
    points share an x value (ties from runs that share one measurement are not independent points);
    `interval` says why."""
    pairs = pd.DataFrame({"x": x, "y": y}).replace([np.inf, -np.inf], np.nan).dropna()
    n = len(pairs)
    out = {"n": n, "rho": math.nan, "p_value": math.nan, "rho_lo": math.nan, "rho_hi": math.nan}
    if n < 3 or pairs.x.nunique() < 2 or pairs.y.nunique() < 2:
        return {**out, "interval": "too few distinct points"}
    rho = float(stats.spearmanr(pairs.x, pairs.y).statistic)
    out["rho"] = rho
    if n < MIN_POINTS_FOR_INTERVAL:
        return {**out, "interval": f"none: n < {MIN_POINTS_FOR_INTERVAL}"}
    if pairs.x.duplicated().any():
        return {**out, "interval": "none: runs share x values"}
    se = math.sqrt(1.06 / (n - 3))
    z = math.atanh(min(max(rho, -0.999999), 0.999999))
    half = stats.norm.ppf((1 + ci) / 2) * se
    out["rho_lo"], out["rho_hi"] = math.tanh(z - half), math.tanh(z + half)
    out["p_value"] = float(2 * stats.norm.sf(abs(z) / se))
    return {**out, "interval": f"Fisher z, {ci:.0%}"}


def one_point_per_measurement(runs: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Runs of one setting that share an x value are one point (y averaged over them): the controls of a
    setting and seed share their step-0 measurement (`timings.init_shared`), and a deterministic distance
    (an LM objective's KL) is the same number for every seed. They are replicates, not independent points."""
    if "setting_hash" not in runs:
        return pd.DataFrame({"x": runs[x], "y": runs[y]})
    return (
        runs.groupby(["setting_hash", x], dropna=True)
        .agg(y=(y, "mean"))
        .reset_index()
        .rename(columns={x: "x"})
    )


def steepness_vs_distance(runs: pd.DataFrame, metric: str, ci: float = 0.95) -> pd.DataFrame:
    """Spearman rho between the training-free objective distance (init.kl_norm) and the profile's shape: the
    paper's linear slope first, the log-linear growth rate (steepness) second; per control and over all runs
    (one point per step-0 measurement). Runs that did not train are left out."""
    rows = []
    runs = trained(runs)
    for control, group in [("all", runs), *runs.groupby("control")]:
        for shape in ("slope", "steepness"):
            y = f"{metric}_{shape}"
            if y not in group or "init_kl_norm" not in group:
                continue
            points = one_point_per_measurement(group, "init_kl_norm", y)
            rows.append(
                {
                    "metric": metric,
                    "control": control,
                    "x": "init_kl_norm",
                    "y": y,
                    **spearman_with_ci(points.x, points.y, ci=ci),
                }
            )
    return pd.DataFrame(rows, columns=["metric", "control", "x", "y", *RHO_COLUMNS])


DOSE_COLUMNS = ["metric", "model", "objective", "control", "y", "n_settings", "n_runs", "x_min", "x_max"]
DOSE_COLUMNS += ["b", "b_lo", "b_hi", "p_one_sided", "hypothesis", "supported"]


def dose_response(runs: pd.DataFrame, metric: str, ci: float = 0.95) -> pd.DataFrame:
    """Does the profile steepen where the objective is further? For runs with an exact excess divergence
    (`init_kl_excess`: objective=distill, experiment=distance_dose), per model x objective x control: the OLS
    slope b of the profile's linear slope (then its log-rate steepness) on the distance, one point per setting
    (seeds averaged: they are replicates), a t interval on n - 2 degrees of freedom and the one-sided p-value
    of the stated hypothesis b > 0. `supported`: the interval lies above zero."""
    rows = []
    if "init_kl_excess" not in runs:
        return pd.DataFrame(columns=DOSE_COLUMNS)
    dosed = trained(runs).dropna(subset=["init_kl_excess"])
    for (model, objective, control), group in dosed.groupby(["model", "objective", "control"]):
        for shape in ("slope", "steepness"):
            y = f"{metric}_{shape}"
            if y not in group:
                continue
            points = group.groupby("setting_hash").agg(x=("init_kl_excess", "mean"), y=(y, "mean")).dropna()
            row = {"metric": metric, "model": model, "objective": objective, "control": control, "y": y}
            row |= {"n_settings": len(points), "n_runs": len(group), "hypothesis": "b > 0"}
            row |= {"x_min": points.x.min(), "x_max": points.x.max()}
            fit = _ols(points.x.to_numpy(float), points.y.to_numpy(float), ci)
            rows.append(
                row | fit | {"supported": bool(fit["b_lo"] > 0) if np.isfinite(fit["b_lo"]) else None}
            )
    return pd.DataFrame(rows, columns=DOSE_COLUMNS)


def _ols(x: np.ndarray, y: np.ndarray, ci: float) -> dict:
    """Slope of y on x with its t interval (n - 2 df) and the one-sided p-value for slope > 0."""
    none = {"b": math.nan, "b_lo": math.nan, "b_hi": math.nan, "p_one_sided": math.nan}
    if len(x) < 3 or np.ptp(x) == 0:
        return none
    fit = stats.linregress(x, y)
    dof = len(x) - 2
    half = stats.t.ppf((1 + ci) / 2, dof) * fit.stderr
    p = stats.t.sf(fit.slope / fit.stderr, dof) if fit.stderr > 0 else (0.0 if fit.slope > 0 else 1.0)
    return {"b": fit.slope, "b_lo": fit.slope - half, "b_hi": fit.slope + half, "p_one_sided": float(p)}


def width_variance(runs: pd.DataFrame, metric: str, width: str = "width_count") -> pd.DataFrame:
    """Two-way ANOVA of width on architecture (model) and objective, standard runs: eta^2 per factor."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    column = f"{metric}_{width}"
    columns = ["metric", "width", "factor", "sum_sq", "df", "F", "p_value", "eta_sq", "n_runs"]
    standard = trained(runs[runs.control == "standard"])
    data = standard.dropna(subset=[column]) if column in runs else runs.iloc[:0]
    data = data.rename(columns={column: "w"})
    factors = [f for f in ("model", "objective") if f in data and data[f].nunique() > 1]
    if len(data) < 4 or not factors or data.w.nunique() < 2:
        return pd.DataFrame(columns=columns)
    fit = smf.ols("w ~ " + " + ".join(f"C({f})" for f in factors), data=data).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = anova_lm(fit, typ=2)
    total = float(((data.w - data.w.mean()) ** 2).sum())
    rows = []
    for term, row in table.iterrows():
        factor = {"C(model)": "architecture (model)", "C(objective)": "objective"}.get(term, term.lower())
        rows.append(
            {
                "metric": metric,
                "width": width,
                "factor": factor,
                "sum_sq": float(row.sum_sq),
                "df": float(row.df),
                "F": float(row.F) if pd.notna(row.F) else math.nan,
                "p_value": float(row["PR(>F)"]) if pd.notna(row["PR(>F)"]) else math.nan,
                "eta_sq": float(row.sum_sq) / total if total > 0 else math.nan,
                "n_runs": len(data),
            }
        )
    return pd.DataFrame(rows, columns=columns)


STEP0_PREDICTORS = {
    "init_grad_rel_slope": "step-0 gradient profile slope (grad_rel)",
    "init_update_rel_slope": "first steps' update-ratio slope (update_rel)",
}


def step0_prediction(runs: pd.DataFrame, metric: str, ci: float = 0.95) -> pd.DataFrame:
    """Per control: Spearman rho between the trained slope and each step-0 profile slope that was recorded."""
    rows = []
    slope = f"{metric}_slope"
    for control, group in trained(runs).groupby("control"):
        for predictor, label in STEP0_PREDICTORS.items():
            if predictor not in group or group[predictor].isna().all() or slope not in group:
                continue
            points = one_point_per_measurement(group, predictor, slope)
            rows.append(
                {
                    "metric": metric,
                    "control": control,
                    "predictor": label,
                    **spearman_with_ci(points.x, points.y, ci=ci),
                }
            )
    return pd.DataFrame(rows, columns=["metric", "control", "predictor", *RHO_COLUMNS])


# Ren et al. 2023: feature metric -> the paper's trend against energy
def linearized_vs_standard(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per setting holding both controls: mean slope and final loss (over seeds) of linearized vs standard
    fine-tuning, and their ratio (linearized / standard)."""
    slope = f"{metric}_slope"
    columns = ["setting_hash", "model", "objective", "n_standard", "n_linearized"]
    columns += ["slope_standard", "slope_linearized", "slope_ratio", "final_loss_standard"]
    columns += ["final_loss_linearized"]
    rows = []
    both = runs[runs.control.isin(["standard", "linearized"])]
    for setting, group in both.groupby("setting_hash"):
        by = {c: group[group.control == c] for c in ("standard", "linearized")}
        if by["standard"].empty or by["linearized"].empty:
            continue
        mean = {c: by[c][slope].mean() if slope in by[c] else math.nan for c in by}
        loss = {c: by[c]["final_loss"].mean() if "final_loss" in by[c] else math.nan for c in by}
        rows.append(
            {
                "setting_hash": setting,
                "model": group.model.iloc[0],
                "objective": group.objective.iloc[0],
                "n_standard": len(by["standard"]),
                "n_linearized": len(by["linearized"]),
                "slope_standard": mean["standard"],
                "slope_linearized": mean["linearized"],
                "slope_ratio": mean["linearized"] / mean["standard"] if mean["standard"] else math.nan,
                "final_loss_standard": loss["standard"],
                "final_loss_linearized": loss["linearized"],
            }
        )
    return pd.DataFrame(rows, columns=columns)


HEAD_ENERGY_TREND = {
    "euclidean": "increasing",
    "cosine": "increasing",
    "dot": "rise then fall",
    "norm": "rise then fall",
}
HEAD_ENERGY_COLUMNS = ["probe_steps", "label_smoothing", "temperature", "switch_step"]


def head_energy_runs(results: list[Results]) -> pd.DataFrame:
    """One row per LP-FT run with an energy at the switch: the energy (mean ||e_y - p||, loss, accuracy),
    init.energy (the random head at step 0) and, per Ren et al. feature metric m, `m_last` (the last layer:
    with pooling=first on an encoder, the head's input z) and `m_sum` (summed over every layer, 0..L)."""
    rows = []
    for r in results:
        lp = (r.get("controls") or {}).get("lp_ft") or {}
        features = r.get("features") or {}
        if lp.get("energy") is None or not all(features.get(m) for m in HEAD_ENERGY_TREND):
            continue
        run = r["run"]
        row = {"name": run["name"], "model": run.get("model"), "objective": run.get("objective")}
        row.update({k: lp.get(k) for k in HEAD_ENERGY_COLUMNS})
        row.update({k: lp.get(k) for k in ("energy", "energy_loss", "energy_acc")})
        row["init_energy"] = (r.get("init") or {}).get("energy")
        row["final_acc"] = (r.get("final") or {}).get("acc")
        for m in HEAD_ENERGY_TREND:
            values = np.asarray(features[m], dtype=float)
            row[f"{m}_last"], row[f"{m}_sum"] = float(values[-1]), float(np.nansum(values))
        rows.append(row)
    columns = ["name", "model", "objective", *HEAD_ENERGY_COLUMNS, "energy", "energy_loss", "energy_acc"]
    columns += ["init_energy", "final_acc", *(f"{m}_{w}" for m in HEAD_ENERGY_TREND for w in ("last", "sum"))]
    return pd.DataFrame(rows, columns=columns).sort_values(["model", "energy"], ignore_index=True)


def trend_shape(x: pd.Series, y: pd.Series) -> tuple[str, float]:
    """(shape, peak): the sign of the curvature of a quadratic fit of y on x, when its vertex lies strictly
    inside the observed x range ("rise then fall" / "fall then rise", peak = the vertex), else the direction
    of the monotone trend ("increasing" / "decreasing" by Spearman rho, peak NaN). "-" with < 4 distinct x."""
    pairs = pd.DataFrame({"x": x, "y": y}).dropna()
    if pairs.x.nunique() < 4:
        return "-", math.nan
    c, b, _ = np.polyfit(pairs.x, pairs.y, 2)
    vertex = -b / (2 * c) if c != 0 else math.nan
    if np.isfinite(vertex) and pairs.x.min() < vertex < pairs.x.max():
        return ("rise then fall" if c < 0 else "fall then rise"), float(vertex)
    rho = stats.spearmanr(pairs.x, pairs.y).statistic
    return ("increasing" if rho > 0 else "decreasing"), math.nan


def head_energy_trend(energy_runs: pd.DataFrame, ci: float = 0.95) -> pd.DataFrame:
    """Per model, feature metric and where (last layer | sum over layers): Spearman rho of the metric vs the
    energy at the switch (bootstrap CI over runs), the shape of the relation, and whether it agrees with the
    paper (`_agrees`: distances increase with energy; dot product and norm rise then fall)."""
    columns = ["model", "metric", "where", "paper", *RHO_COLUMNS, "shape", "peak_energy", "agrees"]
    rows = []
    for model, group in energy_runs.groupby("model"):
        for metric, paper in HEAD_ENERGY_TREND.items():
            for where in ("last", "sum"):
                y = group[f"{metric}_{where}"]
                shape, peak = trend_shape(group.energy, y)
                rho = spearman_with_ci(group.energy, y, ci=ci)
                row = {"model": model, "metric": metric, "where": where, "paper": paper, **rho}
                rows.append(
                    {**row, "shape": shape, "peak_energy": peak, "agrees": _agrees(paper, shape, rho)}
                )
    return pd.DataFrame(rows, columns=columns)


def _agrees(paper: str, shape: str, rho: dict) -> str:
    """Increasing: "yes" when rho > 0 with its CI above zero, "direction only" when rho > 0 alone. Rise then
    fall: "yes" when the fitted shape is. "-" when there are too few runs to tell."""
    if shape == "-" or not np.isfinite(rho["rho"]):
        return "-"
    if paper == "increasing":
        if rho["rho"] > 0:
            return "yes" if rho["rho_lo"] > 0 else "direction only"
        return "no"
    return "yes" if shape == paper else "no"

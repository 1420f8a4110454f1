"""Statistics of a depth profile of change: every definition of slope, steepness and width lives here.

A profile is one change value c_l per layer l = 0..L at normalized depth l/L (0 = embeddings, 1 = last
block). Layers whose value is None or NaN (e.g. weight_rel of the embedding layer when it is not a block)
are dropped from every statistic.

- slope (the locality gradient): OLS slope of c_l against depth l/L. Positive = change concentrates in
  output-proximal layers. Its interval (level `ci`, e.g. 0.95) depends on the metric's estimator:
  - bootstrap (cosine, cosine_tokens, cka_debiased, euclidean): the same fit on each bootstrap replicate
    (replicates resample probe sequences; see `layer_changes`), fitted on the layers where the point
    profile is defined; method "basic" reflects the replicate quantiles around the point (2 * slope - q),
    "percentile" takes them as they are. Its ends are noisy below ~200 replicates.
  - jackknife (the plug-in metrics cka_linear and procrustes, when d <= n/4): their bias grows as the
    feature dimension d approaches the number of probe rows n, their bootstrap replicates carry it too,
    and the simulated coverage of the nominal-95% bootstrap interval fell far below nominal (0.003-0.86
    for procrustes, 0.17-0.90 for cka_linear in the issue's settings; bench/ci_coverage.py at n=128,
    d=32: 0.84 and 0.81, where the jackknife gave 0.91 and 0.90 with a bias of the slope of +0.2% instead
    of -13% and -6%). A delete-a-group jackknife of the slope corrects the O(1/n) bias: with theta the full-set slope and
    theta_(-g) the slope without group g of G, pseudo-values p_g = G theta - (G-1) theta_(-g); the interval
    is mean(p) +- t_{G-1} sd(p) / sqrt(G), and `slope_jackknife` = mean(p) is the bias-corrected slope
    (`slope` stays the plain estimate, comparable across metrics). See `jackknife_interval`.
  - none (cka_linear, procrustes with d > n/4; procrustes whose change exceeds JACKKNIFE_MAX_CHANGE = 0.9
    at some layer): no resampling interval was found to cover there, so `slope_ci` is None and `ci_note`
    says why (`interval_method`, `large_change_note`).
- slope_per_layer: the same OLS slope against the layer index l = 0..L (= slope / L when every layer is
  defined): the change added per layer, as the paper states steepness.
- steepness: the log-linear growth rate over blocks 1..L, OLS slope of ln(c_l) against depth = e-folds of
  change per unit depth (exp(k * depth) has steepness k). It is scale-free, unlike the slope, so it
  compares the shape of metrics with different units. Layer 0 (the embedding output) is excluded: its
  change is often ~0 (embeddings barely move), and ln of ~0 dominated the fit, so the rate depended on
  the floor (5.3 at a floor of 1e-2, 11.2 at 1e-6 on a tiny GPT-2). A block with zero change is still
  floored at STEEPNESS_FLOOR * max(c) (ln(1e-3) = -6.9 below the maximum) to stay finite.
- width: fraction of layers whose change is at least half the maximum change (1/(L+1) = all change in
  one layer; 1 = spread evenly). NaN when no layer changed (max <= 0). Relative, so scale-free.
- width_count: the paper's width, the number of layers (0..L, defined ones) whose change exceeds an
  absolute threshold (`measure.width_threshold`, default WIDTH_THRESHOLD = 0.1). The threshold is on
  the metric's own scale: 0.1 means 1 - cos > 0.1 for cosine/cosine_tokens, CKA below 0.9 for the CKA
  metrics, a Procrustes distance (in [0, 2]) above 0.1; for euclidean (unbounded, in the hidden states'
  units) and weight_rel (relative weight change) it is only comparable within one model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from locality.measure.similarity import PLUGIN_METRICS

STEEPNESS_FLOOR = 1e-3
WIDTH_THRESHOLD = 0.1
CI_METHODS = ("basic", "percentile", "jackknife")
Values = Sequence[float | None] | np.ndarray


def _finite(x: Values, y: Values) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray([math.nan if v is None else v for v in y], dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"depth and values must have the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def ols_slope(x: Values, y: Values) -> float:
    """Ordinary least-squares slope of y on x; None/NaN points dropped; NaN with < 2 distinct x."""
    x, y = _finite(x, y)
    xc = x - x.mean() if x.size else x
    sxx = float(xc @ xc)
    return float(xc @ (y - y.mean())) / sxx if x.size >= 2 and sxx > 0 else math.nan


def slope_per_layer(values: Values) -> float:
    """OLS slope of c_l against the layer index l = 0..L (None/NaN layers dropped)."""
    return ols_slope(np.arange(len(values), dtype=np.float64), values)


def steepness(
    depth: Values, values: Values, floor: float = STEEPNESS_FLOOR, blocks_only: bool = True
) -> float:
    """OLS slope of ln(max(c_l, floor * max c)) against depth over blocks 1..L: e-folds per unit depth.

    blocks_only=False also fits layer 0 (the embedding output), as before; its near-zero change made the
    rate depend on the floor. NaN with fewer than 2 defined points or no change at all.
    """
    depth, values = list(depth), list(values)
    if len(depth) != len(values):
        raise ValueError(f"depth and values must have the same length, got {len(depth)} and {len(values)}")
    if blocks_only:
        depth, values = depth[1:], values[1:]
    x, c = _finite(depth, values)
    if c.size < 2 or c.max() <= 0:
        return math.nan
    return ols_slope(x, np.log(np.maximum(c, floor * c.max())))


def _defined(values: Values) -> np.ndarray:
    c = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    return c[np.isfinite(c)]


def width(values: Values) -> float:
    """Fraction of layers (None/NaN dropped) whose change is >= half of the maximum change."""
    c = _defined(values)
    if c.size == 0 or c.max() <= 0:
        return math.nan
    return float(np.mean(c >= 0.5 * c.max()))


def width_count(values: Values, threshold: float = WIDTH_THRESHOLD) -> int | None:
    """Number of layers (None/NaN dropped) whose change exceeds `threshold` (strictly); None if none defined."""
    c = _defined(values)
    return int(np.sum(c > threshold)) if c.size else None


def jackknife_interval(
    depth: Values, values: Values, leave_out: np.ndarray, ci: float = 0.95
) -> tuple[list[float] | None, float]:
    """Delete-a-group jackknife of the slope: ([lo, hi] or None, bias-corrected slope).

    leave_out: [G, L+1] the profile recomputed without each of G groups of probe sequences
    (`jackknife_changes`). With theta the full-set slope and theta_g the slope of row g (same layers as
    the point profile; rows not finite there dropped), pseudo-values p_g = G theta - (G-1) theta_g;
    the interval is mean(p) +- t_{G-1, (1+ci)/2} * sd(p) / sqrt(G) and mean(p) the bias-corrected slope.
    None / NaN with fewer than 2 usable groups.
    """
    theta = ols_slope(depth, values)
    loo = replicate_slopes(depth, values, leave_out)
    g = loo.size
    if g < 2 or not math.isfinite(theta):
        return None, math.nan
    pseudo = g * theta - (g - 1) * loo
    center, se = float(pseudo.mean()), float(pseudo.std(ddof=1)) / math.sqrt(g)
    half = float(stats.t.ppf((1 + ci) / 2, g - 1)) * se
    return [center - half, center + half], center


def interval_method(
    metric: str, n_rows: int, dim: int, bootstrap: str = "basic", plugin: str = "jackknife"
) -> tuple[str | None, str | None]:
    """How to give `metric`'s slope an interval, as (method or None, note or None).

    Plug-in metrics (cka_linear, procrustes) with plugin="jackknife": "jackknife" when d <= n/4, else no
    interval (None) and a note saying why; every other metric, or plugin="bootstrap": `bootstrap`.
    n_rows: probe rows (examples, or token rows with pooling=tokens); dim: the widest layer's features.
    """
    if metric not in PLUGIN_METRICS or plugin == "bootstrap":
        return bootstrap, None
    if dim > n_rows / 4:
        return None, (
            f"no interval: {metric} is a plug-in statistic, biased as the feature dimension d nears the "
            f"probe rows n, and d={dim} > n/4={n_rows / 4:g} here, where resampling intervals undercover "
            f"(bench/ci_coverage.py); use cka_debiased or cosine, or >= {4 * dim} probe rows"
        )
    return "jackknife", None


# Where the delete-a-group jackknife stops covering, by the largest change in the profile: procrustes at n=128
# probe rows, d=32 (bench/ci_coverage.py --settings 128x32 --change 1 3 4 5 6, 120 simulations each, MC s.e.
# 0.02): coverage 0.93 / 0.91 / 0.85 / 0.62 / 0.38 with the top layer's distance at 0.21 / 0.89 / 1.11 / 1.26 /
# 1.37 (its bias-corrected slope stays within 5%, but the interval narrows as the distance nears its ceiling
# of 2). cka_linear stays at 0.88-0.91 over the same range (1 - CKA up to 0.83), so it keeps its interval.
JACKKNIFE_MAX_CHANGE = {"procrustes": 0.9}


def large_change_note(metric: str, values: Values) -> str | None:
    """Why `metric`'s jackknife interval is withheld for this profile (its change exceeds where it was shown
    to cover), or None."""
    limit = JACKKNIFE_MAX_CHANGE.get(metric)
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if limit is None or not finite or max(finite) <= limit:
        return None
    return (
        f"no interval: {metric} reaches {max(finite):.2f} here, above {limit:g}, where its jackknife interval "
        "undercovers (bench/ci_coverage.py --change); use cosine, cosine_tokens or cka_debiased"
    )


def replicate_slopes(depth: Values, values: Values, replicates: np.ndarray) -> np.ndarray:
    """OLS slope of every bootstrap replicate row, over the layers where the point profile is defined.

    Replicates that are not finite on all of those layers are dropped.
    """
    x = np.asarray(depth, dtype=np.float64)
    y = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    R = np.asarray(replicates, dtype=np.float64)
    if R.ndim != 2 or R.shape[1] != x.size:
        raise ValueError(f"replicates must be [n_boot, {x.size}] (one column per layer), got shape {R.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    R, x = R[:, keep], x[keep]
    R = R[np.isfinite(R).all(axis=1)]
    xc = x - x.mean() if x.size else x
    if x.size < 2 or float(xc @ xc) <= 0:
        return np.empty(0)
    return (R - R.mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)


def profile_stats(
    depth: Values,
    values: Values,
    replicates: np.ndarray | None = None,
    ci: float = 0.95,
    method: str | None = "percentile",
    *,
    jackknife: np.ndarray | None = None,
    width_threshold: float = WIDTH_THRESHOLD,
    ci_note: str | None = None,
) -> dict:
    """Every statistic of one profile, as plain floats (see the module docstring for definitions):

    {"slope", "slope_ci": [lo, hi] or None, "slope_per_layer", "steepness", "width", "width_count",
     "width_threshold", "slope_jackknife" (bias-corrected, jackknife only, else None), "ci_method" (the method that gave
     slope_ci, or None), "ci_level" (= ci), "ci_note" (why there is no interval, or None)}.

    method: "percentile" / "basic" use `replicates` ([n_boot, L+1] bootstrap values; None or empty: no
    CI); "basic" (2 * slope - q reversed) cancels a shift of the replicates relative to the point value.
    "jackknife" uses `jackknife` ([G, L+1] leave-one-group-out values, `jackknife_changes`). None: no
    interval (give the reason in ci_note). ci: central level in (0, 1).
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci is a central coverage level in (0, 1), e.g. 0.95; got {ci}")
    if method is not None and method not in CI_METHODS:
        raise ValueError(f"method must be one of {CI_METHODS} or None, got {method!r}")
    slope = ols_slope(depth, values)
    slope_ci, slope_jackknife = None, None
    if method == "jackknife":
        if jackknife is None:
            raise ValueError("method='jackknife' needs the leave-one-group-out values (jackknife=...)")
        slope_ci, slope_jackknife = jackknife_interval(depth, values, jackknife, ci)
    elif method is not None and replicates is not None and np.size(replicates):
        slopes = replicate_slopes(depth, values, replicates)
        if slopes.size:
            lo, hi = np.percentile(slopes, [50 * (1 - ci), 50 * (1 + ci)])
            slope_ci = [float(lo), float(hi)] if method == "percentile" else [2 * slope - hi, 2 * slope - lo]
    return {
        "slope": slope,
        "slope_ci": slope_ci,
        "slope_per_layer": slope_per_layer(values),
        "steepness": steepness(depth, values),
        "width": width(values),
        "width_count": width_count(values, width_threshold),
        "width_threshold": width_threshold,
        "slope_jackknife": slope_jackknife,
        "ci_method": method if slope_ci is not None else None,
        "ci_level": ci,
        "ci_note": ci_note if slope_ci is None else None,
    }


def profiles(
    depth: Values,
    changes: Mapping[str, Values | tuple],
    ci: float = 0.95,
    method: str = "percentile",
    width_threshold: float = WIDTH_THRESHOLD,
) -> dict[str, dict]:
    """`profile_stats` for every metric of a dict: values alone, or (values, replicates) such as
    the `LayerChange` tuples returned by `layer_changes` and `token_change`."""
    out = {}
    for metric, change in changes.items():
        values, replicates = change if isinstance(change, tuple) else (change, None)
        out[metric] = profile_stats(
            depth, values, replicates, ci=ci, method=method, width_threshold=width_threshold
        )
    return out

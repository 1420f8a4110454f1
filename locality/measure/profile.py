"""Statistics of a depth profile of change: every definition of slope, steepness and width lives here.

A profile is one change value c_l per layer l = 0..L at normalized depth l/L (0 = embeddings, 1 = last
block). Layers whose value is None or NaN (e.g. weight_rel of the embedding layer when it is not a block)
are dropped from every statistic.

- slope (the locality gradient): OLS slope of c_l against depth. Positive = change concentrates in
  output-proximal layers. Its CI is the percentile interval of the same fit on each bootstrap replicate
  (replicates resample probe examples; see `layer_changes`), e.g. 2.5/97.5 % for ci=0.95, fitted on the
  layers where the point profile is defined; its ends are noisy below ~200 replicates. For the plug-in
  metrics (cka_linear, procrustes) the replicates are shifted towards less change (see `layer_changes`),
  and so is this interval: measured at n=512, d=384, the mean replicate slope was 5% (cka_linear) and
  31% (procrustes) below the point slope, and the 95% interval excluded it. method="basic" reflects the
  quantiles around the point (2 * slope - q), which cancels such a shift to first order; cka_debiased and
  the row-wise metrics have unshifted replicates (+0.3%, +0.1%) and need neither.
- steepness: the log-linear growth rate, OLS slope of ln(c_l) against depth = e-folds of change per unit
  depth (exp(k * depth) has steepness k). It is scale-free, unlike the slope, so it compares the shape of
  metrics with different units. c_l is floored at STEEPNESS_FLOOR * max(c) so a layer with zero change
  is finite (it contributes ln(1e-3) below the maximum, about -6.9).
- width: fraction of layers whose change is at least half the maximum change (1/(L+1) = all change in
  one layer; 1 = spread evenly). NaN when no layer changed (max <= 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

STEEPNESS_FLOOR = 1e-3
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


def steepness(depth: Values, values: Values, floor: float = STEEPNESS_FLOOR) -> float:
    """OLS slope of ln(max(c_l, floor * max c)) against depth: e-folds of change per unit depth."""
    x, c = _finite(depth, values)
    if c.size < 2 or c.max() <= 0:
        return math.nan
    return ols_slope(x, np.log(np.maximum(c, floor * c.max())))


def width(values: Values) -> float:
    """Fraction of layers (None/NaN dropped) whose change is >= half of the maximum change."""
    c = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    c = c[np.isfinite(c)]
    if c.size == 0 or c.max() <= 0:
        return math.nan
    return float(np.mean(c >= 0.5 * c.max()))


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


def profile_stats(depth: Values, values: Values, replicates: np.ndarray | None = None,
                  ci: float = 0.95, method: str = "percentile") -> dict:
    """{"slope", "slope_ci": [lo, hi] or None, "steepness", "width"} of one profile, as plain floats.

    replicates: [n_boot, L+1] bootstrap values (None or empty: no CI). ci: central level in (0, 1).
    method: "percentile" (the quantiles q of the replicate slopes) or "basic" (2 * slope - q reversed),
    which cancels a shift of the replicates relative to the point value (see the module docstring).
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci is a central coverage level in (0, 1), e.g. 0.95; got {ci}")
    if method not in ("percentile", "basic"):
        raise ValueError(f"method must be 'percentile' or 'basic', got {method!r}")
    slope = ols_slope(depth, values)
    slope_ci = None
    if replicates is not None and np.size(replicates):
        slopes = replicate_slopes(depth, values, replicates)
        if slopes.size:
            lo, hi = np.percentile(slopes, [50 * (1 - ci), 50 * (1 + ci)])
            slope_ci = [float(lo), float(hi)] if method == "percentile" else [2 * slope - hi, 2 * slope - lo]
    return {"slope": slope, "slope_ci": slope_ci, "steepness": steepness(depth, values), "width": width(values)}


def profiles(depth: Values, changes: Mapping[str, Values | tuple], ci: float = 0.95,
             method: str = "percentile") -> dict[str, dict]:
    """`profile_stats` for every metric of a dict: values alone, or (values, replicates) such as
    the `LayerChange` tuples returned by `layer_changes`."""
    out = {}
    for metric, change in changes.items():
        values, replicates = change if isinstance(change, tuple) else (change, None)
        out[metric] = profile_stats(depth, values, replicates, ci=ci, method=method)
    return out

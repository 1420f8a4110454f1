"""Measurement of where in depth fine-tuning changes a network: similarity metrics and profile statistics.

Import-light on purpose (torch and numpy only); capture and run-level orchestration live in submodules.
"""

from locality.measure.profile import (
    interval_method,
    jackknife_interval,
    ols_slope,
    profile_stats,
    profiles,
    replicate_slopes,
    slope_per_layer,
    steepness,
    t_quantile,
    width,
    width_count,
)
from locality.measure.similarity import (
    CHANGE_METRICS,
    FEATURE_METRICS,
    MEASURE_METRICS,
    METRICS,
    PLUGIN_METRICS,
    TOKEN_METRICS,
    LayerChange,
    bootstrap_indices,
    cka_matrix,
    cosine_distance,
    euclidean_distance,
    feature_dot,
    jackknife_changes,
    jackknife_groups,
    layer_changes,
    linear_cka,
    norm_ratio,
    procrustes_distance,
    token_change,
    token_cosine_sums,
)

__all__ = [
    "CHANGE_METRICS", "FEATURE_METRICS", "MEASURE_METRICS", "METRICS", "PLUGIN_METRICS", "TOKEN_METRICS",
    "LayerChange", "bootstrap_indices", "cka_matrix", "cosine_distance", "euclidean_distance", "feature_dot",
    "interval_method", "jackknife_changes", "jackknife_groups", "jackknife_interval", "layer_changes",
    "linear_cka", "norm_ratio", "procrustes_distance", "ols_slope", "profile_stats", "profiles",
    "replicate_slopes", "slope_per_layer", "steepness", "t_quantile", "token_change", "token_cosine_sums",
    "width", "width_count",
]

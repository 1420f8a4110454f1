"""Measurement of where in depth fine-tuning changes a network: similarity metrics and profile statistics.

Import-light on purpose (torch and numpy only); capture and run-level orchestration live in submodules.
"""

from locality.measure.profile import ols_slope, profile_stats, profiles, replicate_slopes, steepness, width
from locality.measure.similarity import (
    CHANGE_METRICS,
    FEATURE_METRICS,
    METRICS,
    LayerChange,
    bootstrap_indices,
    cka_matrix,
    cosine_distance,
    euclidean_distance,
    feature_dot,
    layer_changes,
    linear_cka,
    norm_ratio,
    procrustes_distance,
)

__all__ = [
    "CHANGE_METRICS", "FEATURE_METRICS", "METRICS", "LayerChange", "bootstrap_indices", "cka_matrix",
    "cosine_distance", "euclidean_distance", "feature_dot", "layer_changes", "linear_cka", "norm_ratio",
    "procrustes_distance", "ols_slope", "profile_stats", "profiles", "replicate_slopes", "steepness", "width",
]

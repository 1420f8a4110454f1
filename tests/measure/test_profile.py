"""Profile statistics on hand-made profiles, and the slope CI from `layer_changes` replicates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from locality.measure import (
    layer_changes,
    ols_slope,
    profile_stats,
    profiles,
    replicate_slopes,
    steepness,
    width,
)

DEPTH = [i / 6 for i in range(7)]


def test_ols_slope():
    assert ols_slope(DEPTH, [0.3 + 1.7 * x for x in DEPTH]) == pytest.approx(1.7, abs=1e-12)
    assert ols_slope([0, 1, 2, 3], [1, None, 5, float("nan")]) == pytest.approx(2.0, abs=1e-12)
    assert math.isnan(ols_slope([0, 1], [1, None]))
    assert math.isnan(ols_slope([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        ols_slope([0, 1], [1, 2, 3])


def test_profile_stats_of_hand_made_profiles():
    linear = profile_stats(DEPTH, [0.2 + 0.5 * x for x in DEPTH])
    assert linear["slope"] == pytest.approx(0.5, abs=1e-12)
    assert linear["slope_ci"] is None
    assert linear["width"] == pytest.approx(5 / 7)  # layers with c >= 0.35: depth >= 0.3

    assert width([0, 0, 0, 1]) == 0.25
    assert width([1, 1, 1, 1]) == 1.0
    assert math.isnan(width([0, 0, 0]))

    for k in (-2.0, 0.0, 3.0):
        assert steepness(DEPTH, [math.exp(k * x) for x in DEPTH]) == pytest.approx(k, abs=1e-12)
        assert steepness(DEPTH, [4.2 * math.exp(k * x) for x in DEPTH]) == pytest.approx(k, abs=1e-12)
    zero_start = steepness([0, 0.5, 1], [0.0, 0.5, 1.0])  # layer 0 (the embeddings) is not fitted
    assert zero_start == pytest.approx(math.log(2) / 0.5, abs=1e-12)
    zero_block = steepness([0, 0.5, 1], [0.2, 0.0, 1.0])  # a block with zero change: floored at 1e-3 * max
    assert zero_block == pytest.approx(-math.log(1e-3) / 0.5, abs=1e-12)
    old = steepness([0, 0.5, 1], [0.0, 0.5, 1.0], blocks_only=False)  # the former fit, layer 0 floored
    assert old == pytest.approx(-math.log(1e-3), abs=1e-12)


def test_none_layers_are_dropped_everywhere():
    values = [None, 0.1, 0.2, 0.3]  # e.g. weight_rel, undefined for the embedding layer
    depth = [0, 1 / 3, 2 / 3, 1]
    stats = profile_stats(depth, values)
    assert stats["slope"] == pytest.approx(0.3, abs=1e-12)
    assert stats["width"] == pytest.approx(2 / 3)
    assert math.isfinite(stats["steepness"])
    replicates = np.array([[np.nan, 0.1, 0.2, 0.3], [np.nan, 0.2, 0.2, 0.2], [0.0, np.nan, 0.1, 0.1]])
    slopes = replicate_slopes(depth, values, replicates)  # third row: NaN on a used layer, dropped
    np.testing.assert_allclose(slopes, [0.3, 0.0], atol=1e-12)


def test_slope_ci_is_the_percentile_interval_of_replicate_slopes():
    rng = np.random.default_rng(0)
    values = np.array([0.1 + 0.4 * x for x in DEPTH])
    replicates = values + rng.normal(0, 0.05, (500, 7))
    stats = profile_stats(DEPTH, values, replicates, ci=0.9)
    xc = np.array(DEPTH) - np.mean(DEPTH)
    slopes = (replicates - replicates.mean(1, keepdims=True)) @ xc / (xc @ xc)
    np.testing.assert_allclose(stats["slope_ci"], np.percentile(slopes, [5, 95]), atol=1e-12)
    assert stats["slope_ci"][0] < 0.4 < stats["slope_ci"][1]
    assert profile_stats(DEPTH, values, np.empty((0, 7)))["slope_ci"] is None
    shifted = profile_stats(DEPTH, values, replicates - 0.3 * np.array(DEPTH), ci=0.9, method="basic")
    lo, hi = np.percentile(slopes - 0.3, [5, 95])
    np.testing.assert_allclose(shifted["slope_ci"], [0.8 - hi, 0.8 - lo], atol=1e-12)
    assert shifted["slope_ci"][0] > 0.6  # replicate slopes ~0.1, 0.3 below the point 0.4: ~0.7
    with pytest.raises(ValueError, match="ci"):
        profile_stats(DEPTH, values, replicates, ci=95)
    with pytest.raises(ValueError, match="one column per layer"):
        profile_stats(DEPTH, values, replicates[:, :6])


def test_bootstrap_ci_of_a_clean_linear_profile_contains_the_slope():
    g = torch.Generator().manual_seed(0)
    n, d, n_layers = 120, 16, 7
    pre = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(n_layers)]
    direction = torch.randn(n, d, generator=g, dtype=torch.float64)
    post = [
        x + (0.2 + 0.8 * i / 6) * direction for i, x in enumerate(pre)
    ]  # euclidean change linear in depth
    changes = layer_changes(pre, post, metrics=["euclidean", "cosine", "cka_debiased"], n_boot=200, seed=1)
    stats = profiles(DEPTH, changes, ci=0.95)
    euclid = stats["euclidean"]
    assert euclid["slope"] == pytest.approx(
        0.8 * torch.linalg.norm(direction, dim=1).mean().item(), rel=1e-10
    )
    for metric, s in stats.items():
        lo, hi = s["slope_ci"]
        assert lo < s["slope"] < hi, metric
        assert s["slope"] > 0 and lo > 0, metric
    assert set(stats["cosine"]) == {
        "slope",
        "slope_ci",
        "slope_per_layer",
        "steepness",
        "width",
        "width_count",
        "width_threshold",
        "slope_jackknife",
        "ci_method",
        "ci_level",
        "ci_note",
    }
    assert stats["cosine"]["ci_method"] == "percentile" and stats["cosine"]["ci_level"] == 0.95
    plain = profiles(DEPTH, {"cosine": changes["cosine"].values})
    assert plain["cosine"]["slope_ci"] is None
    assert plain["cosine"]["slope"] == stats["cosine"]["slope"]


def test_procrustes_gets_no_jackknife_interval_where_its_change_is_large():
    from locality.measure.profile import JACKKNIFE_MAX_CHANGE, large_change_note

    assert JACKKNIFE_MAX_CHANGE == {"procrustes": 0.9}  # bench/ci_coverage.py --change: 0.91 covered at 0.89
    assert large_change_note("procrustes", [0.0, 0.3, 0.89]) is None
    note = large_change_note("procrustes", [0.0, None, 0.5, 1.1])
    assert note.startswith("no interval: procrustes reaches 1.10 here, above 0.9")
    assert large_change_note("cka_linear", [0.0, 0.5, 0.83]) is None  # it still covers there

"""Similarity metrics against Kornblith's reference values and a plain numpy port, their invariants, and the
fast bootstrap of `layer_changes` against recomputing each metric on the resampled rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from locality.measure import (
    CHANGE_METRICS,
    METRICS,
    bootstrap_indices,
    cka_matrix,
    cosine_distance,
    euclidean_distance,
    feature_dot,
    feature_norm,
    layer_changes,
    linear_cka,
    norm_ratio,
    procrustes_distance,
)

# ------------------------------------------------------- plain float64 numpy reference (Kornblith's Demo.ipynb)


def ref_center_gram(gram: np.ndarray, unbiased: bool = False) -> np.ndarray:
    gram = gram.astype(np.float64, copy=True)
    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def ref_cka_gram(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    gx, gy = ref_center_gram(x @ x.T, debiased), ref_center_gram(y @ y.T, debiased)
    return float(gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy)))


def ref_cka_features(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    xy, xx, yy = np.linalg.norm(x.T @ y) ** 2, np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    if not debiased:
        return float(xy / (xx * yy))
    n = x.shape[0]
    rx, ry = (x * x).sum(1), (y * y).sum(1)

    def helper(xty, a, b):
        return xty - n / (n - 2) * a @ b + a.sum() * b.sum() / ((n - 1) * (n - 2))

    return float(helper(xy, rx, ry) / np.sqrt(helper(xx**2, rx, rx) * helper(yy**2, ry, ry)))


def ref_procrustes(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    return float(2 - 2 * np.linalg.svd(x.T @ y, compute_uv=False).sum())


def golden() -> tuple[np.ndarray, np.ndarray]:
    np.random.seed(1337)
    X = np.random.randn(100, 10)
    Y = X + np.random.randn(100, 10)
    return X, Y


def orthogonal(d: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]


# ----------------------------------------------------------------------------------------------- CKA values


def test_kornblith_golden_values():
    X, Y = golden()
    assert linear_cka(X, Y) == pytest.approx(0.55761, abs=1e-5)
    assert linear_cka(X, Y, debiased=True) == pytest.approx(0.51346, abs=1e-5)
    assert linear_cka(torch.tensor(X), torch.tensor(Y)) == pytest.approx(linear_cka(X, Y), abs=1e-14)


@pytest.mark.parametrize("n,p,q", [(100, 10, 12), (40, 90, 70)])  # feature-space and Gram-space paths
@pytest.mark.parametrize("debiased", [False, True])
def test_agrees_with_numpy_reference_in_both_forms(n, p, q, debiased):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, p))
    Y = X @ rng.standard_normal((p, q)) + 2 * rng.standard_normal((n, q))
    ours = linear_cka(X, Y, debiased=debiased)
    assert ours == pytest.approx(ref_cka_gram(X, Y, debiased), abs=1e-12)
    assert ours == pytest.approx(ref_cka_features(X, Y, debiased), abs=1e-12)


@pytest.mark.parametrize("shape", [(80, 16), (20, 64)])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariants(shape, debiased):
    rng = np.random.default_rng(1)
    X = rng.standard_normal(shape) + 3.0
    Y = np.tanh(X @ rng.standard_normal((shape[1], shape[1]))) + rng.standard_normal(shape)
    value = linear_cka(X, Y, debiased)
    assert linear_cka(X, X, debiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(Y, X, debiased) == pytest.approx(value, abs=1e-12)
    Q = orthogonal(shape[1], 2)
    assert linear_cka(X @ Q, Y, debiased) == pytest.approx(value, abs=1e-12)
    assert linear_cka(X, 7.5 * Y - 4.0, debiased) == pytest.approx(value, abs=1e-12)
    assert linear_cka(X, Y @ Q * 1e-3, debiased) == pytest.approx(value, abs=1e-12)
    assert linear_cka(X * 1e-12, Y * 1e9, debiased) == pytest.approx(value, abs=1e-12)


def test_debiased_cka_is_near_zero_for_independent_features_where_biased_is_inflated():
    biased, debiased = [], []  # one draw of debiased CKA at n=32 has sd ~0.045: average 20 (se ~0.01)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        X, Y = torch.randn(32, 768, generator=g), torch.randn(32, 768, generator=g)
        biased.append(linear_cka(X, Y))
        debiased.append(linear_cka(X, Y, debiased=True))
    assert np.mean(biased) == pytest.approx(0.96, abs=0.02)
    assert abs(np.mean(debiased)) < 0.04


@pytest.mark.parametrize("shape", [(1000, 64), (64, 256)])
def test_large_offset_in_float32_input_does_not_change_cka(shape):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(*shape, generator=g)
    Y = 0.5 * X + torch.randn(*shape, generator=g)
    for debiased in (False, True):
        clean = linear_cka(X, Y, debiased)
        shifted = linear_cka(X + 1000.0, Y + 1000.0, debiased)  # float32 tensors, rounded at ~6e-5
        assert shifted == pytest.approx(clean, abs=1e-5)


def test_half_precision_inputs_are_upcast_not_computed_in_half():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(64, 32, generator=g)
    Y = X + torch.randn(64, 32, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        x, y = X.to(dtype), Y.to(dtype)
        assert linear_cka(x, y) == pytest.approx(
            ref_cka_gram(x.double().numpy(), y.double().numpy()), abs=1e-12
        )
        assert procrustes_distance(x, y) == pytest.approx(
            ref_procrustes(x.double().numpy(), y.double().numpy()), abs=1e-12
        )


def test_undefined_cka_is_nan_not_an_error():
    X = np.random.default_rng(0).standard_normal((10, 3))
    constant = np.ones((10, 3))
    assert math.isnan(linear_cka(X, constant))
    assert math.isnan(linear_cka(X, constant, debiased=True))
    assert math.isnan(procrustes_distance(X, constant))


def test_shape_validation():
    X = np.zeros((10, 4))
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(X, np.zeros((9, 4)))
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(np.zeros(10), X)
    with pytest.raises(ValueError, match="same shape"):
        cosine_distance(X, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(X[:3], X[:3], debiased=True)


# ------------------------------------------------------------------------------ other metrics


def test_procrustes_distance():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((50, 8))
    assert procrustes_distance(X, 3 * X @ orthogonal(8, 6) + 1) == pytest.approx(0, abs=1e-10)
    assert procrustes_distance(X, -X) == pytest.approx(0, abs=1e-10)
    for shape_y in [
        (50, 8),
        (50, 5),
        (50, 120),
    ]:  # p != q is the zero-padded problem; q > n uses QR reduction
        Y = rng.standard_normal(shape_y)
        value = procrustes_distance(X, Y)
        assert 0 <= value <= 2
        assert value == pytest.approx(ref_procrustes(X, Y), abs=1e-12)
    assert procrustes_distance(X * 1e-12, Y[:, :8] * 1e9) == pytest.approx(
        ref_procrustes(X, Y[:, :8]), abs=1e-12
    )
    W = rng.standard_normal((20, 200))  # n < p and n < q
    Z = W + rng.standard_normal((20, 150)) @ rng.standard_normal((150, 200)) / 10
    assert procrustes_distance(W, Z) == pytest.approx(ref_procrustes(W, Z), abs=1e-12)


def test_row_wise_metrics():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((30, 6))
    Y = rng.standard_normal((30, 6))
    assert cosine_distance(X, X) == pytest.approx(0, abs=1e-15)
    assert cosine_distance(X, -2 * X) == pytest.approx(2, abs=1e-15)
    cos = (X * Y).sum(1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(Y, axis=1))
    assert cosine_distance(X, Y) == pytest.approx(np.mean(1 - cos), abs=1e-14)
    assert euclidean_distance(X, Y) == pytest.approx(np.linalg.norm(X - Y, axis=1).mean(), abs=1e-14)
    assert feature_dot(X, Y) == pytest.approx((X * Y).sum(1).mean(), abs=1e-14)
    assert norm_ratio(X, 2.5 * X) == pytest.approx(2.5, abs=1e-14)
    assert cosine_distance(np.zeros((2, 3)), np.zeros((2, 3))) == 0.0
    assert cosine_distance(X * 1e-100, Y) == pytest.approx(cosine_distance(X, Y), abs=1e-14)


def test_cka_matrix():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(40, 12, generator=g)
    wide = [
        base @ torch.randn(12, 60, generator=g) + torch.randn(40, 60, generator=g) * s for s in (0.1, 1, 3)
    ]
    narrow = [base + torch.randn(40, 12, generator=g) * s for s in (0.1, 1)]
    for feats in (wide, narrow):  # n <= d: Gram-space path; n > d: feature-space path
        for debiased in (False, True):
            M = cka_matrix(feats, debiased=debiased)
            assert M.shape == (len(feats), len(feats)) and M.dtype == torch.float64
            assert torch.allclose(M.diagonal(), torch.ones(len(feats), dtype=torch.float64), atol=1e-12)
            assert torch.allclose(M, M.T, atol=1e-14)
            assert float(M[0, -1]) == pytest.approx(linear_cka(feats[0], feats[-1], debiased), abs=1e-12)
    cross = cka_matrix(wide, narrow)
    assert cross.shape == (3, 2)
    assert float(cross[2, 1]) == pytest.approx(linear_cka(wide[2], narrow[1]), abs=1e-12)


# ------------------------------------------------------------------------------- layer_changes bootstrap


def _layers(
    n: int, d: int, n_layers: int = 3, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pre = [torch.randn(n, d, generator=g) + 2 for _ in range(n_layers)]
    post = [x + 0.3 * (i + 1) * torch.randn(n, d, generator=g) for i, x in enumerate(pre)]
    return pre, post


def _naive(metric: str, X: torch.Tensor, Y: torch.Tensor, rows: torch.Tensor) -> float:
    """The documented replicate value, recomputed from the resampled rows."""
    X, Y = X.double(), Y.double()
    if metric == "cka_debiased":
        # U-statistic on the resampled Gram matrix of full-set centered features, with the diagonal and
        # every pair of copies of the same example zeroed
        Xc, Yc = (X - X.mean(0))[rows], (Y - Y.mean(0))[rows]
        K, L = Xc @ Xc.T, Yc @ Yc.T
        same = rows[:, None] == rows[None, :]
        K[same], L[same] = 0, 0
        m = len(rows)

        def hsic(A, B):
            return (A * B).sum() + A.sum() * B.sum() / ((m - 1) * (m - 2)) - 2 / (m - 2) * A.sum(1) @ B.sum(1)

        return 1 - float(hsic(K, L) / (hsic(K, K) * hsic(L, L)).sqrt())
    fn = {
        "cosine": cosine_distance,
        "euclidean": euclidean_distance,
        "procrustes": procrustes_distance,
        "cka_linear": lambda a, b: 1 - linear_cka(a, b),
        "dot": feature_dot,
        "norm": feature_norm,
        "norm_ratio": norm_ratio,
    }[metric]
    return fn(X[rows], Y[rows])


@pytest.mark.parametrize("n,d", [(48, 16), (24, 40)])
def test_fast_bootstrap_equals_recomputing_on_resampled_rows(n, d):
    pre, post = _layers(n, d)
    out = layer_changes(pre, post, metrics=METRICS, n_boot=6, seed=11)
    indices = bootstrap_indices(n, 6, 11)
    for metric in METRICS:
        for b in range(3):
            for layer in range(3):
                expected = _naive(metric, pre[layer], post[layer], indices[b])
                assert out[metric].replicates[b, layer] == pytest.approx(expected, abs=1e-10), (
                    metric,
                    b,
                    layer,
                )


def test_procrustes_bootstrap_with_rank_deficient_features_and_duplicate_examples():
    # the Gram-side Cholesky fails on these (rank 5 < drawn rows; two identical examples), so replicates
    # take the feature-side path; both must agree with recomputing on the rows
    g = torch.Generator().manual_seed(12)
    low_rank = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 50, generator=g, dtype=torch.float64
    )
    dup = torch.randn(30, 50, generator=g, dtype=torch.float64)
    dup[1] = dup[0]
    pre = [low_rank, dup]
    post = [x + 0.5 * torch.randn(30, 50, generator=g, dtype=torch.float64) for x in pre]
    out = layer_changes(pre, post, metrics=["procrustes"], n_boot=8, seed=4)
    indices = bootstrap_indices(30, 8, 4)
    for b in range(8):
        for layer in range(2):
            expected = _naive("procrustes", pre[layer], post[layer], indices[b])
            assert out["procrustes"].replicates[b, layer] == pytest.approx(expected, abs=1e-10), (b, layer)


def test_layer_changes_shapes_points_and_determinism():
    pre, post = _layers(40, 8, n_layers=4)
    out = layer_changes(pre, post, metrics=METRICS, n_boot=30, seed=2, n_boot_procrustes=10)
    assert set(out) == set(METRICS)
    for metric, (values, replicates) in out.items():
        assert len(values) == 4 and all(isinstance(v, float) for v in values)
        assert replicates.shape == ((10, 4) if metric == "procrustes" else (30, 4))
        assert replicates.dtype == np.float64 and np.isfinite(replicates).all()
    assert out["cosine"].values[2] == pytest.approx(cosine_distance(pre[2], post[2]), abs=1e-14)
    assert out["cka_linear"].values[1] == pytest.approx(1 - linear_cka(pre[1], post[1]), abs=1e-14)
    assert out["cka_debiased"].values[3] == pytest.approx(1 - linear_cka(pre[3], post[3], True), abs=1e-14)
    assert out["procrustes"].values[0] == pytest.approx(procrustes_distance(pre[0], post[0]), abs=1e-14)
    again = layer_changes(
        pre, post, metrics=["procrustes", "cosine"], n_boot=30, seed=2, n_boot_procrustes=10
    )
    np.testing.assert_array_equal(again["procrustes"].replicates, out["procrustes"].replicates)
    np.testing.assert_array_equal(again["cosine"].replicates, out["cosine"].replicates)
    other = layer_changes(pre, post, metrics=["cosine"], n_boot=30, seed=3)
    assert not np.array_equal(other["cosine"].replicates, out["cosine"].replicates)
    none = layer_changes(pre, post, metrics=CHANGE_METRICS, n_boot=0)
    assert none["cka_linear"].replicates.shape == (0, 4)
    assert none["cka_linear"].values == out["cka_linear"].values


def test_replicates_center_on_the_point_values():
    pre, post = _layers(200, 24, n_layers=3, seed=5)
    out = layer_changes(
        pre,
        post,
        metrics=["cosine", "euclidean", "cka_debiased", "cka_linear", "procrustes"],
        n_boot=200,
        seed=0,
        n_boot_procrustes=40,
    )
    for metric, (values, replicates) in out.items():
        shift = replicates.mean(0) - values
        if metric in ("cka_linear", "procrustes"):
            # documented: replicates of these plug-in statistics shift towards similarity (copies of an
            # example add diagonal-like mass), by about the estimator's own finite-sample bias
            assert np.all(shift < 0) and np.all(np.abs(shift) < 0.15 * np.asarray(values)), shift
        else:
            assert np.all(np.abs(shift) < 0.5 * replicates.std(0) + 1e-3), metric


def test_debiased_replicates_exclude_duplicate_pairs():
    # independent features, n < d: debiased CKA ~ 0, biased ~ 0.75. Counting copies of one example as
    # distinct rows would push the replicates up to about the biased value.
    g = torch.Generator().manual_seed(9)
    X, Y = torch.randn(100, 300, generator=g), torch.randn(100, 300, generator=g)
    out = layer_changes([X], [Y], metrics=["cka_debiased"], n_boot=100, seed=0)
    assert out["cka_debiased"].values[0] == pytest.approx(1.0, abs=0.02)
    assert np.mean(out["cka_debiased"].replicates) == pytest.approx(1.0, abs=0.02)


def test_groups_resample_whole_groups():
    pre, post = _layers(30, 6, n_layers=2, seed=6)
    groups = np.repeat(np.arange(10), 3)  # e.g. 3 token positions per probe sequence
    plain = layer_changes(pre, post, metrics=METRICS, n_boot=5, seed=1)
    singletons = layer_changes(pre, post, metrics=METRICS, n_boot=5, seed=1, groups=np.arange(30))
    grouped = layer_changes(pre, post, metrics=METRICS, n_boot=5, seed=1, groups=groups)
    drawn = bootstrap_indices(10, 5, 1)
    for metric in METRICS:
        np.testing.assert_allclose(singletons[metric].replicates, plain[metric].replicates, atol=1e-12)
        np.testing.assert_allclose(grouped[metric].values, plain[metric].values, atol=1e-14)
        for b in range(2):
            rows = (3 * drawn[b][:, None] + torch.arange(3)).reshape(-1)
            expected = _naive(metric, pre[1], post[1], rows)
            assert grouped[metric].replicates[b, 1] == pytest.approx(expected, abs=1e-10), metric


def test_layer_changes_validation_and_thread_count():
    pre, post = _layers(20, 4)
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="unknown metric"):
        layer_changes(pre, post, metrics=["cka"])
    with pytest.raises(ValueError, match="same probe examples"):
        layer_changes(pre, [post[0], post[1][:10], post[2]], n_boot=2)
    with pytest.raises(ValueError, match="same number"):
        layer_changes(pre, post[:2])
    layer_changes(pre, post, n_boot=2)
    assert torch.get_num_threads() == threads

"""Similarity between paired feature matrices, and per-layer change with a bootstrap over probe examples.

The numerical core of measurement. Every function takes row-paired features X [n, p] and Y [n, q]
(torch tensors of any float dtype, fp16/bf16 included, or numpy arrays; row i of X and of Y describe the
same probe example) and computes in float64 after centering the columns, before any Gram or
cross-covariance matrix is formed. `layer_changes` is what a training run calls: it turns per-layer
features before and after fine-tuning into a depth profile of change with bootstrap replicates.
`token_change` does the same for `cosine_tokens` (the paper's measure: 1 - cos over every non-pad token)
from per-sequence sums, with the same bootstrap draws; `jackknife_changes` gives the leave-one-group-out
values of the plug-in metrics (cka_linear, procrustes) for their bias-corrected jackknife interval.

Conventions: CKA functions return similarities (1 = identical up to rotation and scale); the "change"
metrics in `layer_changes` are oriented so that larger = more change. Undefined values (a layer with
zero variance, a negative self-HSIC from the debiased estimator at tiny n) are NaN, never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch

from locality.core.metric_names import (  # noqa: F401 -- re-exported: the measure API's names
    CHANGE_METRICS,
    FEATURE_METRICS,
    MEASURE_METRICS,
    METRICS,
    TOKEN_METRICS,
)

Features = torch.Tensor | np.ndarray

PLUGIN_METRICS = ("cka_linear", "procrustes")  # plug-in statistics biased by O(d/n): jackknife intervals
_ROWWISE = ("cosine", "euclidean", "dot", "norm", "norm_ratio")
# Ren et al. 2023's feature adaptation, per layer (`feature_adaptation`): ||z_T - z_0||, 1 - cos, <z_0, z_T>,
# ||z_T||, and ||z_T|| / ||z_0||
FEATURE_ADAPTATION = ("euclidean", "cosine", "dot", "norm", "norm_ratio")
_EPS = torch.finfo(torch.float64).eps
_TINY = torch.finfo(torch.float64).tiny  # safe denominators: features may be tiny, never clamp them to eps
_LAYER_MEMORY = 4 * 2**30  # bytes of float64 [n, n] work matrices that parallel layers may hold at once


# ----------------------------------------------------------------------------------------- input handling


def _f64(x: Features, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [n_examples, n_features] matrix, got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def _pair(X: Features, Y: Features, min_rows: int = 1, same_shape: bool = False) -> tuple[torch.Tensor, ...]:
    X, Y = _f64(X, "X"), _f64(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of rows (paired examples): got {X.shape[0]} and "
            f"{Y.shape[0]}. Capture both with the same probe set, in the same order."
        )
    if same_shape and X.shape != Y.shape:
        raise ValueError(
            f"X and Y must have the same shape for a row-wise metric: got {tuple(X.shape)} and "
            f"{tuple(Y.shape)}"
        )
    if X.shape[0] < min_rows:
        raise ValueError(f"this metric needs at least {min_rows} examples (rows), got {X.shape[0]}")
    return X, Y.to(X.device)


def _center(X: torch.Tensor) -> torch.Tensor:
    return X - X.mean(dim=0, keepdim=True)


def _ratio(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """xy / sqrt(xx * yy), NaN where a self term is not positive (never the sqrt of a negative)."""
    ok = (xx > 0) & (yy > 0)
    return torch.where(ok, xy / (xx.clamp(min=_TINY).sqrt() * yy.clamp(min=_TINY).sqrt()), torch.nan)


# ------------------------------------------------------------------------------------------- linear CKA


def _debiased_dot(xty: torch.Tensor, rows_x: torch.Tensor, rows_y: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012), times n(n-3), from feature-space terms of centered features.

    Kornblith's `_debiased_dot_product_similarity_helper`: ||X^T Y||_F^2 minus the diagonal terms of
    the Gram matrices (rows_x = squared row norms), which the U-statistic excludes.
    """
    return xty - n / (n - 2) * (rows_x @ rows_y) + rows_x.sum() * rows_y.sum() / ((n - 1) * (n - 2))


def _cka_features(X: torch.Tensor, Y: torch.Tensor, debiased: bool) -> torch.Tensor:
    """Linear CKA from d x d products of centered X, Y: the cheap form when n > d."""
    xy, xx, yy = (Y.T @ X).square().sum(), (X.T @ X).square().sum(), (Y.T @ Y).square().sum()
    if debiased:
        n = X.shape[0]
        rx, ry = X.square().sum(1), Y.square().sum(1)
        xy, xx, yy = _debiased_dot(xy, rx, ry, n), _debiased_dot(xx, rx, rx, n), _debiased_dot(yy, ry, ry, n)
    return _ratio(xy, xx, yy)


def _u_center(K: torch.Tensor) -> torch.Tensor:
    """Székely-Rizzo U-centering of a Gram matrix: <U(K), U(L)>_F = n(n-3) * unbiased HSIC(K, L)."""
    n = K.shape[0]
    K = K.clone()
    K.fill_diagonal_(0)
    means = K.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    K = K - means[:, None] - means[None, :]
    K.fill_diagonal_(0)
    return K


def _gram_vector(X: torch.Tensor, debiased: bool) -> torch.Tensor:
    """The flattened (U-)centered Gram matrix of centered X: CKA is the cosine between two of these."""
    K = X @ X.T
    return (_u_center(K) if debiased else K).reshape(-1)


def linear_cka(X: Features, Y: Features, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) between X [n, p] and Y [n, q]; debiased = unbiased-HSIC form.

    Uses d x d feature-space products when n > max(p, q), else n x n Gram matrices (same value).
    Debiased CKA (Song et al. 2012 HSIC; Nguyen et al. 2021) is ~0 for independent features even when
    n << d, where the biased form is inflated (about 0.96 for independent Gaussians at n=32, d=768).
    """
    X, Y = _pair(X, Y, min_rows=4 if debiased else 2)
    X, Y = _center(X), _center(Y)
    if X.shape[0] > max(X.shape[1], Y.shape[1]):
        return float(_cka_features(X, Y, debiased))
    gx, gy = _gram_vector(X, debiased), _gram_vector(Y, debiased)
    return float(_ratio(gx @ gy, gx @ gx, gy @ gy))


def cka_matrix(
    feats_a: Sequence[Features], feats_b: Sequence[Features] | None = None, debiased: bool = False
) -> torch.Tensor:
    """[La, Lb] linear CKA between every pair of layers (Phang et al. 2021), float64 on the CPU.

    With feats_b None the matrix is within one model: symmetric, diagonal 1. All layers need the same
    rows (examples); widths may differ. Each layer's centered n x n Gram matrix is formed once and reused
    for every pair (cheaper than per-pair d x d products even when n > d) unless all of them together
    would exceed 1 GiB; then pairs use the feature-space form.
    """
    A = [_center(_f64(f, f"feats_a[{i}]")) for i, f in enumerate(feats_a)]
    B = A if feats_b is None else [_center(_f64(f, f"feats_b[{i}]")) for i, f in enumerate(feats_b)]
    if not A or not B:
        raise ValueError("cka_matrix needs at least one layer on each side")
    n = A[0].shape[0]
    if any(f.shape[0] != n for f in A + B):
        raise ValueError(f"every layer must have the same rows (examples): got {[f.shape[0] for f in A + B]}")
    if n < (4 if debiased else 2):
        raise ValueError(f"cka_matrix needs at least {4 if debiased else 2} examples, got {n}")
    device = A[0].device
    B = [f.to(device) for f in B]
    if (len(A) + (len(B) if feats_b is not None else 0)) * n * n * 8 <= 2**30:
        ga = torch.stack([_gram_vector(f, debiased) for f in A])
        gb = ga if feats_b is None else torch.stack([_gram_vector(f, debiased) for f in B])
        out = _ratio(ga @ gb.T, (ga * ga).sum(1)[:, None], (gb * gb).sum(1)[None, :])
    else:
        out = torch.empty(len(A), len(B), dtype=torch.float64, device=device)
        for i, x in enumerate(A):
            for j, y in enumerate(B):
                if feats_b is None and j < i:
                    out[i, j] = out[j, i]
                else:
                    out[i, j] = _cka_features(x, y, debiased)
    return out.cpu()


# ------------------------------------------------------------------------------ row-wise feature metrics


def _rowwise(metric: str, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Per-example values [n] of a row-wise metric; NaN where undefined (norm_ratio of a zero row)."""
    if metric == "euclidean":
        return (Y - X).norm(dim=1)
    if metric == "dot":
        return (X * Y).sum(1)
    nx, ny = X.norm(dim=1), Y.norm(dim=1)
    if metric == "norm":
        return ny
    if metric == "norm_ratio":
        return torch.where(nx > 0, ny / nx.clamp(min=_TINY), torch.nan)
    if metric == "cosine":
        both = nx * ny
        cos = torch.where(both > 0, (X * Y).sum(1) / both.clamp(min=_TINY), (nx == ny).double())
        return (1 - cos).clamp(0, 2)
    raise ValueError(f"unknown row-wise metric {metric!r}")


def _nanmean(v: torch.Tensor) -> float:
    ok = v.isfinite()
    return float(v[ok].mean()) if ok.any() else math.nan


def cosine_distance(X: Features, Y: Features) -> float:
    """Mean over rows of 1 - cos(x_i, y_i), in [0, 2]. Two zero rows count as identical (distance 0)."""
    return _nanmean(_rowwise("cosine", *_pair(X, Y, same_shape=True)))


def euclidean_distance(X: Features, Y: Features) -> float:
    """Mean over rows of ||x_i - y_i||_2 (the feature-change metric of Ren et al. 2023)."""
    return _nanmean(_rowwise("euclidean", *_pair(X, Y, same_shape=True)))


def feature_dot(X: Features, Y: Features) -> float:
    """Mean over rows of <x_i, y_i> (Ren et al. 2023)."""
    return _nanmean(_rowwise("dot", *_pair(X, Y, same_shape=True)))


def feature_norm(X: Features, Y: Features) -> float:
    """Mean over rows of ||y_i||, the final feature norm ||z_T|| with Y = after (Ren et al. 2023); X only pairs."""
    return _nanmean(_rowwise("norm", *_pair(X, Y, same_shape=True)))


def feature_adaptation(pre: Sequence[Features], post: Sequence[Features]) -> dict[str, list[float]]:
    """Ren et al. 2023's feature-adaptation metrics per layer, means over probe examples (point estimates):
    {"euclidean": ||z_T - z_0||, "cosine": 1 - cos(z_0, z_T), "dot": <z_0, z_T>, "norm": ||z_T||,
    "norm_ratio": ||z_T|| / ||z_0||}; pre / post: per-layer [n, d] features before / after fine-tuning."""
    if len(pre) != len(post):
        raise ValueError(f"pre and post must have the same layers, got {len(pre)} and {len(post)}")
    pairs = [_pair(x, y, same_shape=True) for x, y in zip(pre, post, strict=True)]
    return {m: [_nanmean(_rowwise(m, x, y)) for x, y in pairs] for m in FEATURE_ADAPTATION}


def norm_ratio(X: Features, Y: Features) -> float:
    """Mean over rows of ||y_i|| / ||x_i|| with X = before, Y = after (Ren et al. 2023); zero x_i skipped."""
    return _nanmean(_rowwise("norm_ratio", *_pair(X, Y, same_shape=True)))


# ------------------------------------------------------------------------------- orthogonal Procrustes


def _row_space_factor(X: torch.Tensor) -> torch.Tensor:
    """An [n, min(n, p)] matrix with the same Gram matrix and row pairing as X [n, p].

    For p > n, X = R^T Q^T (QR of X^T), so X^T Y = Q (R Y) has the singular values of R Y: every
    Procrustes quantity can be computed with at most n columns.
    """
    n, p = X.shape
    return torch.linalg.qr(X.T, mode="r").R.T if p > n else X


def procrustes_distance(X: Features, Y: Features) -> float:
    """Orthogonal Procrustes distance on centered, Frobenius-normalized features, in [0, 2].

    min_Q ||X~ - Y~ Q||_F^2 over orthogonal Q = 2 - 2 ||X~^T Y~||_* (nuclear norm). p != q is the
    zero-padded problem (padding does not change singular values). Clamped to [0, 2] against roundoff;
    NaN if either side has zero variance.
    """
    X, Y = _pair(X, Y, min_rows=2)
    X, Y = _center(X), _center(Y)
    nx, ny = X.norm(), Y.norm()
    if not (nx > 0 and ny > 0):
        return math.nan
    nuclear = torch.linalg.svdvals(_row_space_factor(X).T @ _row_space_factor(Y)).sum() / (nx * ny)
    return float((2 - 2 * nuclear).clamp(0, 2))


# ------------------------------------------------------------------------------- bootstrap machinery


class LayerChange(NamedTuple):
    """One metric's depth profile: point values per layer and bootstrap replicates [n_boot, L+1]."""

    values: list[float]
    replicates: np.ndarray


def bootstrap_indices(n_units: int, n_boot: int, seed: int) -> torch.Tensor:
    """[n_boot, n_units] indices drawn with replacement; replicate b resamples units indices[b]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_units, (n_boot, n_units), generator=generator)


def _draw_counts(indices: torch.Tensor, n_units: int) -> torch.Tensor:
    """counts[b, u] = how often unit u was drawn in replicate b (float64)."""
    counts = torch.zeros(indices.shape[0], n_units, dtype=torch.float64)
    return counts.scatter_add_(1, indices, torch.ones_like(indices, dtype=torch.float64))


def jackknife_groups(n_units: int, n_groups: int, seed: int) -> torch.Tensor:
    """Group id 0..G-1 of every unit, G = min(n_groups, n_units): a seeded shuffle dealt round-robin, so
    group sizes differ by at most one and no group follows the probe set's order."""
    if n_groups < 2 or n_units < 2:
        raise ValueError(
            f"a jackknife needs at least 2 groups of at least 2 units, got {n_groups} and {n_units}"
        )
    order = torch.randperm(n_units, generator=torch.Generator().manual_seed(seed))
    group = torch.empty(n_units, dtype=torch.long)
    group[order] = torch.arange(n_units) % min(n_groups, n_units)
    return group


def _leave_one_out_counts(group: torch.Tensor) -> torch.Tensor:
    """[G, n_units] 0/1 weights: row g keeps every unit outside group g."""
    n_groups = int(group.max()) + 1
    return (group[None, :] != torch.arange(n_groups)[:, None]).double()


class _Resample:
    """Bootstrap replicates as count vectors, so a statistic of resampled rows is an algebraic function
    of the counts and of matrices computed once on the original rows.

    Units (probe examples) are resampled; rows belong to units via `unit_of_row` (one row per unit
    unless token-level rows are grouped). counts[b, u] = times unit u was drawn in replicate b (the
    jackknife's leave-one-group-out resamples are 0/1 counts), and rows[b, i] = counts of row i's unit.
    """

    def __init__(self, counts: torch.Tensor, unit_of_row: torch.Tensor, device: str | torch.device):
        n_units = counts.shape[1]
        self.unit_of_row = unit_of_row.to(device)
        self.counts = counts.to(device)
        self.rows = self.counts[:, self.unit_of_row]
        self.n = self.rows.sum(1)  # rows per replicate
        self.grouped = n_units != unit_of_row.numel()

    @classmethod
    def draws(cls, indices: torch.Tensor, unit_of_row: torch.Tensor, device: str | torch.device) -> _Resample:
        """From drawn unit indices [n_boot, n_units] (`bootstrap_indices`)."""
        return cls(_draw_counts(indices, int(unit_of_row.max()) + 1), unit_of_row, device)

    def _sum_by_unit(self, A: torch.Tensor) -> torch.Tensor:
        """Sum the rows of A [n, m] that belong to the same unit: [n_units, m]."""
        if not self.grouped:
            return A
        out = A.new_zeros(self.counts.shape[1], A.shape[1])
        return out.index_add_(0, self.unit_of_row, A)

    def times(self, K: torch.Tensor) -> torch.Tensor:
        """rows @ K for symmetric K [n, n]: replicate b's row sums of the resampled Gram matrix."""
        return self.counts @ self._sum_by_unit(K)

    def quad(self, P: torch.Tensor) -> torch.Tensor:
        """rows_b^T P rows_b for every replicate: the sum of all entries of the resampled P."""
        P_units = self._sum_by_unit(self._sum_by_unit(P).T).T
        return ((self.counts @ P_units) * self.counts).sum(1)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of per-row values over each replicate's rows, non-finite values skipped."""
        ok = values.isfinite()
        return (self.rows @ torch.where(ok, values, 0.0)) / (self.rows @ ok.double())


def _cka_replicates(K: torch.Tensor, L: torch.Tensor, r: _Resample) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased and debiased linear CKA of every replicate from the Gram matrices K, L of centered X, Y.

    Biased: the CKA of the resampled rows (re-centered), exactly, via <HKH, HLH> = sum(K*L) - 2/n
    1'KL1 + (1'K1)(1'L1)/n^2 on the resampled Gram matrix. Debiased: the Song et al. U-statistic on the
    resampled Gram matrix with its diagonal AND every entry pairing two copies of the same row set to 0.
    """
    dK, dL = K.diagonal(), L.diagonal()
    c, n = r.rows, r.n
    U, V = r.times(K), r.times(L)  # row sums of the resampled K, L (indexed by original row)
    sK, sL = (c * U).sum(1), (c * V).sum(1)
    qKL, qKK, qLL = r.quad(K * L), r.quad(K * K), r.quad(L * L)

    def hsic(q, Ua, Ub, sa, sb):
        return q - 2 / n * (c * Ua * Ub).sum(1) + sa * sb / n**2

    biased = _ratio(hsic(qKL, U, V, sK, sL), hsic(qKK, U, U, sK, sK), hsic(qLL, V, V, sL, sL))

    c2 = c * c  # pairs of copies of the same row, diagonal included: removed from the U-statistic
    Ut, Vt = U - c * dK, V - c * dL
    tK, tL = sK - c2 @ dK, sL - c2 @ dL

    def hsic_u(q, dd, Ua, Ub, ta, tb):
        return q - c2 @ dd + ta * tb / ((n - 1) * (n - 2)) - 2 / (n - 2) * (c * Ua * Ub).sum(1)

    debiased = _ratio(
        hsic_u(qKL, dK * dL, Ut, Vt, tK, tL),
        hsic_u(qKK, dK * dK, Ut, Ut, tK, tK),
        hsic_u(qLL, dL * dL, Vt, Vt, tL, tL),
    )
    return biased, debiased


def _nuclear_from_gram(S: torch.Tensor) -> torch.Tensor:
    """sum(sqrt(eig)) of a PSD matrix; eigenvalues below size * eps * largest are roundoff of exact zeros."""
    lam = torch.linalg.eigvalsh(S)
    return torch.where(lam > S.shape[0] * _EPS * lam.max(), lam, 0.0).sqrt().sum()


def _procrustes_replicates(
    X: torch.Tensor, Y: torch.Tensor, K: torch.Tensor, L: torch.Tensor, rows: torch.Tensor, n: torch.Tensor
) -> torch.Tensor:
    """Procrustes distance of every replicate (rows = counts per original row), exactly, one at a time.

    The resample is the m distinct drawn rows with weights c (D = diag(sqrt c)); re-centering is the
    projection P = I - sqrt(c) sqrt(c)^T / n. Its nuclear norm ||X_b^T Y_b||_* is computed on the smaller of
      - feature side: M = X^T diag(c) Y - (X^T c)(Y^T c)^T / n, sum sqrt(eigvalsh(M^T M)), size min(p, q);
      - Gram side (m < p, q): the squared singular values are eig(G H) with G = D K D and H = P D L D P
        (K, L = X X^T, Y Y^T of the full-set centered X, Y, gathered at the drawn rows), i.e.
        eigvalsh(F^T H F) with F = cholesky(G), size m ~ 0.63 n. Falls back to the feature side when G is
        not numerically positive definite.
    """
    X, Y = _row_space_factor(X), _row_space_factor(Y)
    sx, sy = rows @ X, rows @ Y
    norm_x = (rows @ K.diagonal() - sx.square().sum(1) / n).clamp(min=0).sqrt()
    norm_y = (rows @ L.diagonal() - sy.square().sum(1) / n).clamp(min=0).sqrt()
    nuclear = torch.empty(rows.shape[0], dtype=torch.float64, device=X.device)
    for b in range(rows.shape[0]):
        drawn = rows[b].nonzero().squeeze(1)
        c = rows[b, drawn]
        if drawn.numel() < min(X.shape[1], Y.shape[1]):
            root = c.sqrt()
            G = K[drawn][:, drawn] * root[:, None] * root[None, :]
            F, info = torch.linalg.cholesky_ex(G)
            if info == 0:
                H = L[drawn][:, drawn] * root[:, None] * root[None, :]
                Hr = H @ root
                H = (
                    H
                    - (Hr[:, None] * root[None, :] + root[:, None] * Hr[None, :]) / n[b]
                    + (root @ Hr) * root[:, None] * root[None, :] / n[b] ** 2
                )
                nuclear[b] = _nuclear_from_gram(F.T @ H @ F)
                continue
        M = (X[drawn].T * c) @ Y[drawn] - torch.outer(sx[b], sy[b]) / n[b]
        nuclear[b] = _nuclear_from_gram(M.T @ M if M.shape[1] <= M.shape[0] else M @ M.T)
    ok = (norm_x > 0) & (norm_y > 0)
    dist = 2 - 2 * nuclear / (norm_x * norm_y).clamp(min=_TINY)
    return torch.where(ok, dist.clamp(0, 2), torch.nan)


def layer_changes(
    pre: Sequence[Features],
    post: Sequence[Features],
    metrics: Sequence[str] = CHANGE_METRICS,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    groups: Sequence[int] | torch.Tensor | None = None,
    n_boot_procrustes: int | None = 50,
    device: str | torch.device | None = None,
) -> dict[str, LayerChange]:
    """Per-layer change between features before (`pre`) and after (`post`) fine-tuning, with a bootstrap.

    pre, post: L+1 matrices [n, d_l] (layer 0 = embeddings), rows = the same probe examples in the same
    order. Returns {metric: LayerChange(values [L+1] floats, replicates ndarray [B, L+1])}; B = n_boot,
    except for procrustes (below). device: where to compute (None: the device of pre[0]).

    Metrics (larger = more change): cosine (mean 1 - cos), cka_linear (1 - linear CKA), cka_debiased
    (1 - debiased CKA), procrustes (in [0, 2]), euclidean (mean ||y - x||); plus the Ren et al. 2023
    feature statistics dot (mean <x, y>) and norm_ratio (mean ||y|| / ||x||). Point values are the
    public functions of this module on the full probe set (to ~1e-15).

    Bootstrap. Replicate b draws n probe examples with replacement (`bootstrap_indices(n, n_boot,
    seed)[b]`) and uses the SAME draw for every layer and metric, so a replicate's profile can be refit
    across depth. `groups` (one id per row) resamples whole groups instead, e.g. the token positions of one
    probe sequence. Each replicate is a count vector c over the original rows, and nothing is gathered or
    recomputed per replicate except for Procrustes:
      - row-wise metrics (cosine, euclidean, dot, norm_ratio): count-weighted means of per-example values
        computed once; one [B, n] @ [n] product per layer.
      - linear CKA: the Gram matrices K, L of the centered features (float64, once per layer) give every
        replicate's HSIC terms as quadratic forms (c^T (K*L) c, c^T K c, row sums K c): five [B, n] @ [n, n]
        products per layer. Exact for the re-centered resample (== recomputing on the rows, to ~1e-15).
      - debiased CKA and duplicate rows: a resample holds copies of one example, and a pair of copies is a
        self-pair, which the U-statistic exists to exclude. Counted as distinct rows, copy pairs put ~n
        diagonal-like terms back and the replicates inflate to about the BIASED value (measured: n=512,
        d=384, independent features: point 0.00, such replicates 0.43 +- 0.02). So each estimator is applied
        to the resample as a weighted sample of distinct examples: the debiased replicate is the U-statistic
        on the resampled Gram matrix (features centered on the full probe set) with the diagonal and every
        copy-pair entry zeroed; its replicates center on the point value (0.00 +- 0.005 there). The plug-in
        statistics (biased CKA, Procrustes) keep their copies, as in the ordinary bootstrap; their replicates
        shift towards similarity by about the estimator's own finite-sample bias (~10% of the change at n=200,
        d=24), which moves their percentile CI the same way. Prefer cka_debiased for inference.
      - procrustes: a nuclear norm per replicate and layer, computed exactly on the cheaper side (see
        `_procrustes_replicates`): ~20 ms at n=512, d=384 and ~150 ms at n=1024, d=768 per replicate and
        layer on one core, ~100x the cost of all other metrics together. So it has its own budget: its
        replicates are the first `n_boot_procrustes` draws (the same draws as every other metric; None = all
        n_boot) and its replicate matrix has that many rows. Measured with n_boot=1000, all metrics and the
        default 50, on 2 cores shared with other jobs (load 2-3): n=512, d=384, 7 layers 9 s (1.7 s without
        procrustes); n=512, d=768, 13 layers 20 s; n=1024, d=768, 13 layers 100 s (13 s without). More
        replicates narrow the Monte Carlo error of the CI ends at proportional cost; or use a CUDA `device`.
    Layers run in parallel threads, each with single-threaded torch (see `single_threaded_torch`).
    """
    if n_boot < 0 or (n_boot_procrustes is not None and n_boot_procrustes < 0):
        raise ValueError("n_boot and n_boot_procrustes must be >= 0")
    unit_of_row, device = _prepare(pre, post, metrics, groups, device)
    n_units = int(unit_of_row.max()) + 1
    resample = _Resample.draws(bootstrap_indices(n_units, n_boot, seed), unit_of_row, device)
    n_proc = n_boot if n_boot_procrustes is None else min(n_boot, n_boot_procrustes)
    return _per_layer(pre, post, metrics, unit_of_row, resample, n_proc, device)


def jackknife_changes(
    pre: Sequence[Features],
    post: Sequence[Features],
    metrics: Sequence[str] = PLUGIN_METRICS,
    n_groups: int = 32,
    seed: int = 0,
    *,
    groups: Sequence[int] | torch.Tensor | None = None,
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Leave-one-group-out change values for a delete-a-group jackknife: {metric: [G, L+1] ndarray}.

    Units (probe examples, or the `groups` of rows as in `layer_changes`) are dealt into G =
    min(n_groups, units) groups by `jackknife_groups(units, n_groups, seed)`; row g holds each layer's
    metric on the probe set without group g (features re-centered on the rows kept; exact, via the same
    count-vector formulas as the bootstrap, with 0/1 counts). `locality.measure.profile.jackknife_interval`
    turns these into a bias-corrected interval for the profile's slope. Cost: G evaluations per layer;
    cheap for CKA, one d x d eigendecomposition per group and layer for Procrustes.
    """
    unit_of_row, device = _prepare(pre, post, metrics, groups, device)
    leave_out = _leave_one_out_counts(jackknife_groups(int(unit_of_row.max()) + 1, n_groups, seed))
    resample = _Resample(leave_out, unit_of_row, device)
    changes = _per_layer(pre, post, metrics, unit_of_row, resample, leave_out.shape[0], device)
    return {m: change.replicates for m, change in changes.items()}


def token_change(sums: Features, counts: Features, n_boot: int = 1000, seed: int = 0) -> LayerChange:
    """A token-weighted mean change per layer, with bootstrap replicates that resample whole sequences.

    sums: [n_seq, L+1] per-sequence sums of a per-token change (e.g. 1 - cos of every non-pad token, from
    `locality.instrument.capture.capture_token_change`); counts: [n_seq] tokens per sequence. The value of
    layer l is sum_i sums[i, l] / sum_i counts[i], the mean over all tokens. Replicate b is the same ratio
    over the sequences drawn by `bootstrap_indices(n_seq, n_boot, seed)[b]`, with multiplicity: the draws
    that `layer_changes` uses when its units are these probe sequences (pooling mean/last/first: one row
    per sequence; pooling tokens: rows grouped by sequence), so replicate b of every metric describes the
    same resample and their profiles can be compared replicate by replicate.
    """
    S = _f64(sums, "sums").cpu()
    c = torch.as_tensor(np.asarray(counts) if not isinstance(counts, torch.Tensor) else counts)
    c = c.detach().reshape(-1).to("cpu", torch.float64)
    if c.numel() != S.shape[0]:
        raise ValueError(
            f"counts must give one token count per sequence (row of sums): got {c.numel()} for "
            f"{S.shape[0]} sequences"
        )
    if n_boot < 0:
        raise ValueError("n_boot must be >= 0")
    total = c.sum()
    values = [float(v) for v in (S.sum(0) / total)] if total > 0 else [math.nan] * S.shape[1]
    drawn = _draw_counts(bootstrap_indices(S.shape[0], n_boot, seed), S.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        replicates = ((drawn @ S) / (drawn @ c)[:, None]).numpy()
    return LayerChange(values, replicates)


def token_cosine_sums(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of 1 - cos(pre, post) over the non-pad tokens: [batch] float64 on their device.

    pre, post: [batch, seq, d] hidden states of the same tokens; mask: [batch, seq], nonzero = a real
    token (any padding side). The per-token value is `cosine_distance`'s (float64; two zero vectors = 0).
    """
    keep = mask.to(pre.device).bool()
    rows = keep.nonzero()[:, 0]
    dist = _rowwise("cosine", pre[keep].to(torch.float64), post[keep].to(torch.float64))
    return torch.zeros(pre.shape[0], dtype=torch.float64, device=pre.device).index_add_(0, rows, dist)


def _prepare(
    pre: Sequence[Features],
    post: Sequence[Features],
    metrics: Sequence[str],
    groups: Sequence[int] | torch.Tensor | None,
    device: str | torch.device | None,
) -> tuple[torch.Tensor, str | torch.device]:
    """Validate paired layers and metrics; return each row's resampling unit and the compute device."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        hint = (
            " (cosine_tokens needs per-token states: `token_change` on the sums of `capture_token_change`)"
            if set(unknown) & set(TOKEN_METRICS)
            else ""
        )
        raise ValueError(f"unknown metric(s) {unknown}; valid metrics: {', '.join(METRICS)}{hint}")
    if len(pre) != len(post) or not pre:
        raise ValueError(
            f"pre and post must hold the same number (>= 1) of layers, got {len(pre)} and {len(post)}"
        )
    n = pre[0].shape[0]
    for layer, (x, y) in enumerate(zip(pre, post, strict=True)):
        if x.shape[0] != n or y.shape[0] != n:
            raise ValueError(
                f"layer {layer} has {x.shape[0]} (pre) and {y.shape[0]} (post) rows but layer 0 has "
                f"{n}: every layer needs the same probe examples"
            )
    if device is None:
        device = pre[0].device if isinstance(pre[0], torch.Tensor) else "cpu"
    return _units(groups, n), device


def _per_layer(
    pre: Sequence[Features],
    post: Sequence[Features],
    metrics: Sequence[str],
    unit_of_row: torch.Tensor,
    resample: _Resample,
    n_proc: int,
    device: str | torch.device,
) -> dict[str, LayerChange]:
    """Point values and `resample` replicates of every metric, layers in parallel threads."""
    n_units = int(unit_of_row.max()) + 1
    n = unit_of_row.numel()
    layers = list(zip(pre, post, strict=True))
    full = _Resample(torch.ones(1, n_units, dtype=torch.float64), unit_of_row, device)  # the probe set itself

    def one_layer(pair: tuple[Features, Features]) -> dict[str, tuple[float, torch.Tensor]]:
        X, Y = _pair(*pair, min_rows=4 if "cka_debiased" in metrics else 2)
        return _layer_change(X.to(device), Y.to(device), metrics, full, resample, n_proc)

    with single_threaded_torch() as threads:
        workers = max(1, min(threads, len(layers), _LAYER_MEMORY // (10 * 8 * n * n)))  # ~10 [n, n] per layer
        with ThreadPoolExecutor(workers) as pool:
            per_layer = list(pool.map(one_layer, layers))
    return {
        m: LayerChange(
            [layer[m][0] for layer in per_layer],
            torch.stack([layer[m][1] for layer in per_layer], dim=1).cpu().numpy(),
        )
        for m in metrics
    }


def _layer_change(
    X: torch.Tensor,
    Y: torch.Tensor,
    metrics: Sequence[str],
    full: _Resample,
    resample: _Resample,
    n_proc: int,
) -> dict[str, tuple[float, torch.Tensor]]:
    """{metric: (point value, replicates [n_boot])} of one layer; change metrics oriented as change.

    Point CKA values come from the replicate formulas applied to the full probe set (`full`), which equal
    `linear_cka` to ~1e-15 and reuse the Gram matrices.
    """
    out = {}
    for m in metrics:
        if m in _ROWWISE:
            per_example = _rowwise(m, *_pair(X, Y, same_shape=True))
            out[m] = _nanmean(per_example), resample.mean(per_example)
    if not set(metrics) & {"cka_linear", "cka_debiased", "procrustes"}:
        return out
    X, Y = _center(X), _center(Y)
    K, L = X @ X.T, Y @ Y.T
    if "cka_linear" in metrics or "cka_debiased" in metrics:
        point, replicates = _cka_replicates(K, L, full), _cka_replicates(K, L, resample)
        for m, i in (("cka_linear", 0), ("cka_debiased", 1)):
            if m in metrics:
                out[m] = 1 - float(point[i][0]), 1 - replicates[i]
    if "procrustes" in metrics:
        out["procrustes"] = (
            procrustes_distance(X, Y),
            _procrustes_replicates(X, Y, K, L, resample.rows[:n_proc], resample.n[:n_proc]),
        )
    return out


@contextmanager
def single_threaded_torch():
    """Yield the thread count torch had, running torch single-threaded meanwhile (for a pool of that size).

    Measured on 2 shared cores: when other processes compete, 2-thread MKL eigvalsh of a 384 x 384
    matrix takes 1-7 s instead of 15 ms, and GEMMs slow 2-4x; independent single-threaded workers don't.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def _units(groups: Sequence[int] | torch.Tensor | None, n: int) -> torch.Tensor:
    """Map each row to a resampling unit 0..G-1 (the sorted distinct group ids)."""
    if groups is None:
        return torch.arange(n)
    g = torch.as_tensor(groups).reshape(-1)
    if g.numel() != n:
        raise ValueError(f"groups must give one id per row: got {g.numel()} ids for {n} rows")
    _, inverse = torch.unique(g, return_inverse=True)
    return inverse

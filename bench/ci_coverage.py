"""Simulated coverage of the slope intervals: bootstrap (today's `measure.ci_method`) vs delete-a-group jackknife.

    python bench/ci_coverage.py                 # default: two settings, ~1-2 min on 2 cores
    python bench/ci_coverage.py --sims 1000     # tighter Monte Carlo error (+-0.7% at 95%)
    python bench/ci_coverage.py --settings 256x8 128x32 64x32
    python bench/ci_coverage.py --settings 128x32 --change 1 3 6   # small to large change (1 - CKA up to ~0.7)

Synthetic depth profiles with a known slope. Per layer l = 0..L the pre features are X = x (one draw of
anisotropic Gaussian features per probe example, spectrum ~ 1/j) and the post features are
Y_l = X R_l + sigma_l E_l: R_l a small rotation whose angle grows with depth and noise sigma_l growing
linearly with depth, so every metric's change grows with depth. The population profile (the value each
metric estimates) is computed once on a very large sample (n = --n-truth) with the public metric
functions; its OLS slope against depth is the truth. Each simulation draws a fresh probe set of n
examples, computes the point profile, the bootstrap interval (`layer_changes` + `profile_stats`, the
configured basic method) and the jackknife interval (`jackknife_changes`, G groups), and records whether
each covers the truth. Prints coverage (with its Monte Carlo standard error), the mean bias of the plain
and the jackknife bias-corrected slope relative to the truth, and the mean interval width.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locality.measure import (  # noqa: E402
    cosine_distance,
    jackknife_changes,
    layer_changes,
    linear_cka,
    procrustes_distance,
    profile_stats,
)

METRICS = ("cosine", "cka_debiased", "cka_linear", "procrustes")
N_LAYERS = 5  # depth points l = 0..4


def model(d: int, change: float = 1.0, seed: int = 1234):
    """Fixed per setting: feature spectrum, rotations R_l and noise levels sigma_l (`change` scales both: 1 is
    the small-change regime, 1 - CKA <= ~0.2 at the top; 4-6 reach 1 - CKA ~ 0.5-0.7)."""
    g = torch.Generator().manual_seed(seed)
    scale = (1.0 / torch.arange(1, d + 1, dtype=torch.float64)).sqrt()  # variance ~ 1/j
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = (A - A.T) / (A - A.T).norm() * math.sqrt(d)
    depth = torch.linspace(0, 1, N_LAYERS, dtype=torch.float64)
    rotations = [torch.linalg.matrix_exp(change * 0.15 * float(t) * A / math.sqrt(d)) for t in depth]
    sigma = [change * (0.05 + 0.45 * float(t)) for t in depth]
    return scale, rotations, sigma


def sample(n: int, d: int, seed: int, params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    scale, rotations, sigma = params
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    noise_scale = float(scale.square().mean().sqrt())
    post = [
        x @ R + s * noise_scale * torch.randn(n, d, generator=g, dtype=torch.float64)
        for R, s in zip(rotations, sigma, strict=True)
    ]
    return [x] * N_LAYERS, post


def population(d: int, n_truth: int, params) -> tuple[dict[str, float], dict[str, float]]:
    """(slope, top-layer value) of each metric's population profile, estimated on one very large sample."""
    pre, post = sample(n_truth, d, 0, params)
    fns = {
        "cosine": cosine_distance,
        "cka_linear": lambda a, b: 1 - linear_cka(a, b),
        "cka_debiased": lambda a, b: 1 - linear_cka(a, b, debiased=True),
        "procrustes": procrustes_distance,
    }
    depth = [i / (N_LAYERS - 1) for i in range(N_LAYERS)]
    profiles = {m: [fn(a, b) for a, b in zip(pre, post, strict=True)] for m, fn in fns.items()}
    return {m: profile_stats(depth, p)["slope"] for m, p in profiles.items()}, {
        m: p[-1] for m, p in profiles.items()
    }


def one(args) -> dict[str, tuple]:
    n, d, seed, n_boot, groups, ci, params, truth = args
    torch.set_num_threads(1)
    depth = [i / (N_LAYERS - 1) for i in range(N_LAYERS)]
    pre, post = sample(n, d, seed, params)
    boot = layer_changes(pre, post, metrics=METRICS, n_boot=n_boot, seed=seed, n_boot_procrustes=n_boot)
    jack = jackknife_changes(pre, post, METRICS, n_groups=groups, seed=seed)
    out = {}
    for m in METRICS:
        b = profile_stats(depth, boot[m].values, boot[m].replicates, ci=ci, method="basic")
        j = profile_stats(depth, boot[m].values, ci=ci, method="jackknife", jackknife=jack[m])
        t = truth[m]
        out[m] = (
            b["slope_ci"][0] <= t <= b["slope_ci"][1],
            j["slope_ci"][0] <= t <= j["slope_ci"][1],
            b["slope"] - t,
            j["slope_jackknife"] - t,
            b["slope_ci"][1] - b["slope_ci"][0],
            j["slope_ci"][1] - j["slope_ci"][0],
        )
    return out


def run_setting(
    n: int, d: int, sims: int, n_boot: int, groups: int, ci: float, n_truth: int, workers: int, change: float
) -> None:
    params = model(d, change)
    start = time.perf_counter()
    truth, top = population(d, n_truth, params)
    jobs = [(n, d, 1000 + s, n_boot, groups, ci, params, truth) for s in range(sims)]
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(one, jobs, chunksize=max(1, sims // (4 * workers))))
    se = math.sqrt(ci * (1 - ci) / sims)
    rule = "jackknife" if d <= n / 4 else "none (d > n/4)"
    print(
        f"\nn={n} probe rows, d={d} features, {N_LAYERS} layers, {sims} simulations, {n_boot} bootstrap "
        f"replicates, G={groups} jackknife groups, change x{change:g}, nominal {100 * ci:g}% (MC s.e. {se:.3f}); "
        f"plug-in rule here: {rule}; {time.perf_counter() - start:.0f} s"
    )
    print(
        f"{'metric':<13} {'top value':>10} {'true slope':>10} {'cover boot':>10} {'cover jack':>10} "
        f"{'bias plain':>10} {'bias jack':>10} {'width boot':>10} {'width jack':>10}"
    )
    for m in METRICS:
        rows = np.array([r[m] for r in results], dtype=np.float64)
        t = truth[m]
        print(
            f"{m:<13} {top[m]:10.4f} {t:10.5f} {rows[:, 0].mean():10.3f} {rows[:, 1].mean():10.3f} "
            f"{rows[:, 2].mean() / abs(t):+10.1%} {rows[:, 3].mean() / abs(t):+10.1%} "
            f"{rows[:, 4].mean():10.5f} {rows[:, 5].mean():10.5f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["256x8", "128x32"],
        help="NxD settings: probe rows x feature dimension (default: n >> d and d = n/4)",
    )
    parser.add_argument(
        "--change",
        nargs="+",
        type=float,
        default=[1.0],
        help="scales of the change (rotation angle and noise; 1: small, 4-6: 1 - CKA ~ 0.5-0.7 at the top)",
    )
    parser.add_argument("--sims", type=int, default=160)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--ci", type=float, default=0.95)
    parser.add_argument("--n-truth", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    start = time.perf_counter()
    for setting in args.settings:
        n, d = (int(v) for v in setting.lower().split("x"))
        for change in args.change:
            run_setting(
                n, d, args.sims, args.n_boot, args.groups, args.ci, args.n_truth, args.workers, change
            )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

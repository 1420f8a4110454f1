"""What a run's measurement will cost, from the config and the model's shape alone: memory (a run that
cannot fit in this machine's memory is refused before any work, naming the estimate) and the NTK's time
(announced before it starts when it is long).

The estimates count the dominant terms only, each from how `locality.measure` computes (so they are lower
bounds, good to a small factor): the captured features of the probe set before and after training (float32,
every layer), the float64 [rows, rows] work matrices of the Gram-based metrics (about ten per layer while a
layer is measured), the cross-layer CKA's Gram matrices, and the NTK's kernels (one [n*O, n*O] float64 matrix
per parameter group). Time is the NTK's floating-point work at a rate measured here in a few milliseconds.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass

GRAM_METRICS = ("cka_linear", "cka_debiased", "procrustes")
GRAM_WORK_MATRICES = 10  # [rows, rows] float64 matrices one layer holds while its Gram metrics run
NTK_EXTRA_GROUPS = 3  # embeddings, final norm and head beside the blocks (ntk_params=all)
ANNOUNCE_AFTER_S = 60.0


@dataclass(frozen=True)
class Shape:
    """What the estimates need of the model: its width, blocks and parameters."""

    width: int
    n_blocks: int
    n_params: int


def measurement_bytes(measure, shape: Shape) -> dict[str, int]:
    """The peak bytes of each part of the measurement (keys name the settings that drive them)."""
    layers = shape.n_blocks + 1
    tokens = measure.pooling == "tokens"
    rows = measure.n_probe * (measure.token_positions if tokens else 1)  # positions drawn with replacement
    parts = {"captured features (n_probe, pooling, token_positions)": 2 * rows * shape.width * layers * 4}
    if any(m in GRAM_METRICS for m in measure.metrics):
        parts["Gram-metric work (n_probe, pooling, token_positions)"] = GRAM_WORK_MATRICES * rows * rows * 8
    if measure.cross_layer:
        cross_rows = (
            measure.n_probe * measure.token_positions if measure.cross_layer_pooling == "tokens" else rows
        )
        parts["cross-layer CKA (cross_layer_pooling, token_positions)"] = 2 * layers * cross_rows**2 * 8
    if measure.ntk:
        groups = shape.n_blocks + (NTK_EXTRA_GROUPS if measure.ntk_params == "all" else 0)
        parts["NTK kernels (ntk_examples)"] = groups * measure.ntk_examples**2 * 8
    return parts


def ntk_seconds(measure, shape: Shape, max_length: int) -> float:
    """The NTK's time: a forward and backward per example (6 flops per parameter and token) and the kernel
    products (2 flops per parameter and pair of examples), at this machine's measured rate."""
    n = measure.ntk_examples
    flops = 6.0 * shape.n_params * max_length * n + 2.0 * shape.n_params * n * n
    return flops / flops_per_second()


def available_bytes() -> int:
    """Memory a new allocation can get now (MemAvailable), or the physical memory where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.cache
def flops_per_second() -> float:
    """float32 matrix-multiply rate of this machine's CPU (a 256x256 product, best of 5; ~10 ms, once)."""
    import torch

    a = torch.randn(256, 256)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * 256**3 / max(best, 1e-9)


@functools.cache
def announce(line: str) -> None:
    """Print an estimate once per process (the checks run in Hydra's callback and again in the run)."""
    print(line, file=sys.stderr)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"

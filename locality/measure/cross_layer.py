"""Save layer x layer CKA matrices (pretrained and fine-tuned) as arrays and side-by-side heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_cross_layer(directory: Path, matrices: dict[str, list[list[float]]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = {name: np.asarray(m, dtype=np.float64) for name, m in matrices.items()}
    npz = directory / "cross_layer_cka.npz"
    np.savez(npz, **arrays)
    fig, axes = plt.subplots(1, len(arrays), figsize=(4.2 * len(arrays), 3.8), squeeze=False)
    for ax, (name, array) in zip(axes[0], arrays.items(), strict=True):
        image = ax.imshow(array, vmin=0, vmax=1, cmap="magma", origin="lower")
        ax.set_title(f"{name}: linear CKA")
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85)
    png = directory / "cross_layer_cka.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [npz, png]

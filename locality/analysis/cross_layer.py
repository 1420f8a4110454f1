"""Cross-layer CKA (Phang, Liu, Bowman 2021): layer x layer linear CKA of the pretrained and fine-tuned model.

The matrices are computed by `DepthProfiler` (`measure.cross_layer=true`) over a fixed sample of non-pad
token positions (`measure.cross_layer_pooling=tokens`, `measure.token_positions` per probe sequence, as the
paper) or over the profile's pooled features (`pooled`), and kept in results.json["cross_layer"]. This module
draws them: `cross_layer_heatmap` (pretrained, fine-tuned, and their difference, side by side) is used at
train time (`save_cross_layer`: the run dir's cross_layer_cka.npz/.png) and by `locality.analyze`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODELS = ("pretrained", "finetuned")


def cross_layer_heatmap(
    cross_layer: dict, path: Path, title: str | None = None, layers: list[str] | None = None
) -> Path:
    """A PNG with the pretrained and fine-tuned CKA matrices and fine-tuned minus pretrained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre, post = (np.asarray(cross_layer[m], dtype=np.float64) for m in MODELS)
    panels = [("pretrained", pre), ("fine-tuned", post), ("fine-tuned − pretrained", post - pre)]
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.9), layout="constrained")
    ticks = np.arange(len(pre))
    names = layers or [str(i) for i in ticks]
    spread = max(float(np.nanmax(np.abs(post - pre))), 1e-6)
    for ax, (name, array) in zip(axes, panels, strict=True):
        diff = name.startswith("fine-tuned −")
        image = ax.imshow(
            array,
            vmin=-spread if diff else 0,
            vmax=spread if diff else 1,
            cmap="RdBu_r" if diff else "magma",
            origin="lower",
        )
        ax.set_title(name, fontsize=9)
        ax.set_xticks(ticks, names, rotation=90, fontsize=6)
        ax.set_yticks(ticks, names, fontsize=6)
        fig.colorbar(image, ax=ax, shrink=0.85, label="Δ linear CKA" if diff else "linear CKA")
    fig.suptitle(title or f"Cross-layer linear CKA over {rows_label(cross_layer)}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows_label(cross_layer: dict) -> str:
    """What the matrices' rows are, e.g. "512 tokens" or "64 examples (first-pooled)"."""
    n, pooling = cross_layer.get("n_rows", "?"), cross_layer.get("pooling")
    return f"{n} tokens" if pooling == "tokens" else f"{n} examples ({pooling or 'pooled'}-pooled)"


def save_cross_layer(directory: Path, cross_layer: dict) -> list[Path]:
    """The run dir's cross_layer_cka.npz (the two matrices) and cross_layer_cka.png (`cross_layer_heatmap`)."""
    npz = directory / "cross_layer_cka.npz"
    np.savez(npz, **{m: np.asarray(cross_layer[m], dtype=np.float64) for m in MODELS})
    return [npz, cross_layer_heatmap(cross_layer, directory / "cross_layer_cka.png")]

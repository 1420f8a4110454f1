"""Drop the top k blocks of the fine-tuned model (no retraining) and evaluate the task (Phang et al. 2021).

The final norm and the head stay; only blocks L-k..L-1 are skipped. If the task metric barely moves
for small k, the top blocks were not needed — the cluster structure of cross-layer CKA predicts where.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def without_top_blocks(backbone, k: int):
    """Temporarily replace the block list by its first L-k blocks."""
    parent_path, _, attr = backbone.blocks_path.rpartition(".")
    parent = backbone.base.get_submodule(parent_path) if parent_path else backbone.base
    full = getattr(parent, attr)
    if not 0 <= k < len(full):
        raise ValueError(f"drop_top_k: k={k} must be in [0, {len(full) - 1}]")
    setattr(parent, attr, nn.ModuleList(list(full)[: len(full) - k]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


def evaluate_dropping_top(trainer, module, datamodule, backbone, max_k: int) -> list[dict]:
    """Validation metrics for k = 0..max_k top blocks removed."""
    rows = []
    for k in range(min(max_k, backbone.n_layers - 1) + 1):
        with without_top_blocks(backbone, k):
            metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        rows.append({"k": k, **{key.removeprefix("val/"): float(v) for key, v in metrics.items()}})
    return rows

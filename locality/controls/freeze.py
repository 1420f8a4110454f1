"""Freeze the bottom k blocks (or a list of blocks), and optionally the embeddings.

Frozen parameters get no gradient and no update; the depth profile then shows how much of the change
the trainable blocks absorb, and the representations below them change only if embeddings are free.
"""

from __future__ import annotations

from collections.abc import Sequence

from locality.controls.base import Control


class Freeze(Control):
    name = "freeze"

    def __init__(self, bottom: int | None = None, blocks: Sequence[int] | None = None, embeddings: bool = True):
        if (bottom is None) == (blocks is None):
            raise ValueError("freeze needs exactly one of `bottom` (freeze blocks 0..k-1) or `blocks` (a list).")
        self.bottom = bottom
        self.blocks = list(blocks) if blocks is not None else None
        self.embeddings = embeddings
        self.frozen: list[int] = []

    def configure_model(self, module) -> None:
        n = len(module.blocks)
        chosen = list(range(self.bottom)) if self.bottom is not None else self.blocks
        bad = [i for i in chosen if not -n <= i < n]
        if bad or (self.bottom is not None and not 0 <= self.bottom <= n):
            raise ValueError(f"freeze: the model has {n} blocks (0..{n - 1}); cannot freeze {bad or self.bottom}.")
        self.frozen = sorted(i % n for i in chosen)
        for i in self.frozen:
            module.blocks[i].requires_grad_(False)
        if self.embeddings and "embeddings" in module.parts:
            module.parts["embeddings"].requires_grad_(False)

    def summary(self) -> dict:
        return {"frozen_blocks": self.frozen, "embeddings_frozen": self.embeddings}

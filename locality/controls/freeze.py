"""Freeze the bottom k blocks (or a list of blocks), and optionally the embeddings.

Frozen parameters get no gradient and no update; the depth profile then shows how much of the change
the trainable blocks absorb, and the representations below them change only if embeddings are free.
"""

from __future__ import annotations

from collections.abc import Sequence

from locality.controls.base import Control


class Freeze(Control):
    name = "freeze"
    supports_sharding = True

    def __init__(
        self, bottom: int | None = None, blocks: Sequence[int] | None = None, embeddings: bool = True
    ):
        if (bottom is None) == (blocks is None):
            raise ValueError(
                "freeze needs exactly one of `bottom` (freeze blocks 0..k-1) or `blocks` (a list); "
                "set the other to null."
            )
        if bottom is not None and not (isinstance(bottom, int) and bottom >= 0):
            raise ValueError(f"freeze bottom={bottom!r} must be a number of blocks >= 0.")
        self.bottom = bottom
        self.blocks = list(blocks) if blocks is not None else None
        self.embeddings = embeddings
        self.frozen: list[int] = []

    def check_model(self, n_blocks: int) -> None:
        if self.bottom is not None and self.bottom > n_blocks:
            raise ValueError(
                f"freeze bottom={self.bottom}: the model has {n_blocks} blocks, so bottom must be "
                f"0..{n_blocks}."
            )
        bad = [i for i in self.blocks or [] if not -n_blocks <= i < n_blocks]
        if bad:
            raise ValueError(
                f"freeze blocks {bad} are out of range: the model has {n_blocks} blocks "
                f"(0..{n_blocks - 1}, or -1..-{n_blocks} from the top)."
            )

    def configure_model(self, module) -> None:
        n = len(module.blocks)
        self.check_model(n)
        chosen = list(range(self.bottom)) if self.bottom is not None else self.blocks
        self.frozen = sorted(i % n for i in chosen)
        for i in self.frozen:
            module.blocks[i].requires_grad_(False)
        if self.embeddings and "embeddings" in module.parts:
            module.parts["embeddings"].requires_grad_(False)

    def summary(self) -> dict:
        return {"frozen_blocks": self.frozen, "embeddings_frozen": self.embeddings}

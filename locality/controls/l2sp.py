"""L2-SP: a Euclidean pull toward the pretrained weights, (strength / 2) * ||theta - theta_0||^2.

The explicit form of fine-tuning's implicit bias to stay near the pretrained weights (Li et al. 2018;
the "Euclidean pull" of Afzal et al. 2025). The anchor theta_0 is taken in `configure_model`, before
Lightning restores any checkpoint, so a resumed run pulls toward the same pretrained weights.
"""

from __future__ import annotations

import torch

from locality.controls.base import Control


class L2SP(Control):
    name = "l2sp"

    def __init__(self, strength: float = 0.01, scope: str = "backbone"):
        if strength < 0:
            raise ValueError(f"l2sp strength must be >= 0, got {strength}")
        if scope not in ("backbone", "blocks"):
            raise ValueError(
                f"l2sp scope must be 'backbone' (all pretrained weights) or 'blocks', got {scope!r}"
            )
        self.strength = strength
        self.scope = scope
        self.params: list[torch.nn.Parameter] = []
        self.anchors: list[torch.Tensor] = []

    def configure_model(self, module) -> None:
        source = module.blocks if self.scope == "blocks" else module.pretrained
        self.params = [p for p in source.parameters() if p.requires_grad]
        self.anchors = [p.detach().clone() for p in self.params]

    def on_fit_start(self, trainer, pl_module) -> None:
        self.anchors = [a.to(p.device, p.dtype) for a, p in zip(self.anchors, self.params, strict=True)]

    def penalty(self, module) -> torch.Tensor:
        deltas = torch._foreach_sub(self.params, self.anchors)
        squared = torch.stack(torch._foreach_norm(deltas)).pow(2).sum()
        return 0.5 * self.strength * squared

"""L2-SP: a Euclidean pull toward the pretrained weights, (strength / 2) * ||theta - theta_0||^2.

The explicit form of fine-tuning's implicit bias to stay near the pretrained weights (Li et al. 2018;
the "Euclidean pull" of Afzal et al. 2025). The anchor theta_0 is taken in `configure_model`, before
Lightning restores any checkpoint, so a resumed run pulls toward the same pretrained weights.

`selective=true` is Afzal et al.'s selective pull (the condition of Selective Projection Decay): per parameter
tensor, the pull strength * (theta - theta_0) is applied only when the task gradient points away from
theta_0's side, grad R(theta) . (theta - theta_0) >= 0 (a descent step would then move it further away).
The task gradient is known only after backward, so the selective pull is added to the gradient just before
the optimizer step (after any gradient accumulation, before clipping, like the penalty's own gradient),
not to the loss; `summary()` reports the mean fraction of tensors pulled per step.
"""

from __future__ import annotations

import torch

from locality.controls.base import Control


class L2SP(Control):
    name = "l2sp"

    def __init__(self, strength: float = 0.01, scope: str = "backbone", selective: bool = False):
        if strength < 0:
            raise ValueError(f"l2sp strength must be >= 0, got {strength}")
        if scope not in ("backbone", "blocks"):
            raise ValueError(
                f"l2sp scope must be 'backbone' (all pretrained weights) or 'blocks', got {scope!r}"
            )
        self.strength = strength
        self.scope = scope
        self.selective = selective
        self.pulled: list[float] = []  # selective: the fraction of tensors pulled at each step
        self.params: list[torch.nn.Parameter] = []
        self.anchors: list[torch.Tensor] = []

    def configure_model(self, module) -> None:
        source = module.blocks if self.scope == "blocks" else module.pretrained
        self.params = [p for p in source.parameters() if p.requires_grad]
        self.anchors = [p.detach().clone() for p in self.params]

    def on_fit_start(self, trainer, pl_module) -> None:
        self.anchors = [a.to(p.device, p.dtype) for a, p in zip(self.anchors, self.params, strict=True)]

    def penalty(self, module) -> torch.Tensor | None:
        if self.selective:
            return None
        deltas = torch._foreach_sub(self.params, self.anchors)
        squared = torch.stack(torch._foreach_norm(deltas)).pow(2).sum()
        return 0.5 * self.strength * squared

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.selective or not self.params:
            return
        pulled = 0
        for param, anchor in zip(self.params, self.anchors, strict=True):
            if param.grad is None:
                continue
            delta = param - anchor
            if torch.sum(param.grad * delta) >= 0:
                param.grad.add_(delta, alpha=self.strength)
                pulled += 1
        self.pulled.append(pulled / len(self.params))

    def summary(self) -> dict:
        if not self.selective:
            return {}
        return {"pulled_fraction": sum(self.pulled) / len(self.pulled) if self.pulled else None}

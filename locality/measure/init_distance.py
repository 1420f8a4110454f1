"""Training-free objective distance: how far the objective is from what the model already does, at step 0.

Measured before any update, in eval mode (no dropout), on a fixed set of training batches:
- the objective's loss and task accuracy (the "energy" available for feature change, Ren et al. 2023);
- the per-block relative gradient magnitude ||g_l|| / ||W_l|| — the gradient-flow profile that the
  equal-step control removes.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


def objective_distance(module, batches: list[dict], forward_context=nullcontext) -> dict:
    """{"loss", "<metric>"..., "grad_rel": [per block]} at the module's current weights; grads are cleared after.

    Forwards run on the module's device inside `forward_context()` (the trainer's precision), backwards
    outside it, as in training.
    """
    model_mode = module.training
    module.eval()
    module.zero_grad(set_to_none=True)
    metrics = module.objective.metrics().to(module.device)
    total = 0.0
    try:
        for batch in batches:
            batch = {k: v.to(module.device) for k, v in batch.items()}
            with forward_context():
                out = module(batch)
            (out.loss.float() / len(batches)).backward()
            total += float(out.loss.detach())
            metrics.update(out.preds, out.target)
        result = {"loss": total / len(batches), **{k: float(v) for k, v in metrics.compute().items()}}
        result["grad_rel"] = [_grad_rel(block) for block in module.blocks]
    finally:
        module.zero_grad(set_to_none=True)
        module.train(model_mode)
    return result


def _grad_rel(block: nn.Module) -> float | None:
    params = [p for p in block.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return None
    grad = torch.stack([p.grad.detach().double().pow(2).sum() for p in params]).sum().sqrt()
    weight = torch.stack([p.detach().double().pow(2).sum() for p in params]).sum().sqrt()
    return float(grad / weight) if weight > 0 else None

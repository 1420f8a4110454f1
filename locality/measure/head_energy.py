"""The "energy" of a task head (Ren, Guo, Bae, Sutherland, ICLR 2023): how much is left for features to learn.

energy = mean over scored training examples of ||e_y - p(x)||_2, the Euclidean distance between the one-hot
label and the head's predicted distribution, in [0, sqrt(2)]. A head that predicts the uniform distribution
over K classes has energy sqrt(1 - 1/K); a head probed to convergence drives it toward 0, leaving little
gradient to move the features.

`head_energy(logits, labels)` is the pure definition; `energy_stats` adds the cross-entropy loss and accuracy
from the same logits; `measure_head_energy(module, batches)` runs the module over fixed batches (eval mode,
no grad) and reads the head's logits through a forward hook on `module.objective.head`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from locality.objectives.base import IGNORE


def scored_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [m, K] float64 and labels [m] of the scored targets (labels != IGNORE); logits [..., K]."""
    logits = logits.detach().reshape(*labels.shape, logits.shape[-1])
    keep = labels != IGNORE
    return logits[keep].double(), labels[keep].long()


def head_energy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over scored rows of ||onehot(y) - softmax(logits)||_2; logits [..., K], labels [...] (IGNORE skipped)."""
    return energy_stats(logits, labels)["energy"]


def energy_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"energy", "loss" (mean cross-entropy), "acc", "n" (scored rows)} of the same logits; NaN when n = 0."""
    z, y = scored_rows(logits, labels)
    if y.numel() == 0:
        return {"energy": float("nan"), "loss": float("nan"), "acc": float("nan"), "n": 0}
    p = z.softmax(dim=-1)
    onehot = torch.nn.functional.one_hot(y, z.shape[-1]).to(p.dtype)
    return {
        "energy": float((onehot - p).norm(dim=-1).mean()),
        "loss": float(torch.nn.functional.cross_entropy(z, y)),
        "acc": float((z.argmax(dim=-1) == y).double().mean()),
        "n": int(y.numel()),
    }


def head_passes(module, batches, forward_context=nullcontext, inputs: bool = False):
    """Run the module's own forward over `batches` (eval mode, no grad, on its device) and yield, per batch,
    what its task head returned (or, with `inputs`, received) and the objective's targets. The hook is removed
    and the training mode restored when the loop ends, even early."""
    head = module.objective.head
    seen: list[torch.Tensor] = []
    if inputs:
        handle = head.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    else:
        handle = head.register_forward_hook(lambda _, __, output: seen.append(output.detach()))
    was_training = module.training
    module.eval()
    try:
        for batch in batches:
            batch = {k: v.to(module.device) for k, v in batch.items()}
            seen.clear()
            with torch.no_grad(), forward_context():
                out = module(batch)
            yield seen[-1], out.target
    finally:
        handle.remove()
        module.train(was_training)


def measure_head_energy(module, batches, forward_context=nullcontext) -> dict:
    """`energy_stats` of the module's task head over `batches` (`head_passes`: eval mode, no grad, the module's
    device; the training mode is restored after)."""
    logits, labels = [], []
    for output, target in head_passes(module, batches, forward_context):
        z, y = scored_rows(output, target)
        logits.append(z.cpu())
        labels.append(y.cpu())
    return energy_stats(torch.cat(logits), torch.cat(labels))

"""One vector per example from [batch, seq, d] hidden states: the single pooling that task heads
(`objectives.cls`) and measurement (`measure.capture`) share, so "last token" means the same in both.

Padding is on the right (the tokenizers are set up so); `mask` is the attention mask.
"""

from __future__ import annotations

import torch

POOLINGS = ("mean", "last", "first", "tokens")  # tokens: chosen (row, column) positions, measurement only


def pool(
    hidden: torch.Tensor, mask: torch.Tensor, how: str, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """[batch, seq, d] -> [batch, d]: mean over non-pad tokens, the last non-pad token, or the first token;
    `tokens`: the rows of `positions` ([rows, 2] of (example, position)) -> [rows, d]."""
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if how == "last":
        last = mask.sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "first":
        return hidden[:, 0]
    if how == "tokens" and positions is not None:
        rows, cols = positions.unbind(-1)
        return hidden[rows, cols]
    raise ValueError(f"pooling must be one of {POOLINGS} (tokens with positions), not {how!r}")

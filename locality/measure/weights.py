"""Relative weight change per block, ||W_ft - W_pre|| / ||W_pre||, over each block's parameters together."""

from __future__ import annotations

import torch
from torch import nn


def block_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's effective weights by name. LoRA layers (peft) count merged: W + scale * B @ A."""
    state = {
        name.replace(".base_layer", ""): p.detach()
        for name, p in block.named_parameters()
        if "lora_" not in name
    }
    for name, module in block.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    state[f"{name}.weight"] = (
                        state[f"{name}.weight"] + module.get_delta_weight(adapter).detach()
                    )
    return state


def snapshot_blocks(
    blocks: nn.ModuleList, base: nn.Module | None = None, snapshot: dict[str, torch.Tensor] | None = None
) -> list[dict[str, torch.Tensor]]:
    """A CPU float32 copy of every block's effective weights (the pretrained reference).

    With `snapshot` (`snapshot_parameters(base)`, taken at the same weights), the blocks' tensors are read
    from it instead: no second copy when the snapshot is already float32.
    """
    if snapshot is not None and base is not None:
        prefix = {id(m): f"{name}." for name, m in base.named_modules()}
        states = [block_state(b) for b in blocks]
        if all(
            f"{prefix.get(id(b), '?')}{k}" in snapshot
            for b, state in zip(blocks, states, strict=True)
            for k in state
        ):
            return [
                {k: snapshot[f"{prefix[id(b)]}{k}"].float() for k in state}
                for b, state in zip(blocks, states, strict=True)
            ]
    return [{k: v.to("cpu", torch.float32, copy=True) for k, v in block_state(b).items()} for b in blocks]


def snapshot_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter of `module` by name, in its own dtype (shared parameters once)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters()}


@torch.no_grad()
def weight_rel(blocks: nn.ModuleList, reference: list[dict[str, torch.Tensor]]) -> list[float]:
    out = []
    for block, before in zip(blocks, reference, strict=True):
        after = block_state(block)
        delta = sum(float((after[k].float().cpu() - v).pow(2).sum()) for k, v in before.items())
        norm = sum(float(v.pow(2).sum()) for v in before.values())
        out.append((delta / norm) ** 0.5 if norm > 0 else float("nan"))
    return out

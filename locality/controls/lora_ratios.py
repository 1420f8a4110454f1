"""Update ratios of LoRA runs over the effective weights W_eff = W0 + s·B·A, not over the adapters themselves.

Under LoRA the trainable tensors are the adapter matrices, whose own ‖ΔA‖/‖A‖ says nothing about how far a
block's weights move. `MergedLoRARatios` is the measuring core `UpdateRatioMonitor` uses when the blocks hold
peft LoRA layers: per block, r_l = ‖ΔW_eff,l‖ / ‖W_eff,l‖ over all of the block's weights (frozen ones
included), ΔW_eff = s(B′A′ − BA) for every adapted layer — the quantity the paper's ratio and `weight_rel`
(which also counts LoRA layers merged) are about. It measures only; nothing is rescaled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from locality.controls.update_core import EqualStepCore


def lora_layers(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(peft LoRA layer, active adapter name) pairs inside `module`."""
    return [
        (m, adapter)
        for m in module.modules()
        if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")
        for adapter in m.active_adapters
        if adapter in m.lora_A
    ]


class MergedLoRARatios(EqualStepCore):
    """`EqualStepCore`'s measuring interface (snapshot / update / history) over merged LoRA weights."""

    def __init__(self, blocks: Sequence[nn.Module], names: Sequence[str]) -> None:
        self.blocks = list(blocks)
        self.adapted = [lora_layers(block) for block in self.blocks]
        # The core's bookkeeping wants one tensor per layer at least: the adapters, or any weight of the block.
        tensors = [
            [p for p in block.parameters() if p.requires_grad] or [next(block.parameters())]
            for block in self.blocks
        ]
        super().__init__(tensors, target=None, names=names)
        self._deltas: list[list[torch.Tensor]] = []
        self._w_norm: torch.Tensor | None = None

    @torch.no_grad()
    def snapshot(self) -> None:
        self._deltas = [[m.get_delta_weight(a).detach().clone() for m, a in mods] for mods in self.adapted]
        self._w_norm = torch.stack(
            [
                self._effective_norm(block, mods, deltas)
                for block, mods, deltas in zip(self.blocks, self.adapted, self._deltas, strict=True)
            ]
        )
        self.armed = True

    @torch.no_grad()
    def update(self) -> None:
        if not self.armed:
            raise RuntimeError("MergedLoRARatios.update() called without a snapshot() before the step.")
        self.armed = False
        moved = torch.stack(
            [
                torch.stack(
                    [
                        (m.get_delta_weight(a) - old).float().pow(2).sum()
                        for (m, a), old in zip(mods, deltas, strict=True)
                    ]
                ).sum()
                if mods
                else torch.zeros((), device=self._w_norm.device)
                for mods, deltas in zip(self.adapted, self._deltas, strict=True)
            ]
        ).sqrt()
        ratio = torch.where(self._w_norm > 0, moved / self._w_norm.clamp_min(1e-30), 0.0)
        self.ratio_before = self.ratio_after = ratio
        self.steps += 1
        self._pending.append(torch.stack([ratio, ratio]))

    @staticmethod
    def _effective_norm(
        block: nn.Module, mods: list[tuple[nn.Module, str]], deltas: list[torch.Tensor]
    ) -> torch.Tensor:
        """‖W_eff‖ over every weight of the block, each adapted base weight counted as W0 + s·B·A."""
        squares = sum(
            p.detach().float().pow(2).sum() for name, p in block.named_parameters() if "lora_" not in name
        )
        for (m, _), delta in zip(mods, deltas, strict=True):
            base = m.base_layer.weight.detach().float()
            squares = squares - base.pow(2).sum() + (base + delta.float()).pow(2).sum()
        return squares.sqrt()

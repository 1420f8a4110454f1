"""LoRA through `peft`: low-rank adapters on chosen blocks and modules; everything else pretrained is frozen.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the model object, its blocks and the
depth-profile hooks stay the same. A new task head (cls, tok) stays trainable. Measurement sees the
adapted model: captures run through the adapters, and weight_rel counts each adapted weight merged
(W + scale * B @ A), so LoRA runs are comparable with full fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from locality.controls.base import Control


class LoRA(Control):
    name = "lora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        targets: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
    ):
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"lora rank={rank!r} must be an integer >= 1 (e.g. 8).")
        if not alpha > 0:
            raise ValueError(f"lora alpha={alpha!r} must be > 0 (e.g. 2 * rank).")
        if not 0 <= dropout < 1:
            raise ValueError(f"lora dropout={dropout!r} must be in [0, 1).")
        if layers is not None and len(layers) == 0:
            raise ValueError("lora layers=[] adapts nothing; give block indices or null for every block.")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.targets = list(targets) if targets else None
        self.layers = list(layers) if layers is not None else None
        self.adapted: list[str] = []

    def check_model(self, n_blocks: int) -> None:
        bad = [i for i in self.layers or [] if not -n_blocks <= i < n_blocks]
        if bad:
            raise ValueError(
                f"lora layers {bad} are out of range: the model has {n_blocks} blocks "
                f"(0..{n_blocks - 1}, or -1..-{n_blocks} from the top)."
            )

    def check_blocks(self, blocks: nn.ModuleList) -> None:
        self._chosen(blocks)

    def _chosen(self, blocks: nn.ModuleList) -> list[nn.Module]:
        """The linear layers to adapt, inside the chosen blocks; every target must name one of them."""
        n_blocks = len(blocks)
        self.check_model(n_blocks)
        layers = range(n_blocks) if self.layers is None else sorted({i % n_blocks for i in self.layers})
        linears = [(name, sub) for i in layers for name, sub in blocks[i].named_modules() if _is_linear(sub)]
        found = {name.split(".")[-1] for name, _ in linears}
        missing = [t for t in self.targets or [] if t not in found]
        if missing or not linears:
            raise ValueError(
                f"lora targets {missing or self.targets} name no linear layer of blocks {list(layers)}; their "
                f"linear layers are: {', '.join(sorted(found)) or 'none'} (targets match the last part of a name)."
            )
        return [sub for name, sub in linears if self.targets is None or name.split(".")[-1] in self.targets]

    def _target_names(self, module) -> list[str]:
        """Full names (relative to the HF model) of the linear layers to adapt, inside the chosen blocks."""
        names = {id(m): n for n, m in module.model.named_modules()}
        return [names[id(sub)] for sub in self._chosen(module.blocks)]

    def configure_model(self, module) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.adapted = self._target_names(module)
        config = LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.adapted
        )
        inject_adapter_in_model(config, module.model)
        for name, param in module.model.named_parameters():
            param.requires_grad = "lora_" in name

    def summary(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "adapted_modules": len(self.adapted)}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D)

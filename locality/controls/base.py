"""The control interface: a Lightning callback plus three optional hooks that `LocalityModule` calls.

A control changes *how* fine-tuning proceeds (which parameters move, how far, how fast) without
changing the objective. Most controls only need Lightning's callback hooks; three things cannot be
done from a callback, so the module asks every control for them:

- `configure_model(module)`: called once, before optimizers exist (freeze blocks, insert LoRA).
- `param_groups(module, groups)`: rewrite the optimizer's parameter groups (layer-wise LR decay).
- `penalty(module)`: an extra loss term added to the objective's loss (L2-SP).
- `summary()`: numbers for results.json (e.g. the energy at LP-FT's switch).

Arguments are checked twice before any work: the constructor refuses values that are wrong for every
model (a negative rank), `check_model(n_blocks)` refuses those wrong for this model (block 7 of 4) from the
model's config alone, and `check_blocks(blocks)` those its module tree decides (a LoRA target no block has),
on a skeleton without weights; all before weights are loaded (`locality.run.checks.preflight`).

`configure_model` runs before Lightning restores a checkpoint, so anything captured there (e.g. the
pretrained anchor of L2-SP) is the pretrained state even when a run resumes.

What a control may rely on from the module is `ControlledModule` below, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from lightning.pytorch import Callback
from torch import nn


class ControlledModule(Protocol):
    """The module as controls see it (`locality.run.module.LocalityModule` implements it)."""

    @property
    def blocks(self) -> nn.ModuleList:
        """The residual blocks in depth order."""

    @property
    def parts(self) -> dict[str, nn.Module]:
        """The other named parts: "embeddings", "final_norm", "head" (any may be absent)."""

    @property
    def model(self) -> nn.Module:
        """The whole Hugging Face model (what LoRA injects adapters into)."""

    @property
    def pretrained(self) -> nn.Module:
        """The pretrained network without a new task head (what L2-SP anchors)."""

    @property
    def optimizer_settings(self) -> Mapping[str, float]:
        """The configured optimizer's base settings: at least `lr` and `weight_decay`."""


class Control(Callback):
    """Base class of every control; each hook defaults to "do nothing"."""

    name: str = "control"
    # True if the control reads the training metrics (trainer.callback_metrics "train/acc") after every step;
    # otherwise the module computes them only on the steps that log them (every `log_every_n_steps`).
    reads_step_metrics: bool = False
    # True if the control is tested under FSDP2 (trainer=fsdp), where parameters are DTensor shards: controls
    # that keep copies of the weights or rewrite the forward are refused there before any work.
    supports_sharding: bool = False

    def check_model(self, n_blocks: int) -> None:
        """Raise ValueError if an argument does not fit a model with `n_blocks` blocks (before it is loaded)."""

    def check_blocks(self, blocks: nn.ModuleList) -> None:
        """Raise ValueError if an argument names something the blocks do not have (a LoRA target). The
        blocks are a skeleton on the meta device: their structure is real, their weights are not."""

    def check_steps(self, max_steps: int) -> None:
        """Raise ValueError if an argument leaves nothing of a run of `max_steps` optimizer steps to train."""

    def configure_model(self, module: ControlledModule) -> None:
        """Change the model before the optimizer is built (e.g. freeze parameters, add adapters)."""

    def param_groups(self, module: ControlledModule, groups: list[dict]) -> list[dict]:
        """Return the optimizer parameter groups, possibly rewritten (e.g. per-layer learning rates)."""
        return groups

    def penalty(self, module: ControlledModule) -> torch.Tensor | None:
        """An extra term added to the training loss, or None."""
        return None

    def summary(self) -> dict:
        """What the control did, for results.json's "controls" entry (e.g. LP-FT's energy at the switch)."""
        return {}

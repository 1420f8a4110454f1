"""The control interface: a Lightning callback plus three optional hooks that `LocalityModule` calls.

A control changes *how* fine-tuning proceeds (which parameters move, how far, how fast) without
changing the objective. Most controls only need Lightning's callback hooks; three things cannot be
done from a callback, so the module asks every control for them:

- `configure_model(module)`: called once, before optimizers exist (freeze blocks, insert LoRA).
- `param_groups(module, groups)`: rewrite the optimizer's parameter groups (layer-wise LR decay).
- `penalty(module)`: an extra loss term added to the objective's loss (L2-SP).
- `summary()`: numbers for results.json (e.g. the energy at LP-FT's switch).

Arguments are checked twice before any work: the constructor refuses values that are wrong for every
model (a negative rank), and `check_model(n_blocks)` refuses those wrong for this model (block 7 of 4),
from the model's config alone, before weights are loaded (`locality.checks.preflight`).

`configure_model` runs before Lightning restores a checkpoint, so anything captured there (e.g. the
pretrained anchor of L2-SP) is the pretrained state even when a run resumes.

What a control may rely on from the module (see `locality.module.LocalityModule`):
`module.blocks` (ordered residual blocks, depth order), `module.parts` (dict of the other named parts:
"embeddings", "final_norm", "head"; any may be absent), `module.model` (the Hugging Face model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from lightning.pytorch import Callback

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule


class Control(Callback):
    """Base class of every control; each hook defaults to "do nothing"."""

    name: str = "control"

    def check_model(self, n_blocks: int) -> None:
        """Raise ValueError if an argument does not fit a model with `n_blocks` blocks (before it is loaded)."""

    def configure_model(self, module: LightningModule) -> None:
        """Change the model before the optimizer is built (e.g. freeze parameters, add adapters)."""

    def param_groups(self, module: LightningModule, groups: list[dict]) -> list[dict]:
        """Return the optimizer parameter groups, possibly rewritten (e.g. per-layer learning rates)."""
        return groups

    def penalty(self, module: LightningModule) -> torch.Tensor | None:
        """An extra term added to the training loss, or None."""
        return None

    def summary(self) -> dict:
        """What the control did, for results.json's "controls" entry (e.g. LP-FT's energy at the switch)."""
        return {}

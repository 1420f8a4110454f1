"""`LocalityModule`: a Hugging Face backbone plus an objective, trained with the configured optimizer and schedule.

It exposes the backbone's depth to controls and measurement under one naming scheme:
`module.blocks` (residual blocks in depth order) and `module.parts` (embeddings, final_norm, head, and
unused; placed by where the forward runs them, see `Backbone.part_names`).
Controls may rewrite the model before the optimizer exists, the parameter groups, and add a penalty
to the loss (see `locality.controls.base.Control`); they see the module through `ControlledModule`.

The optimizer and the schedule come from config as factories (`conf/optim`, `conf/scheduler`: `_partial_`
targets): `optimizer(param_groups)` and `scheduler(optimizer, total_steps)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import lightning as L
import torch
from torch import nn

from locality.backbones import Backbone
from locality.controls.base import Control
from locality.core.errors import UserError
from locality.objectives import Objective
from locality.run.optim_groups import decay_split
from locality.run.sharding import shard_module


class LocalityModule(L.LightningModule):
    def __init__(
        self,
        backbone: Backbone,
        objective: Objective,
        optimizer: partial[torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler] | None = None,
        controls: Sequence[Control] = (),
        compile: bool | str = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.model = backbone.model
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.controls = list(controls)
        self.train_metrics = objective.metrics().clone(prefix="train/")
        self.val_metrics = objective.metrics().clone(prefix="val/")
        self.compile_backend = "inductor" if compile is True else (compile or None)
        self._models_configured = False

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    @property
    def parts(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = dict(self.backbone.parts())
        head = getattr(self.objective, "head", None)
        if head is None:
            head = self.model.get_output_embeddings()  # LM objectives reuse the pretrained LM head
        if head is not None:
            parts["head"] = head
        return parts

    @property
    def pretrained(self) -> nn.Module:
        return self.backbone.base

    @property
    def optimizer_settings(self) -> Mapping[str, float]:
        """The optimizer's configured keyword arguments (lr, weight_decay, ...), as controls read them."""
        return {"weight_decay": 0.0, **self.optimizer_factory.keywords}

    def configure_model(self) -> None:
        """The controls rewrite the model (LoRA, freezing); then, with `trainer.compile`, each block's forward
        is compiled, and under FSDP2 (`trainer=fsdp`) the model is sharded one block at a time
        (`locality.run.sharding`)."""
        if not self._models_configured:  # Lightning may call this again on resume
            for control in self.controls:
                control.configure_model(self)
            if self.compile_backend is not None:
                self._compile_blocks(self.compile_backend)
            if self._device_mesh is not None:  # set by Lightning's ModelParallelStrategy
                shard_module(self, self._device_mesh, getattr(self.trainer.strategy, "plan", None))
            self._models_configured = True

    def _compile_blocks(self, backend: str) -> None:
        """`torch.compile` each block's `forward` (`trainer.compile`): hooks on the block (capture, FSDP2's
        gathers, activation checkpointing) run around the compiled code, and identical blocks share one
        compiled graph. Measurement before training runs before this, on the eager model."""
        for block in self.blocks:
            block.forward = torch.compile(block.forward, backend=backend)

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.objective(self.model, batch)

    def training_step(self, batch, batch_idx):
        out = self(batch)
        loss = out.loss
        for control in self.controls:
            extra = control.penalty(self)
            if extra is not None:
                self.log(f"train/{control.name}_penalty", extra.detach())
                loss = loss + extra
        # On the progress bar only when there is one: Lightning turns progress-bar values into Python floats
        # after every step, a host sync on a GPU.
        self.log("train/loss", out.loss.detach(), prog_bar=self.trainer.progress_bar_callback is not None)
        if self._train_metrics_wanted():
            self.train_metrics(out.predicted(), out.target)
            self.log_dict(self.train_metrics, on_step=True, on_epoch=False)
        return loss

    def _train_metrics_wanted(self) -> bool:
        """The training metrics are per-step values that reach the loggers every `log_every_n_steps`: on the
        other steps they are computed only if a control reads them (`Control.reads_step_metrics`). This saves a
        torchmetrics update per step (input checks that sync with a GPU) and changes no logged value."""
        if self._trainer is None or any(c.reads_step_metrics for c in self.controls):
            return True
        # Lightning's test for "log this step" (its logger connector's should_update_logs), from public state:
        # asked before the step counter moves on, so the step about to be logged is global_step + 1
        trainer = self.trainer
        every = trainer.log_every_n_steps
        return every > 0 and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        self.val_metrics.update(out.predicted(), out.target)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True)

    def param_groups(self) -> list[dict]:
        """Weight decay on the weight matrices of linear and conv layers only (backbone and task head alike;
        see `locality.run.optim_groups`); then every control may rewrite the groups."""
        decay, no_decay = decay_split(self)
        groups = [
            {"params": list(decay.values()), "weight_decay": self.optimizer_settings["weight_decay"]},
            {"params": list(no_decay.values()), "weight_decay": 0.0},
        ]
        for control in self.controls:
            groups = control.param_groups(self, groups)
        groups = [g for g in groups if g["params"]]
        if not groups:
            names = ", ".join(c.name for c in self.controls) or "none"
            raise UserError(
                f"Nothing is left to train: the controls ({names}) froze every parameter. Free some (e.g. "
                "control.freeze.bottom below the number of blocks, or control.freeze.embeddings=false)."
            )
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

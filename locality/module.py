"""`LocalityModule`: a Hugging Face backbone plus an objective, trained with AdamW and a warmup/decay schedule.

It exposes the backbone's depth to controls and measurement under one naming scheme:
`module.blocks` (residual blocks in depth order) and `module.parts` (embeddings, final_norm, head, and
unused; placed by where the forward runs them, see `Backbone.part_names`).
Controls may rewrite the model before the optimizer exists, the parameter groups, and add a penalty
to the loss (see `locality.controls.base.Control`).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import nn
from transformers import get_scheduler

from locality.backbones import Backbone
from locality.controls.base import Control
from locality.objectives import Objective
from locality.optim_groups import decay_split


class LocalityModule(L.LightningModule):
    def __init__(self, backbone: Backbone, objective: Objective, optim, controls: Sequence[Control] = ()):
        super().__init__()
        self.backbone = backbone
        self.model = backbone.model
        self.objective = objective
        self.optim = optim
        self.controls = list(controls)
        self.train_metrics = objective.metrics().clone(prefix="train/")
        self.val_metrics = objective.metrics().clone(prefix="val/")
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

    def configure_model(self) -> None:
        if not self._models_configured:  # Lightning may call this again on resume
            for control in self.controls:
                control.configure_model(self)
            self._models_configured = True

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
        self.train_metrics(out.preds, out.target)
        self.log("train/loss", out.loss.detach(), prog_bar=True)
        self.log_dict(self.train_metrics, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        self.val_metrics.update(out.preds, out.target)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True)

    def param_groups(self) -> list[dict]:
        """AdamW groups: weight decay on the weight matrices of linear and conv layers only (backbone and task
        head alike; see `locality.optim_groups`); then every control may rewrite them."""
        decay, no_decay = decay_split(self)
        groups = [
            {"params": list(decay.values()), "weight_decay": self.optim.weight_decay},
            {"params": list(no_decay.values()), "weight_decay": 0.0},
        ]
        for control in self.controls:
            groups = control.param_groups(self, groups)
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.param_groups(), lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps
        )
        total = self.trainer.estimated_stepping_batches
        warmup = round(self.optim.warmup * total) if self.optim.warmup < 1 else int(self.optim.warmup)
        scheduler = get_scheduler(
            self.optim.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

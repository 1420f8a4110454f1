"""Build the Lightning Trainer from `conf/trainer` (its `_target_` and arguments) with the run's callbacks.

Every key of the trainer config but `ckpt_every_n_steps`, `keep_checkpoint` (last | none: whether the
checkpoints stay once results.json is written), `matmul_precision` (float32 matmuls:
`torch.set_float32_matmul_precision`) and `compile` (`LocalityModule`'s) is a `lightning.Trainer` argument; the run supplies
`default_root_dir`, `logger` and `callbacks`: non-finite-loss stopping first, then the run's callbacks, then
checkpointing (every `ckpt_every_n_steps` optimizer steps, keeping the previous checkpoint until the new one
is complete).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from locality.core.components import instantiate_component
from locality.run.faults import StopOnNonFiniteLoss
from locality.run.resume import KeepPreviousCheckpoint
from locality.run.rundir import RunDir

OWN_KEYS = (
    "ckpt_every_n_steps",
    "keep_checkpoint",
    "matmul_precision",
    "compile",
)  # locality's, not the Trainer's
KEEP_CHECKPOINT = ("last", "none")
SUPPLIED = ("default_root_dir", "logger", "callbacks")


def build_trainer(
    cfg: DictConfig, run: RunDir, callbacks: list[Callback], logger: Logger | bool
) -> L.Trainer:
    torch.set_float32_matmul_precision(cfg.matmul_precision)  # "high": TF32 matmuls on GPUs that have them
    checkpoint = KeepPreviousCheckpoint(
        dirpath=run.checkpoints, save_last=True, save_top_k=0, every_n_train_steps=cfg.ckpt_every_n_steps
    )
    stop = StopOnNonFiniteLoss(
        check_every=math.gcd(cfg.ckpt_every_n_steps, cfg.log_every_n_steps), checkpoints=run.checkpoints
    )
    bar = (
        []
        if not cfg.enable_progress_bar or any(isinstance(c, ProgressBar) for c in callbacks)
        else [StepBar()]
    )
    return instantiate_component(
        cfg,
        "trainer",
        extra_keys=OWN_KEYS,
        default_root_dir=run.path,
        logger=logger,
        callbacks=[stop, *callbacks, checkpoint, *bar],
    )


class StepBar(TQDMProgressBar):
    """One bar over the run's optimizer steps (`step 40/100`), not one per epoch: a run is step-based
    (max_steps, max_epochs=-1), so Lightning's `Epoch 1/-2` says nothing. A run without max_steps keeps
    Lightning's epoch bar."""

    @property
    def train_description(self) -> str:
        return "step" if self.trainer.max_steps > 0 else super().train_description

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch of this fit (a resumed run starts part way)
            bar.reset(total=trainer.max_steps)
            bar.n = trainer.global_step
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        """The logged progress-bar values, without the logger's version (`v_num`: the run directory names it)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar.n != step and (step % self.refresh_rate == 0 or step == trainer.max_steps):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

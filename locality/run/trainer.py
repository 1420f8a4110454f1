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
from lightning.pytorch.callbacks import Callback
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
    return instantiate_component(
        cfg,
        "trainer",
        extra_keys=OWN_KEYS,
        default_root_dir=run.path,
        logger=logger,
        callbacks=[stop, *callbacks, checkpoint],
    )

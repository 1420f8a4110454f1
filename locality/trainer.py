"""Build the Lightning Trainer and its logger from `conf/trainer` and `conf/logger`.

W&B is offline unless the user configured otherwise (logger.offline=false or WANDB_MODE=online), and a
W&B failure never kills a run: we fall back to the CSV logger with a warning.
"""

from __future__ import annotations

import os
import warnings

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from locality.rundir import RunDir


def _csv_logger(run: RunDir) -> CSVLogger:
    return CSVLogger(save_dir=run.path, name="csv", version="")


def build_logger(cfg, run: RunDir, run_name: str, config: dict, group: str | None = None,
                 job_type: str = "train", tags: list[str] = ()) -> Logger | bool:
    """The configured logger. On W&B a sweep's runs share one group (the sweep name unless logger.group is
    set), `job_type` is the control, and tags name the family, block type and scale band."""
    if cfg.kind == "none":
        return False
    if cfg.kind == "csv":
        return _csv_logger(run)
    if cfg.kind != "wandb":
        raise ValueError(f"logger.kind must be wandb, csv or none, not {cfg.kind!r}")
    try:
        from lightning.pytorch.loggers import WandbLogger

        offline = cfg.offline and os.environ.get("WANDB_MODE") != "online"
        return WandbLogger(name=run_name, id=run.path.name, project=cfg.project, entity=cfg.entity,
                           save_dir=str(run.path), offline=offline, group=cfg.group or group,
                           tags=[*cfg.tags, *tags], config=config, job_type=job_type)
    except Exception as err:  # never let W&B kill a run
        warnings.warn(f"W&B logger unavailable ({err}); logging to CSV instead.", stacklevel=2)
        return _csv_logger(run)


def build_trainer(cfg, run: RunDir, callbacks: list[Callback], logger: Logger | bool) -> L.Trainer:
    checkpoint = ModelCheckpoint(dirpath=run.checkpoints, save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.ckpt_every_n_steps)
    return L.Trainer(
        default_root_dir=run.path,
        max_steps=cfg.max_steps,
        max_epochs=cfg.max_epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
        gradient_clip_val=cfg.gradient_clip_val,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        log_every_n_steps=cfg.log_every_n_steps,
        val_check_interval=cfg.val_check_interval,
        check_val_every_n_epoch=cfg.check_val_every_n_epoch,
        num_sanity_val_steps=0,
        enable_progress_bar=cfg.enable_progress_bar,
        enable_model_summary=False,
        deterministic=cfg.deterministic,
        logger=logger,
        callbacks=[*callbacks, checkpoint],
    )


def finish_wandb() -> None:
    """Close any W&B run this process opened (Lightning never does; sweeps would reuse it)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        try:
            wandb.finish()
        except Exception as err:
            warnings.warn(f"wandb.finish() failed: {err}", stacklevel=2)

"""Build the Lightning Trainer and its logger from `conf/trainer` and `conf/logger`.

W&B is offline unless the user configured otherwise (logger.offline=false or WANDB_MODE=online), and a
W&B failure never kills a run: W&B is started when the logger is built, with a short timeout, and any
failure there (no API key, no network) is reported once and the run logs to CSV instead.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from locality.faults import StopOnNonFiniteLoss
from locality.resume import AppendingCSVLogger, KeepPreviousCheckpoint
from locality.rundir import RunDir

WANDB_INIT_TIMEOUT_S = 8  # how long a run may wait for W&B to start before it falls back to CSV


def _csv_logger(run: RunDir) -> AppendingCSVLogger:
    """csv/metrics.csv; a resumed run appends to it (locality.resume)."""
    return AppendingCSVLogger(save_dir=run.path, name="csv", version="")


def build_logger(
    cfg,
    run: RunDir,
    run_name: str,
    config: dict,
    group: str | None = None,
    job_type: str = "train",
    tags: list[str] = (),
) -> Logger | bool:
    """The configured logger. On W&B a sweep's runs share one group (the sweep name unless logger.group is
    set), `job_type` is the control, and tags name the family, block type and scale band."""
    if cfg.kind == "none":
        return False
    if cfg.kind == "csv":
        return _csv_logger(run)
    if cfg.kind != "wandb":
        raise ValueError(f"logger.kind must be wandb, csv or none, not {cfg.kind!r}")
    try:
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        offline = cfg.offline and os.environ.get("WANDB_MODE") != "online"
        logger = WandbLogger(
            name=run_name,
            id=run.path.name,
            project=cfg.project,
            entity=cfg.entity,
            save_dir=str(run.path),
            offline=offline,
            group=cfg.group or group,
            tags=[*cfg.tags, *tags],
            config=config,
            job_type=job_type,
            settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S),
        )
        logger.experiment  # noqa: B018 - start W&B now, where a failure can fall back, not inside fit
        return logger
    except Exception as err:  # no key, no network, a broken install: never let W&B kill a run
        finish_wandb(teardown=True)  # a later run in this process (a sweep worker) starts W&B afresh
        message = " ".join(str(err).split())[:300]
        print(
            f"locality: W&B is unavailable ({type(err).__name__}: {message}); this run logs to "
            f"{run.path / 'csv'} instead and its results are unaffected.",
            file=sys.stderr,
        )
        return _csv_logger(run)


def build_trainer(cfg, run: RunDir, callbacks: list[Callback], logger: Logger | bool) -> L.Trainer:
    checkpoint = KeepPreviousCheckpoint(
        dirpath=run.checkpoints, save_last=True, save_top_k=0, every_n_train_steps=cfg.ckpt_every_n_steps
    )
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
        callbacks=[
            StopOnNonFiniteLoss(check_every=math.gcd(cfg.ckpt_every_n_steps, cfg.log_every_n_steps)),
            *callbacks,
            checkpoint,
        ],
    )


def finish_wandb(teardown: bool = False) -> None:
    """Close any W&B run this process opened (Lightning never does; sweeps would reuse it); `teardown` also
    stops W&B's service process, whose settings (endpoint, key) would otherwise outlive a failed start."""
    try:
        import wandb
    except ImportError:
        return
    try:
        if wandb.run is not None:
            wandb.finish()
        if teardown:
            wandb.teardown()
    except Exception as err:  # noqa: BLE001 -- closing W&B must never fail a run
        warnings.warn(f"closing W&B failed: {err}", stacklevel=2)

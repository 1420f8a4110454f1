"""Loggers, built from `conf/logger/<name>.yaml`: a `_target_` function taking the run (`RunInfo`, supplied by
the framework) and the yaml's keys. Adding one is a function here (or in any module) plus its yaml.

W&B is offline unless the user configured otherwise (logger.offline=false or WANDB_MODE=online), and a
W&B failure never kills a run: W&B is started when the logger is built, with a short timeout, and any
failure there (no API key, no network) is reported once and the run logs to CSV instead.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning.pytorch.loggers import Logger

from locality.run.resume import AppendingCSVLogger
from locality.run.rundir import RunDir

WANDB_INIT_TIMEOUT_S = 8  # how long a run may wait for W&B to start before it falls back to CSV


@dataclass
class RunInfo:
    """What every logger may use: where the run lives, its name and config, and how it sits in a study."""

    run: RunDir
    name: str
    config: dict
    sweep: str | None = None  # the sweep's name: runs of one sweep share a W&B group
    job_type: str = "train"  # the control
    tags: list[str] = field(default_factory=list)  # family, block type, scale band


def csv_logger(info: RunInfo) -> AppendingCSVLogger:
    """csv/metrics.csv in the run directory; a resumed run appends to it (locality.run.resume)."""
    return AppendingCSVLogger(save_dir=info.run.path, name="csv", version="")


def no_logger(info: RunInfo) -> bool:
    """No metric logger (results.json is written regardless)."""
    return False


def wandb_logger(
    info: RunInfo,
    project: str = "locality",
    entity: str | None = None,
    offline: bool = True,
    group: str | None = None,
    tags: Sequence[str] = (),
) -> Logger:
    """W&B with the run directory's name as its id; a sweep's runs share one group (the sweep name unless
    `group` is set), `job_type` is the control, and tags name the family, block type and scale band."""
    try:
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        mode = "offline" if offline and os.environ.get("WANDB_MODE") != "online" else None
        run = wandb.init(  # started here, where a failure can fall back, not inside fit
            name=info.name,
            id=info.run.path.name,
            project=project,
            entity=entity,
            dir=str(info.run.path),
            mode=mode,
            resume="allow",
            group=group or info.sweep,
            tags=[*tags, *info.tags],
            config=info.config,
            job_type=info.job_type,
            settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S),
        )
        # Lightning logs each step under trainer/global_step; W&B plots every metric against it
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        # Given the run, Lightning passes none of its own arguments to wandb.init (its `anonymous=None`
        # would make W&B warn that "the anonymous setting has no effect")
        return WandbLogger(
            experiment=run, project=project, save_dir=str(info.run.path), offline=mode == "offline"
        )
    except Exception as err:  # no key, no network, a broken install: never let W&B kill a run
        finish_wandb(teardown=True)  # a later run in this process (a sweep worker) starts W&B afresh
        message = " ".join(str(err).split())[:300]
        print(
            f"locality: W&B is unavailable ({type(err).__name__}: {message}); this run logs to "
            f"{info.run.path / 'csv'} instead and its results are unaffected.",
            file=sys.stderr,
        )
        return csv_logger(info)


def finish_wandb(teardown: bool = False) -> None:
    """Close any W&B run this process opened (Lightning never does; sweeps would reuse it); `teardown` also
    stops W&B's service process, whose settings (endpoint, key) would otherwise outlive a failed start."""
    if "wandb" not in sys.modules:
        return
    import wandb

    try:
        if wandb.run is not None:
            wandb.finish()
        if teardown:
            wandb.teardown()
    except Exception as err:  # noqa: BLE001 -- closing W&B must never fail a run
        warnings.warn(f"closing W&B failed: {err}", stacklevel=2)

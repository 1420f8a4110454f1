"""Resume equals uninterrupted: what a checkpoint holds besides Lightning's own state, and how a relaunch
picks it up.

Lightning's checkpoint holds the weights, the optimizer and scheduler, the loop counters and every
callback's `state_dict()`. Each stateful locality callback saves its own state there (the equal-step and
update-ratio history, the dynamics captures, LP-FT's phase); the train loader saves its position
(`locality.data.datamodule.ResumableLoader`). This module adds the rest:

- `RunState`, a callback: the random number generators (torch CPU, CUDA when in use, numpy, python's
  `random`), the wall time spent so far and the global steps at which the run was resumed. The RNG states
  are captured when the checkpoint is written and put back in `on_train_start`, after Lightning has
  restored everything else and before the first resumed batch is fetched, so the resumed run draws the same
  dropout masks (and MLM masks) as an uninterrupted one. It also hands the train loader its saved position
  (Lightning itself skips that when the loader was built before the restore) and tells the CSV log where the
  new segment starts.
- `AppendingCSVLogger`: a relaunch continues `csv/metrics.csv` instead of deleting it; rows the interrupted
  attempt logged after its last checkpoint (work that is redone) are dropped, so the file holds every step
  once, as in an uninterrupted run.
- `KeepPreviousCheckpoint`: a new `last.ckpt` takes its place only after the rows logged before it are on
  disk, and the one it replaces is kept as `previous.ckpt`, the way out when `last.ckpt` is damaged (see
  `locality.run.rundir.RunDir.check_checkpoint`).

In a multi-process run every rank starts from the same seed and draws the same numbers, so rank zero's
generator states (the ones in the checkpoint) are restored on every rank. Random draws inside data-loader
worker processes (`data.num_workers > 0` with a random collate, e.g. MLM masking) restart with each epoch's
worker seeds and are not restored mid-epoch.
"""

from __future__ import annotations

import csv
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from locality.core.integrity import sha256_of, sidecar, write_checksum
from locality.run.rundir import remove_checkpoint

PREVIOUS_CHECKPOINT = "previous.ckpt"
PENDING_CHECKPOINT = "pending.ckpt"  # written, not yet in place as last.ckpt (KeepPreviousCheckpoint)


def rng_state() -> dict[str, Any]:
    """Every global random number generator a training step may draw from, in a form `torch.load` accepts
    with `weights_only=True` (tensors, ints, tuples)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(
                f"the checkpoint holds the CUDA generator states of {len(state['cuda'])} devices, this "
                f"machine has {torch.cuda.device_count()}: CUDA random draws (dropout) will differ from "
                "an uninterrupted run.",
                stacklevel=2,
            )


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


class RunState(Callback):
    """RNG states, wall time over all segments of a run, and the steps it was resumed at (see the module doc).

    `started` is `time.perf_counter()` at the start of this segment. `wall_s` = the time of this segment plus
    that of the earlier segments up to the checkpoint this one resumed from (work after an interrupted
    segment's last checkpoint is redone, and counted once). `resumed_from_steps`: the global step of every
    resume, oldest first; empty for a run that was never interrupted.
    """

    def __init__(self, started: float | None = None):
        self.started = time.perf_counter() if started is None else started
        self.earlier_s = 0.0
        self.resumed_from_steps: list[int] = []
        self._rng: dict | None = None
        self._loader: dict | None = None
        self._segment_started = False
        self._trainer = None

    @property
    def wall_s(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        state = {
            "rng": rng_state(),
            "wall_s": self.wall_s,
            "resumed_from_steps": list(self.resumed_from_steps),
        }
        loader = _train_loader(self._trainer)
        if loader is not None:
            state["train_loader"] = loader.state_dict()
        return state

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self.resumed_from_steps.append(int(checkpoint.get("global_step", 0)))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        resumed_at = self.resumed_from_steps[-1:]  # on_load_checkpoint runs first
        self.resumed_from_steps = [*state_dict.get("resumed_from_steps", []), *resumed_at]
        self.earlier_s = float(state_dict.get("wall_s", 0.0))
        self._rng = state_dict.get("rng")
        self._loader = state_dict.get("train_loader")

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning has restored the loops, optimizers and callbacks; no batch of this segment is fetched yet.
        loader = _train_loader(trainer)
        if self._loader is not None and loader is not None:
            loader.load_state_dict(self._loader)
        if self._rng is not None:
            set_rng_state(self._rng)
        self._rng = self._loader = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._segment_started:
            return
        self._segment_started = True
        # Rows are logged on Lightning's step axis: this segment logs from this step on; an earlier attempt's
        # rows from here on are work that is being redone.
        step = trainer.global_step  # Lightning's logging step: the batches that stepped the optimizer
        for logger in trainer.loggers:
            if isinstance(logger, AppendingCSVLogger):
                logger.start_segment(step)


def _train_loader(trainer):
    """The train loader when it is resumable (`state_dict`/`load_state_dict`), else None."""
    if trainer is None:
        return None
    loader = trainer.train_dataloader  # one loader here; several would come as a list or dict
    return loader if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict") else None


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one continues it (header included)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])

    def start_segment(self, step: int) -> None:
        """Drop the rows logged at `step` or later (an interrupted attempt's work after its checkpoint)."""
        self.save()
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            fields = reader.fieldnames or []
            rows = list(reader)
        kept = [row for row in rows if not row.get("step") or float(row["step"]) < step]
        if len(kept) == len(rows):
            return
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)


class AppendingCSVLogger(CSVLogger):
    """`CSVLogger` whose metrics.csv survives a relaunch: one file with every step of every segment."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def start_segment(self, step: int) -> None:
        self.experiment.start_segment(step)


class KeepPreviousCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose `last.ckpt` is never ahead of the logs, and never the only copy.

    Lightning saves a step's checkpoint in `on_train_batch_end`, before it logs that step's training metrics,
    and CSV rows logged straight to a logger wait in memory for the next flush. A kill in that window used to
    leave a `last.ckpt` for step S while metrics.csv lacked rows of steps before S, which the relaunch never
    logs again. So a new last.ckpt is written as `pending.ckpt` and moved into place at the next hook (the
    next batch, validation, epoch, the end of training or an exception), after the loggers have written what
    they hold. The `last.ckpt` it replaces becomes `previous.ckpt` (renames, no copy): when a kill cuts a
    write short, the checkpoint before it survives untouched."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._complete: Path | None = None  # a pending.ckpt whose write returned, not yet in place

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's own key: checkpoints written before this subclass existed resume the same way.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        last = Path(filepath)
        if last.name != self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION:
            super()._save_checkpoint(trainer, filepath)
            return
        pending = last.with_name(PENDING_CHECKPOINT)
        self._complete = None
        if trainer.is_global_zero and pending.exists():  # a killed attempt's: shards must not mix with it
            remove_checkpoint(pending)
        super()._save_checkpoint(trainer, str(pending))  # a multi-process save syncs the ranks first
        self._complete = pending  # only a write that returned is ever put in place
        self._last_checkpoint_saved = filepath

    def _commit(self, trainer) -> None:
        """Flush the loggers, then put a pending checkpoint in place as last.ckpt (previous.ckpt keeps the old)."""
        pending, self._complete = self._complete, None
        if pending is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.save()
        last = pending.with_name(self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        digest = sha256_of(pending) if pending.is_file() else None  # a folder of shards: no checksum
        if last.exists():
            previous = last.with_name(PREVIOUS_CHECKPOINT)
            if previous.is_dir():  # a folder of shards is not replaced by a rename
                remove_checkpoint(previous)
            os.replace(last, previous)
            if sidecar(last).exists():
                os.replace(sidecar(last), sidecar(previous))
            else:
                sidecar(previous).unlink(missing_ok=True)
        sidecar(last).unlink(missing_ok=True)
        os.replace(pending, last)
        if digest is not None:
            write_checksum(last, digest)  # verified before a relaunch resumes from it

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._commit(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._commit(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._commit(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._commit(trainer)  # before the end-of-run measurement: a kill there resumes from the last step

    def on_fit_end(self, trainer, pl_module) -> None:
        self._commit(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._commit(trainer)

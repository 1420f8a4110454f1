"""Faults during a run: stop at the first non-finite loss, before a checkpoint can store broken weights.

A NaN or infinite training loss means every later step, checkpoint and measurement is meaningless (the
weights become NaN after the next update). `StopOnNonFiniteLoss` raises `NonFiniteLoss` in
`on_train_batch_end` of a checkpoint step, which Lightning runs before `ModelCheckpoint` saves, so
`last.ckpt` keeps the last finite weights; `locality.train` then writes failed.json (reason and step) and exits non-zero.
`storage_error` tells a full disk or an unwritable file behind any failure, which `locality.train` reports as
one paragraph naming the checkpoint kept.
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from locality.run.resume import PENDING_CHECKPOINT, PREVIOUS_CHECKPOINT


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float, checkpoint_written: bool = True):
        self.step = step
        kept = (
            "checkpoints/last.ckpt holds the last finite weights"
            if checkpoint_written
            else "no checkpoint had been written yet, so none is kept"
        )
        super().__init__(
            f"the training loss became {loss} at step {step}. Training stopped there; {kept}. Lower optim.lr, keep "
            "trainer.gradient_clip_val, or use float32 parameters (model.dtype=float32) with "
            "trainer.precision=bf16-mixed."
        )


class StopOnNonFiniteLoss(Callback):
    """Checks every step's loss on its device (no host sync) and reads the verdict only when it matters: on
    the steps where a checkpoint may be saved or metrics logged, and at the end. The reported step is the
    first non-finite one, so at most `check_every` steps run on with NaN weights, and none is checkpointed."""

    def __init__(self, check_every: int = 1, checkpoints: Path | None = None):
        self.check_every = max(1, check_every)
        self.checkpoints = checkpoints  # where last.ckpt goes: the message says whether one was kept
        self._first_bad: torch.Tensor | None = None  # step of the first non-finite loss, -1 while all finite
        self._bad_loss: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach()
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
        newly_bad = ~torch.isfinite(loss) & (self._first_bad < 0)
        self._first_bad = torch.where(newly_bad, trainer.global_step, self._first_bad)
        self._bad_loss = torch.where(newly_bad, loss, self._bad_loss)
        step = trainer.global_step
        if step % self.check_every == 0 or step >= (trainer.max_steps or 0) > 0:
            self.check()

    def on_train_end(self, trainer, pl_module):
        self.check()

    def check(self) -> None:
        if self._first_bad is not None and int(self._first_bad) >= 0:
            written = self.checkpoints is None or any(
                (self.checkpoints / name).exists()
                for name in ("last.ckpt", PENDING_CHECKPOINT, PREVIOUS_CHECKPOINT)
            )
            raise NonFiniteLoss(int(self._first_bad), float(self._bad_loss), written)


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def storage_error(error: BaseException) -> OSError | None:
    """The disk-full / read-only / permission error behind a failure, if that is what it was."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None

"""The time a run's phases take: one printed line per phase that prints nothing else while it works, and the
`StepClock` that splits fit time into training batches and the rest (results.json's `timings`).

    locality: pre-capture of 512 probe sequences: 3.1 s (cached)

Rank zero alone prints, to stderr (beside the progress bar; stdout keeps the profile table).
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only


def announce(what: str, seconds: float, note: str | None = None) -> None:
    if rank_zero_only.rank != 0:
        return
    print(f"locality: {what}: {seconds:.1f} s" + (f" ({note})" if note else ""), file=sys.stderr, flush=True)


class StepClock(Callback):
    """Where this segment of a run spends its fit time: `steps_s`, inside the training batches (forward,
    backward, the optimizer step and every step hook: `on_train_batch_start` to `on_train_batch_end`), and
    `train_loop_s`, from the first training batch's start to the end of training (adds data loading between
    batches, logging, checkpoints and in-fit validation). Wall-clock time on the host: on a GPU it counts the
    queued work when the host waits for it, so sums over many steps are right, single steps are not."""

    def __init__(self) -> None:
        self.steps_s = 0.0
        self.train_loop_s = 0.0
        self._batch_started: float | None = None
        self._loop_started: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_started = time.perf_counter()
        if self._loop_started is None:
            self._loop_started = self._batch_started

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_started is not None:
            self.steps_s += time.perf_counter() - self._batch_started
            self._batch_started = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self._loop_started is not None:
            self.train_loop_s = time.perf_counter() - self._loop_started

    def timings(self) -> dict[str, float]:
        return {"steps_s": self.steps_s, "train_loop_s": self.train_loop_s}

"""Learning-rate schedules for `conf/scheduler`: warmup, then any `transformers.get_scheduler` shape.

`warmup` is a fraction of the run's optimizer steps when below 1, else a number of steps. The module calls
the configured partial as `scheduler(optimizer, total_steps)` once the trainer knows the step count.
"""

from __future__ import annotations

import torch
from transformers import get_scheduler


def warmup_then(
    optimizer: torch.optim.Optimizer, total_steps: int, shape: str = "linear", warmup: float = 0.1
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over `warmup` (fraction or steps), then `shape` (a `transformers.SchedulerType` name) to the
    end of `total_steps`."""
    if not (isinstance(warmup, int | float) and warmup >= 0):
        raise ValueError(
            f"warmup={warmup!r} must be a fraction of the steps in [0, 1) or a number of steps >= 1."
        )
    warmup_steps = round(warmup * total_steps) if warmup < 1 else int(warmup)
    return get_scheduler(shape, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)

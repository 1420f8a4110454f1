"""The equal-step control: after every real optimizer update, give every block the same relative step.

Three layers, smallest first (the first in `locality.controls.update_core`):

- `EqualStepCore`: pure torch. Snapshot a list of parameter groups ("layers"), measure each layer's
  relative update r_l = ||ΔW_l|| / ||W_l_old|| after the optimizer has stepped, and (optionally) rescale
  ΔW_l so that every r_l equals one target. Works on plain tensors (single device, DDP) and on FSDP2
  DTensor shards (two all_reduces per step). Usable without Lightning (`core.attach(optimizer)`).
- `UpdateRatioMonitor` (`locality.controls.update_ratios`): a Lightning callback that measures and logs r_l
  for every block and changes nothing, so a `standard` run can log its per-block update ratios too.
- `EqualStep`: the same callback with a target; the control itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from locality.controls.base import Control
from locality.controls.update_core import (
    Target,
    _check_target,
)
from locality.controls.update_ratios import UpdateRatioMonitor

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

DECAY_MODES = ("scaled", "unscaled")
LOW_PRECISION = {"bfloat16", "float16"}


class EqualStep(UpdateRatioMonitor, Control):
    """Equal-step control: after every real update, every block moves by the same relative amount.

    A *layer* is one residual block of `pl_module.blocks`, in depth order. Embeddings, final norm and head
    are left as the optimizer stepped them unless `include` names them ("embeddings", "final_norm",
    "head", looked up in `pl_module.parts`); each named part is then one more layer. Only parameters with
    requires_grad count; a block without any is skipped (the layer order stays rank-independent).

    Per real optimizer step: snapshot W_old (before), then r_l = ||W_l_new - W_l_old|| / ||W_l_old|| over
    all of the block's trainable tensors together, target r* = `target` ("mean" (default), "median",
    "max" over blocks with r_l > 0, or a fixed positive float), and W_l = W_l_old + (r*/r_l) ΔW_l. Blocks
    with r_l = 0 are left alone and do not enter the target. Optimizer state is not touched, so each
    block keeps the optimizer's update direction and only its length changes.

    Hooks. Torch's own `Optimizer.register_step_pre_hook` / `register_step_post_hook`, registered on the
    optimizer that holds the blocks in `on_fit_start` (the first point where Lightning's final optimizers
    exist) and removed in `teardown` / `on_exception`. Lightning has no after-step callback hook, and its
    workarounds (overriding `LightningModule.optimizer_step`, `on_train_batch_end` with a step guard) also
    fire after an fp16 step that the GradScaler skipped. Torch hooks fire only around a real update: the
    control is silent while gradients accumulate and on a skipped fp16 step; it runs after gradient
    clipping (clipping happens before the update) and before the LR scheduler steps, the same under
    32-true, bf16-mixed and 16-mixed, in automatic and manual optimization. (A fused optimizer under a
    GradScaler runs `step()` on an inf step too and skips inside the kernel; the control then sees
    ΔW = 0 everywhere and changes nothing.)

    The snapshot is taken in the pre-hook rather than in `on_before_optimizer_step`: torch itself then
    pairs every snapshot with its rescale (under 16-mixed, `on_before_optimizer_step` also fires for a
    step the scaler will skip), and the core works without Lightning. Outside fp16, Lightning passes the
    closure into `step()`, so the pre-hook runs before forward/backward; W is unchanged until the update
    either way. The snapshot buffers are allocated once and kept, so where the copy happens does not
    change peak memory: one copy of the blocks' trainable parameters, in their own (master) dtype.

    Cost: a handful of multi-tensor ops per step (pre-hook: copy; post-hook: sub (W := ΔW), sums of squares of
    W_old, ΔW and the gradients, one `_foreach_mul_` per block, add (W := W_old + sΔW), sub and sums of
    squares again for the re-measured ratios; see `EqualStepCore._equalize`), per-block sums by a segment sum
    of the stacked per-tensor sums, scales computed on device: no host sync in the hooks. Ratios reach the
    CPU only when logged (or `history` is read).

    Distributed. DDP: every rank computes the same result locally, no communication. FSDP2
    (`fully_shard`, ModelParallelStrategy): local shards, two all_reduces per step over the shard group (a
    [3, n_layers] tensor of sums of squares, then the re-measure); parameters are never gathered. FSDP1 and
    DeepSpeed are refused (their flat parameters split blocks across ranks).

    Logging (every `trainer.log_every_n_steps` real steps, to `trainer.loggers` on Lightning's step axis):
    `equal_step/ratio_before/block_{l:02d}`, `equal_step/ratio_after/block_{l:02d}` (parts under their
    name, e.g. `equal_step/ratio_before/embeddings`), `equal_step/spread_before`, `equal_step/spread_after`
    (max/min over the blocks with r_l > 0). `history` holds every real step's ratios ([steps, 2, layers],
    CPU; columns named by `layer_names`); `steps` counts the real updates; `summary()` condenses them
    for results.json.

    `target=None` measures and logs without changing anything (see `UpdateRatioMonitor`, which logs under
    `update_ratio/`).
    """

    name = "equal_step"
    supports_sharding = True

    def __init__(self, target: Target = "mean", include: Sequence[str] = (), decay: str = "scaled") -> None:
        super().__init__(include=include)
        self.target = _check_target(target)
        if decay not in DECAY_MODES:
            raise ValueError(
                f"EqualStep decay must be one of {DECAY_MODES}, got {decay!r}: scaled equalizes "
                "AdamW's whole update (decay included), unscaled only its gradient part."
            )
        self.decay = decay

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        low = sorted({str(t.dtype).removeprefix("torch.") for t in self.core.tensors} & LOW_PRECISION)
        if low:
            self._remove_hooks()
            raise ValueError(
                f"EqualStep cannot equalize {'/'.join(low)} block parameters: rounding each updated weight to "
                "8 bits of mantissa undoes the rescale (measured: a max/min spread of 1.3-1.8 per step where "
                "float32 gives 1.000001). Keep float32 parameters and compute in bf16: model.dtype=float32 "
                "trainer.precision=bf16-mixed."
            )
        if self.decay == "unscaled":
            self.core.use_decay_from(self._optimizer)

    def summary(self) -> dict:
        return {**super().summary(), "decay": self.decay}

    def _metrics(self, values: list[float]) -> dict[str, float]:
        n = self.core.n_layers
        metrics = {}
        for i, name in enumerate(self.layer_names):
            metrics[f"equal_step/ratio_before/{name}"] = values[i]
            metrics[f"equal_step/ratio_after/{name}"] = values[n + i]
        metrics["equal_step/spread_before"] = values[2 * n]
        metrics["equal_step/spread_after"] = values[2 * n + 1]
        return metrics

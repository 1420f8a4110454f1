"""The equal-step control: after every real optimizer update, give every block the same relative step.

Three layers, smallest first (the first in `locality.controls.equal_step_core`):

- `EqualStepCore`: pure torch. Snapshot a list of parameter groups ("layers"), measure each layer's
  relative update r_l = ||ΔW_l|| / ||W_l_old|| after the optimizer has stepped, and (optionally) rescale
  ΔW_l so that every r_l equals one target. Works on plain tensors (single device, DDP) and on FSDP2
  DTensor shards (two all_reduces per step). Usable without Lightning (`core.attach(optimizer)`).
- `UpdateRatioMonitor`: a Lightning callback that measures and logs r_l for every block and changes
  nothing, so a `standard` run can log its own per-block update ratios for comparison.
- `EqualStep`: the same callback with a target; the control itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from locality.controls.base import Control
from locality.controls.equal_step_core import (
    EqualStepCore,
    Target,
    _check_target,
    spread,
)
from locality.controls.lora_ratios import MergedLoRARatios, lora_layers

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.hooks import RemovableHandle

DECAY_MODES = ("scaled", "unscaled")
LOW_PRECISION = {"bfloat16", "float16"}
FIRST_STEPS = 5  # init.update_rel: the first real updates' per-block ratios
PARTS_BEFORE_BLOCKS = ("embeddings",)
PARTS_AFTER_BLOCKS = ("final_norm", "head")
KNOWN_PARTS = PARTS_BEFORE_BLOCKS + PARTS_AFTER_BLOCKS


def collect_layers(
    module: nn.Module, include: Iterable[str] = ()
) -> tuple[list[str], list[list[nn.Parameter]]]:
    """The layers of `module` in depth order: named parts in `include`, then `module.blocks`.

    Order: embeddings, block_00 … block_NN, final_norm, head (the parts only when included). Only
    parameters with requires_grad count; a parameter shared by two layers (tied embeddings and head)
    belongs to the first; a layer with no trainable parameter is dropped. The order depends only on the
    module structure, so it is the same on every rank.
    """
    include = list(include)
    if getattr(module, "blocks", None) is None:
        raise ValueError(
            f"EqualStep needs `module.blocks` (the residual blocks); {type(module).__name__} has none."
        )
    parts: dict[str, nn.Module] = dict(getattr(module, "parts", None) or {})
    missing = [name for name in include if name not in parts]
    if missing:
        warnings.warn(f"EqualStep: include names parts this model lacks: {missing}; skipped.", stacklevel=2)
    candidates = [(name, parts[name]) for name in PARTS_BEFORE_BLOCKS if name in include and name in parts]
    candidates += [(f"block_{i:02d}", block) for i, block in enumerate(module.blocks)]
    candidates += [(name, parts[name]) for name in PARTS_AFTER_BLOCKS if name in include and name in parts]
    seen: set[int] = set()
    names, layers = [], []
    for name, part in candidates:
        params = [p for p in part.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            names.append(name)
            layers.append(params)
    return names, layers


class UpdateRatioMonitor(Control):
    """Measure and log every block's relative update ||ΔW_l|| / ||W_l|| after each real optimizer step.

    Changes nothing; use it in a `standard` run to compare with `EqualStep`. Layers, hooks, logging and
    `history` work exactly as in `EqualStep` (see there); logged keys are `update_ratio/block_{l:02d}`
    (or the part name) and `update_ratio/spread` (max/min over the blocks that moved).

    `enabled` (default True) may be switched between steps, e.g. to start the control after a warm-up;
    it is read when a step begins (the pre-hook), and a step that took a snapshot is always completed.

    The history (and `enabled`) is saved with every checkpoint (`state_dict`), so the summary of a resumed
    run covers all of its steps.
    """

    name = "update_ratio"

    def __init__(self, include: Sequence[str] = ()) -> None:
        unknown = [name for name in include if name not in KNOWN_PARTS]
        if unknown:
            raise ValueError(f"include names unknown parts {unknown}; valid parts: {list(KNOWN_PARTS)}.")
        self.include = list(include)
        self.target: Target = None
        self.enabled = True
        self.core: EqualStepCore | None = None
        self._handles: list[RemovableHandle] = []
        self._steps_at_batch_start = 0
        self._restored: dict[str, Any] | None = None

    @property
    def layer_names(self) -> list[str]:
        return self.core.names if self.core is not None else []

    @property
    def steps(self) -> int:
        """Number of real optimizer updates seen (post-hook calls)."""
        return self.core.steps if self.core is not None else 0

    @property
    def history(self) -> torch.Tensor:
        """Per real step, on CPU: [steps, 2, n_layers]; [:, 0] ratios before control, [:, 1] after."""
        return self.core.history if self.core is not None else torch.zeros(0, 2, 0)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy):
            raise ValueError(
                f"{type(self).__name__} supports single-device, DDP and FSDP2 (ModelParallelStrategy / "
                f"fully_shard) training, not {type(trainer.strategy).__name__}, whose flat parameters split "
                "blocks across ranks. Use strategy='ddp' or ModelParallelStrategy."
            )
        self._remove_hooks()
        names, layers = collect_layers(pl_module, self.include)
        if not layers:
            raise ValueError(f"{type(self).__name__}: the model has no block with trainable parameters.")
        ids = {id(p) for ps in layers for p in ps}
        owners = [
            opt
            for opt in trainer.optimizers
            if any(id(p) in ids for g in opt.param_groups for p in g["params"])
        ]
        if len(owners) != 1:
            raise ValueError(
                f"{type(self).__name__} needs exactly one optimizer holding the block parameters; "
                f"found {len(owners)}."
            )
        self.core = self._build_core(pl_module, names, layers)
        self._optimizer = owners[0]
        self._handles = [
            owners[0].register_step_pre_hook(self._before_step),
            owners[0].register_step_post_hook(self._after_step),
        ]
        self._restore()

    def _build_core(self, pl_module: LightningModule, names: list[str], layers: list) -> EqualStepCore:
        if not any(lora_layers(block) for block in pl_module.blocks):
            return EqualStepCore(layers, target=self.target, names=names)
        if self.target is not None or self.include:
            raise ValueError(
                f"{type(self).__name__} with LoRA: equalizing (or including parts) would act on the "
                "adapter matrices, not the effective weights W0 + s*BA the ratio is about. Measure "
                "with UpdateRatioMonitor, or fine-tune fully."
            )
        blocks = [f"block_{i:02d}" for i in range(len(pl_module.blocks))]
        return MergedLoRARatios(pl_module.blocks, blocks)

    def state_dict(self) -> dict[str, Any]:
        """The per-step history `summary()` is computed from, saved with every checkpoint."""
        if self.core is None:
            return dict(self._restored or {})
        return {
            "layers": self.layer_names,
            "steps": self.core.steps,
            "history": self.core.history,
            "enabled": self.enabled,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before `on_fit_start` builds the core (after it under FSDP2).
        self._restored = dict(state_dict)
        self._restore()

    def _restore(self) -> None:
        if self._restored is None or self.core is None or "history" not in self._restored:
            return
        state, self._restored = self._restored, None
        if list(state["layers"]) != self.layer_names:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's history covers layers {state['layers']}, "
                f"this model has {self.layer_names}; it cannot be resumed with this control."
            )
        self.core._pending.clear()
        self.core._history = [state["history"].float().cpu()] if len(state["history"]) else []
        self.core.steps = int(state["steps"])
        self.enabled = bool(state.get("enabled", True))

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.enabled:
            self.core.snapshot()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.core.armed:
            self.core.update()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._steps_at_batch_start = self.steps

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = trainer.log_every_n_steps
        updated = self.steps > self._steps_at_batch_start  # False while accumulating or after a skipped step
        if not updated or every <= 0 or trainer.global_step % every:
            return
        assert self.core is not None and self.core.ratio_before is not None
        self.core.flush()
        if not trainer.loggers or not trainer.is_global_zero:
            return
        before, after = self.core.ratio_before, self.core.ratio_after
        values = torch.cat([before, after, spread(before).view(1), spread(after).view(1)]).tolist()
        # Straight to the loggers on Lightning's own step axis, as its LearningRateMonitor does:
        # `pl_module.log_dict` would re-send the last values at a step the GradScaler skipped.
        for logger in trainer.loggers:
            logger.log_metrics(self._metrics(values), step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def summary(self) -> dict:
        """Per-layer mean ratios over the run and the median spread, for results.json."""
        history = self.history
        if not len(history):
            return {"target": self.target, "steps": 0}
        mean = history.mean(0)
        return {
            "target": self.target,
            "include": self.include,
            "steps": self.steps,
            "layers": self.layer_names,
            "ratio_before_mean": mean[0].tolist(),
            "ratio_after_mean": mean[1].tolist(),
            "spread_before_median": spread(history[:, 0]).median().item(),
            "spread_after_median": spread(history[:, 1]).median().item(),
            "spread_after_max": spread(history[:, 1]).max().item(),
        }

    def first_update_ratios(self, k: int = FIRST_STEPS) -> list[list[float]]:
        """The blocks' ratios r_l (before any control) of the first k real updates that moved a block, one list
        per step (with LR warmup the very first update has lr = 0 and moves nothing). Under Adam these are set
        by lr * sqrt(N_l) / ||W_l||, not by gradient size (README: what equal-step removes)."""
        blocks = [i for i, name in enumerate(self.layer_names) if name.startswith("block_")]
        history = self.history[:, 0][:, blocks]
        return history[(history > 0).any(-1)][:k].tolist()

    def _metrics(self, values: list[float]) -> dict[str, float]:
        n = self.core.n_layers
        metrics = {f"update_ratio/{name}": v for name, v in zip(self.layer_names, values[:n], strict=True)}
        metrics["update_ratio/spread"] = values[2 * n]
        return metrics

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.core is not None:
            self.core.flush()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class EqualStep(UpdateRatioMonitor):
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

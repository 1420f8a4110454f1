"""`UpdateRatioMonitor`: measure and log every block's relative update ||ΔW_l|| / ||W_l|| after each real
optimizer step, changing nothing. Runs without the equal-step control use it (`measure.update_ratios`) so
their per-block update ratios can be compared with equal-step's; `EqualStep` is this callback with a target.

It is the equal-step core with rescaling off (`locality.controls.update_core`, pure torch; for LoRA the
merged-weight ratios of `locality.controls.lora_ratios`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from locality.controls.lora_ratios import MergedLoRARatios, lora_layers
from locality.controls.update_core import (
    EqualStepCore,
    Target,
    spread,
)

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.hooks import RemovableHandle

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


class UpdateRatioMonitor(Callback):
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

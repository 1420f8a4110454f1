"""The equal-step control: after every real optimizer update, give every block the same relative step.

Three layers, smallest first:

- `EqualStepCore`: pure torch. Snapshot a list of parameter groups ("layers"), measure each layer's
  relative update r_l = ||ΔW_l|| / ||W_l_old|| after the optimizer has stepped, and (optionally) rescale
  ΔW_l so that every r_l equals one target. Works on plain tensors (single device, DDP) and on FSDP2
  DTensor shards (one all_reduce per step). Usable without Lightning (`core.attach(optimizer)`).
- `UpdateRatioMonitor`: a Lightning callback that measures and logs r_l for every block and changes
  nothing, so a `standard` run can log its own per-block update ratios for comparison.
- `EqualStep`: the same callback with a target; the control itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from locality.controls.base import Control

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.hooks import RemovableHandle

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed support
    DTensor = Shard = None

TARGETS = ("mean", "median", "max")
DECAY_MODES = ("scaled", "unscaled")
LOW_PRECISION = {"bfloat16", "float16"}
FLUSH_EVERY = 1024
FIRST_STEPS = 5  # init.update_rel: the first real updates' per-block ratios  # steps of ratios kept on device before one copy to the CPU history
PARTS_BEFORE_BLOCKS = ("embeddings",)
PARTS_AFTER_BLOCKS = ("final_norm", "head")
KNOWN_PARTS = PARTS_BEFORE_BLOCKS + PARTS_AFTER_BLOCKS

Target = str | float | None


def _check_target(target: Target) -> Target:
    if target is None or target in TARGETS:
        return target
    if isinstance(target, int | float) and not isinstance(target, bool) and target > 0:
        return float(target)
    raise ValueError(f"EqualStep target must be one of {TARGETS}, a positive float, or None; got {target!r}.")


def _is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _sums_of_squares(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Per-tensor sum of squares (0-d, in `dtype`) with one multi-tensor op."""
    if hasattr(torch, "_foreach_powsum"):  # newer torch (2.13 has it): no sqrt-then-square round trip
        return torch._foreach_powsum(tensors, 2, dtype=dtype)
    return torch._foreach_pow(torch._foreach_norm(tensors, 2, dtype=dtype), 2)


def shard_group(params: Sequence[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group over which the layers' DTensor shards must be summed (None: no DTensors).

    FSDP2 (`fully_shard`) shards each parameter on dim 0 over one mesh dimension; HSDP adds a Replicate
    dimension, over which nothing needs summing. Tensor parallelism (a second Shard dimension) is refused.
    """
    found = {_is_dtensor(p) for p in params}
    if found == {False}:
        return None
    if found == {True, False}:
        raise ValueError("EqualStep: the blocks mix DTensor and plain parameters; shard all of them (FSDP2).")
    meshes = {(p.device_mesh, tuple(p.placements)) for p in params}
    if len(meshes) != 1:
        raise ValueError("EqualStep: all block parameters must share one device mesh and placement.")
    mesh, placements = meshes.pop()
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    if len(shard_dims) != 1:
        raise ValueError(
            f"EqualStep supports FSDP2 sharding on one mesh dimension; got placements {placements} "
            "(tensor parallelism is not supported)."
        )
    return mesh.get_group(shard_dims[0])


class EqualStepCore:
    """Snapshot, measure and rescale the relative update of a fixed list of layers (pure torch).

    `layers[l]` is the list of tensors of layer l (parameters or FSDP2 DTensor parameters). Call
    `snapshot()` before the optimizer step and `update()` after it, or let `attach(optimizer)` do that.

    `update()` computes r_l = ||W_new - W_old|| / ||W_old|| with one norm over all of layer l's tensors
    (under FSDP2: local sums of squares, stacked into one [3, n_layers] tensor, ONE all_reduce(SUM)),
    then, unless `target` is None, sets W_l = W_old + (r*/r_l) ΔW_l for every layer that moved and got a
    gradient, and re-measures the ratios reached from the stored weights (`ratio_after`; a second norm
    and, sharded, a second all_reduce): in float32 they agree to ~1e-7, in bfloat16 rounding undoes much
    of the equalization, which is why `EqualStep` refuses low-precision block parameters.
    Layers with r_l = 0 (or ||W_old|| = 0, where r_l is undefined) or an all-zero gradient (they moved by
    weight decay or momentum alone) are left alone, do not enter the target, and report r_l = 0. Target
    r*: "mean" / "median" (mean of the two middle values for an even count) / "max" over the layers that
    moved, or a fixed positive float. With `use_decay_from(adamw)` only the gradient part of the update,
    ΔW + lr·wd·W_old, is measured and equalized, and AdamW's decay is applied unscaled.

    All of it runs on device with multi-tensor (`torch._foreach_*`) ops and no host sync; the ratios are
    kept on device (`ratio_before`, `ratio_after`) and in `history`, moved to the CPU only when read
    (or once every FLUSH_EVERY steps).
    Memory: one snapshot buffer per tensor, allocated once (in the parameter's own dtype) and reused.
    """

    def __init__(
        self,
        layers: Sequence[Sequence[torch.Tensor]],
        target: Target = "mean",
        process_group: dist.ProcessGroup | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.layers = [list(ts) for ts in layers]
        if not self.layers or any(not ts for ts in self.layers):
            raise ValueError("EqualStepCore needs at least one layer, and every layer needs a tensor.")
        self.names = list(names) if names is not None else [f"layer_{i:02d}" for i in range(len(self.layers))]
        if len(self.names) != len(self.layers):
            raise ValueError("EqualStepCore: one name per layer.")
        self.target = _check_target(target)
        self.tensors = [t for ts in self.layers for t in ts]
        self.process_group = process_group if process_group is not None else shard_group(self.tensors)
        ends = torch.tensor([len(ts) for ts in self.layers]).cumsum(0).tolist()
        self._bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        self._segment = torch.repeat_interleave(
            torch.arange(len(self.layers)), torch.tensor([len(ts) for ts in self.layers])
        ).to(self._local()[0].device)
        self._acc_dtype = (
            torch.float64 if any(t.dtype == torch.float64 for t in self.tensors) else torch.float32
        )
        self.decay_unscaled = False
        self.decay_groups: list[tuple[list[int], dict]] = []
        self._snap: list[torch.Tensor] | None = None
        self.armed = False  # a snapshot waits for its update()
        self.ratio_before: torch.Tensor | None = None
        self.ratio_after: torch.Tensor | None = None
        self.steps = 0
        self._pending: list[torch.Tensor] = []
        self._history: list[torch.Tensor] = []

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def snapshot_bytes(self) -> int:
        """Bytes held by the snapshot buffers (the control's whole memory overhead)."""
        return sum(t.numel() * t.element_size() for t in self._local())

    @property
    def history(self) -> torch.Tensor:
        """Ratios of every `update()` so far, on CPU: [steps, 2, n_layers]; [:, 0] before, [:, 1] after."""
        self.flush()
        if not self._history:
            return torch.zeros(0, 2, self.n_layers)
        return torch.cat(self._history)

    def flush(self) -> None:
        """Move the per-step ratios accumulated on device to the CPU history (one copy for all of them)."""
        if self._pending:
            self._history.append(torch.stack(self._pending).float().cpu())
            self._pending.clear()

    def _local(self) -> list[torch.Tensor]:
        # Resolved every step: FSDP2 may swap a DTensor's local tensor during its lazy init.
        return [t.to_local() if _is_dtensor(t) else t for t in self.tensors]

    def attach(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        """Snapshot before and update after every real `optimizer.step()`; returns the hook handles."""
        return [
            optimizer.register_step_pre_hook(lambda *_: self.snapshot()),
            optimizer.register_step_post_hook(lambda *_: self.update()),
        ]

    @torch.no_grad()
    def snapshot(self) -> None:
        local = self._local()
        if self._snap is None or any(s.shape != t.shape for s, t in zip(self._snap, local, strict=True)):
            self._snap = [torch.empty_like(t) for t in local]
        torch._foreach_copy_(self._snap, local)
        self.armed = True

    @torch.no_grad()
    def update(self) -> None:
        if not self.armed:
            raise RuntimeError("EqualStepCore.update() called without a snapshot() before the step.")
        self.armed = False
        local, snap = self._local(), self._snap
        if self.target is None:
            before = after = self._measure(local, snap)
        else:
            before, after = self._equalize(local, snap)
        self.ratio_before, self.ratio_after = before, after
        self.steps += 1
        self._pending.append(torch.stack([before, after]))
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def _measure(self, local: list[torch.Tensor], snap: list[torch.Tensor]) -> torch.Tensor:
        """Ratios only; the weights are never written."""
        squares_old = _sums_of_squares(snap, self._acc_dtype)
        torch._foreach_sub_(snap, local)  # snap := W_old - W_new = -ΔW
        w_norm, d_norm = self._layer_norms(squares_old, _sums_of_squares(snap, self._acc_dtype))
        moved = (d_norm > 0) & (w_norm > 0)
        return torch.where(moved, d_norm / torch.where(moved, w_norm, 1.0), 0.0)

    def _equalize(
        self, local: list[torch.Tensor], snap: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """W_l := W_old + s_l ΔW_l, then the ratios actually reached, re-measured from the stored weights.

        The parameters hold ΔW (or its gradient part) while it is measured and scaled: local := W_new - W_old
        (- the decoupled decay when `decay="unscaled"`), local *= s_l, local += W_old. Re-measuring
        ||W_final - W_old|| costs one sub and one multi-tensor norm (and, sharded, one more all_reduce), and
        shows what rounding to the parameters' dtype leaves of the equalization.
        """
        torch._foreach_sub_(local, snap)  # local := ΔW
        if self.decay_unscaled:
            self._add_decay(local, snap, sign=+1.0)  # local := ΔW + lr·wd·W_old, the gradient part
        # A layer whose gradient is exactly zero this step (an unused path, a pooled-away position) moved only by
        # weight decay or momentum: it is left alone and stays out of the target.
        w_norm, d_norm, g_norm = self._layer_norms(
            *(_sums_of_squares(ts, self._acc_dtype) for ts in (snap, local, self._gradients()))
        )
        moved = (d_norm > 0) & (w_norm > 0) & (g_norm > 0)
        safe_w = torch.where(moved, w_norm, 1.0)
        before = torch.where(moved, d_norm / safe_w, 0.0)
        scale = torch.where(moved, self._target_value(before, moved) / torch.where(moved, before, 1.0), 1.0)
        for (start, end), s in zip(self._bounds, scale, strict=True):
            torch._foreach_mul_(local[start:end], s)  # one 0-d device scalar per layer: no host sync
        torch._foreach_add_(local, snap)  # local := W_old + s ΔW, rounded to the parameters' dtype
        torch._foreach_sub_(snap, local)  # snap := W_old - W_final, as stored
        if self.decay_unscaled:
            self._apply_decay(local)
        reached = self._layer_norms(_sums_of_squares(snap, self._acc_dtype))[0]
        after = torch.where(moved, reached / safe_w, 0.0)
        return before, after

    def _layer_norms(self, *per_tensor_squares: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer norms from per-tensor sums of squares (summed over shards: one all_reduce for all rows)."""
        squares = torch.stack([sq for rows in per_tensor_squares for sq in rows]).view(
            len(per_tensor_squares), -1
        )
        sums = squares.new_zeros(len(per_tensor_squares), self.n_layers).index_add_(1, self._segment, squares)
        if self.process_group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.process_group)
        return list(sums.sqrt().unbind(0))

    def _gradients(self) -> list[torch.Tensor]:
        """Every tensor's (local) gradient; a tensor without one counts as a zero gradient."""
        grads = [torch.zeros((), device=t.device) if t.grad is None else t.grad for t in self.tensors]
        return [g.to_local() if _is_dtensor(g) else g for g in grads]

    def _decay_factors(self) -> list[tuple[list[int], float]]:
        """(tensor indices, lr * weight_decay) per optimizer parameter group with decay, read at this step."""
        return [
            (idx, float(group["lr"]) * group["weight_decay"])
            for idx, group in self.decay_groups
            if group["weight_decay"]
        ]

    def _add_decay(self, local: list[torch.Tensor], snap: list[torch.Tensor], sign: float) -> None:
        for idx, lr_wd in self._decay_factors():
            torch._foreach_add_([local[i] for i in idx], [snap[i] for i in idx], alpha=sign * lr_wd)

    def _apply_decay(self, local: list[torch.Tensor]) -> None:
        """AdamW's decoupled decay, W *= 1 - lr·wd, on the equalized weights (the gradient part was scaled)."""
        for idx, lr_wd in self._decay_factors():
            torch._foreach_mul_([local[i] for i in idx], 1.0 - lr_wd)

    def use_decay_from(self, optimizer: torch.optim.Optimizer) -> None:
        """`decay="unscaled"`: equalize only the gradient part of AdamW's update (its decoupled weight decay is
        applied unscaled); the parameter groups' lr and weight_decay are read at every step."""
        if not isinstance(optimizer, torch.optim.AdamW):
            raise ValueError(
                f"decay='unscaled' separates AdamW's decoupled weight decay; the optimizer is "
                f"{type(optimizer).__name__}. Use decay='scaled'."
            )
        index = {id(t): i for i, t in enumerate(self.tensors)}
        self.decay_groups = [
            ([index[id(p)] for p in group["params"] if id(p) in index], group)
            for group in optimizer.param_groups
        ]
        self.decay_unscaled = True

    def _target_value(self, ratio: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        if isinstance(self.target, float):
            return ratio.new_tensor(self.target)
        if self.target == "max":
            return ratio.max()
        count = moved.sum()
        if self.target == "mean":
            return ratio.sum() / count.clamp_min(1)
        ordered = torch.where(moved, ratio, torch.inf).sort().values
        middle = torch.stack([(count - 1).clamp_min(0) // 2, count // 2]).clamp_max(self.n_layers - 1)
        return ordered.gather(0, middle).mean()


def spread(ratios: torch.Tensor) -> torch.Tensor:
    """max / min over the last dim of the ratios of the layers that moved (r > 0); 1 if none moved."""
    moved = ratios > 0
    hi = torch.where(moved, ratios, 0.0).amax(-1)
    lo = torch.where(moved, ratios, torch.inf).amin(-1)
    return torch.where(moved.any(-1), hi / lo, 1.0)


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
        from locality.controls.lora_ratios import MergedLoRARatios, lora_layers

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

"""The equal-step core, pure torch: snapshot a list of parameter groups ("layers"), measure each layer's
relative update ||ΔW_l|| / ||W_l_old|| after the optimizer stepped, and optionally rescale ΔW_l so every layer's
ratio equals one target. Works on plain tensors (one device, DDP) and on FSDP2 DTensor shards; usable without
Lightning (`EqualStepCore.attach(optimizer)`). The Lightning callbacks are `UpdateRatioMonitor`
(`locality.controls.update_ratios`, no target: measuring only) and `EqualStep` (`locality.controls.equal_step`).
It lives with the controls: the equal-step control rescales with it, and every other run measures its ratios
with it (`UpdateRatioMonitor`). The DTensor helpers are `locality.core.dtensor`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from locality.core.dtensor import is_dtensor, shard_group

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

TARGETS = ("mean", "median", "max")
FLUSH_EVERY = 1024  # steps of ratios kept on device before one copy to the CPU history

Target = str | float | None


def _check_target(target: Target) -> Target:
    if target is None or target in TARGETS:
        return target
    if isinstance(target, int | float) and not isinstance(target, bool) and target > 0:
        return float(target)
    raise ValueError(f"EqualStep target must be one of {TARGETS}, a positive float, or None; got {target!r}.")


def _sums_of_squares(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Per-tensor sum of squares (0-d, in `dtype`) with one multi-tensor op."""
    if hasattr(torch, "_foreach_powsum"):  # newer torch (2.13 has it): no sqrt-then-square round trip
        return torch._foreach_powsum(tensors, 2, dtype=dtype)
    return torch._foreach_pow(torch._foreach_norm(tensors, 2, dtype=dtype), 2)


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
        return [t.to_local() if is_dtensor(t) else t for t in self.tensors]

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
        return [g.to_local() if is_dtensor(g) else g for g in grads]

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

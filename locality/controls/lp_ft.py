"""LP-FT / task-head preparation (Ren et al. 2023): train only the head first, then fine-tune everything.

Head preparation strategies (constructor arguments, `conf/control/lp_ft.yaml`):
- random head: `probe_steps=0` (plain fine-tuning from a freshly initialised head);
- probing for k steps: `probe_steps=k`, optionally at its own constant learning rate `head_lr` (the head's
  parameter groups step at head_lr while probing, then follow the optimizer's schedule like every group);
- probing to a target: `target_acc` / `target_loss` end probing early once the running (EMA, `smoothing`)
  training accuracy reaches / loss falls to the target;
- label smoothing: `label_smoothing=eps` trains the probe on the smoothed cross-entropy (an extra loss term,
  `penalty`, equal to smoothed CE minus CE of this step's head logits), during probing only;
- temperature: `temperature=T` divides the head's logits by T during probing only (a forward hook on the
  head, training mode only), so the head learns logits T times larger (T > 1) or smaller (T < 1);
- an MLP head: the objective's own option (`objective.head`), since the head belongs to the objective.

At the switch the prepared head's "energy" is measured as the paper defines it: the mean over a fixed set of
training batches (the first `energy_batches` of the datamodule's `init_dataloader`, the same ones as the
step-0 objective distance) of ||e_y - p(x)||_2, with the cross-entropy loss and accuracy, in eval mode, no
grad, temperature 1 (`locality.measure.head_energy`). It is logged (`lp_ft/energy`, `lp_ft/energy_loss`,
`lp_ft/energy_acc`) and kept in results.json["controls"]["lp_ft"], beside the running training loss and
accuracy at the switch (`running_loss`, `running_acc`). With probe_steps=0 it is measured before the first step.

While probing, every non-head gradient is dropped right before the optimizer step (AdamW skips
parameters without a gradient, weight decay included). Parameters stay `requires_grad`, so the optimizer,
the learning-rate schedule and other controls (equal-step sees r_l = 0 and leaves blocks alone) span the
whole run unchanged; the price is a full backward pass during probing.
"""

from __future__ import annotations

import torch

from locality.controls.base import Control
from locality.measure.head_energy import measure_head_energy
from locality.objectives.base import IGNORE


class LPFT(Control):
    name = "lp_ft"
    reads_step_metrics = True  # the running loss and accuracy that end probing

    def __init__(
        self,
        probe_steps: int = 100,
        target_acc: float | None = None,
        target_loss: float | None = None,
        smoothing: float = 0.9,
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        energy_batches: int = 4,
        head_lr: float | None = None,
    ):
        if probe_steps < 0:
            raise ValueError(f"lp_ft probe_steps must be >= 0, got {probe_steps}")
        if target_acc is not None and not 0 < target_acc <= 1:
            raise ValueError(f"lp_ft target_acc={target_acc} must be an accuracy in (0, 1] (or null).")
        if target_loss is not None and not target_loss > 0:
            raise ValueError(f"lp_ft target_loss={target_loss} must be a loss > 0 (or null).")
        if not 0 <= smoothing < 1:
            raise ValueError(f"lp_ft smoothing={smoothing} must be in [0, 1).")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"lp_ft label_smoothing={label_smoothing} must be in [0, 1) (0: none).")
        if not temperature > 0:
            raise ValueError(f"lp_ft temperature={temperature} must be > 0 (1: none).")
        if energy_batches < 1:
            raise ValueError(f"lp_ft energy_batches={energy_batches} must be >= 1.")
        if head_lr is not None and not head_lr > 0:
            raise ValueError(
                f"lp_ft head_lr={head_lr} must be a learning rate > 0 (or null: the optimizer's)."
            )
        self.probe_steps = probe_steps
        self.target_acc = target_acc
        self.target_loss = target_loss
        self.smoothing = smoothing
        self.label_smoothing = label_smoothing
        self.temperature = temperature
        self.energy_batches = energy_batches
        self.head_lr = head_lr
        self.switched_at: int | None = None
        self.energy: dict[str, float] = {}
        self._loss: float | None = None
        self._acc: float | None = None
        self._held: list = []
        self._hook = None
        self._logits: torch.Tensor | None = None  # this step's head logits (label smoothing while probing)
        self._labels: torch.Tensor | None = None

    def check_steps(self, max_steps: int) -> None:
        if self.probe_steps >= max_steps and self.target_acc is None and self.target_loss is None:
            raise ValueError(
                f"probe_steps={self.probe_steps} >= trainer.max_steps={max_steps}: the run would end while still "
                "probing, so no fine-tuning would happen. Lower probe_steps or raise trainer.max_steps."
            )

    @property
    def probing(self) -> bool:
        return self.switched_at is None

    def on_fit_start(self, trainer, pl_module) -> None:
        head = pl_module.parts.get("head")
        if head is None or getattr(pl_module.objective, "head", None) is None:
            raise ValueError("lp_ft needs a new task head (objective=cls or tok).")
        head_params = {id(p) for p in head.parameters()}
        self._held = [p for p in pl_module.parameters() if id(p) not in head_params]
        if self.probe_steps == 0 and self.probing:  # no probing: plain fine-tuning from the first step
            self._switch(trainer, pl_module)
        if self.probing and self._hook is None:
            self._hook = head.register_forward_hook(self._probe_logits)

    def _probe_logits(self, head, _inputs, output):
        if not (self.probing and head.training):
            return None
        if self.temperature != 1.0:
            output = output / self.temperature
        self._logits = output if self.label_smoothing > 0 else None
        return output

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._labels = batch.get("labels") if self.probing and self.label_smoothing > 0 else None

    def penalty(self, module) -> torch.Tensor | None:
        """During probing with label smoothing: smoothed CE - CE of this step's logits, so that the objective's
        loss plus this term is the label-smoothed probing loss."""
        logits, labels, self._logits = self._logits, self._labels, None
        if logits is None or labels is None or not self.probing:
            return None
        z = logits.float().reshape(-1, logits.shape[-1])
        y = labels.to(z.device).reshape(-1)
        ce = torch.nn.functional.cross_entropy(z, y, ignore_index=IGNORE)
        smoothed = torch.nn.functional.cross_entropy(
            z, y, ignore_index=IGNORE, label_smoothing=self.label_smoothing
        )
        return smoothed - ce

    def param_groups(self, module, groups: list[dict]) -> list[dict]:
        """With head_lr: each group split into its head and non-head parameters, the head part marked."""
        if self.head_lr is None:
            return groups
        head = {id(p) for p in module.objective.head.parameters()}
        split = []
        for group in groups:
            mine = [p for p in group["params"] if id(p) in head]
            rest = [p for p in group["params"] if id(p) not in head]
            split += [{**group, "params": rest}, {**group, "params": mine, "lp_ft_head": True}]
        return [g for g in split if g["params"]]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.probing:
            for p in self._held:
                p.grad = None
            if self.head_lr is not None:  # the scheduler sets every group's rate again after this step
                for group in optimizer.param_groups:
                    if group.get("lp_ft_head"):
                        group["lr"] = self.head_lr

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.probing:
            return
        metrics = trainer.callback_metrics
        self._loss = self._ema(self._loss, metrics.get("train/loss"))
        self._acc = self._ema(self._acc, metrics.get("train/acc"))
        reached = (
            self.target_acc is not None and self._acc is not None and self._acc >= self.target_acc
        ) or (self.target_loss is not None and self._loss is not None and self._loss <= self.target_loss)
        if trainer.global_step >= self.probe_steps or reached:
            self._switch(trainer, pl_module)

    def _ema(self, old: float | None, new) -> float | None:
        if new is None:
            return old
        new = float(new)
        return new if old is None else self.smoothing * old + (1 - self.smoothing) * new

    def _switch(self, trainer, pl_module) -> None:
        self.switched_at = trainer.global_step
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._logits = self._labels = None
        self.energy = {"switch_step": self.switched_at, "running_loss": self._loss, "running_acc": self._acc}
        init_batches = getattr(trainer.datamodule, "init_dataloader", None)
        if init_batches is not None:
            batches = [b for _, b in zip(range(self.energy_batches), init_batches(), strict=False)]
            stats = measure_head_energy(pl_module, batches, trainer.precision_plugin.forward_context)
            self.energy.update({f"energy_{k}": v for k, v in stats.items() if k != "energy"})
            self.energy["energy"] = stats["energy"]
        metrics = {f"lp_ft/{k}": float(v) for k, v in self.energy.items() if v is not None}
        for logger in trainer.loggers:  # Lightning's self.log is not allowed in on_fit_start
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict:
        """The phase (probing until `switched_at`), the energy at the switch and the running loss and accuracy
        that decide when probing ends: a run resumed while probing switches at the same step."""
        return {"switched_at": self.switched_at, "energy": self.energy, "loss": self._loss, "acc": self._acc}

    def load_state_dict(self, state_dict: dict) -> None:
        self.switched_at = state_dict["switched_at"]
        self.energy = state_dict["energy"]
        self._loss = state_dict.get("loss")
        self._acc = state_dict.get("acc")

    def summary(self) -> dict:
        return {
            "probe_steps": self.probe_steps,
            "label_smoothing": self.label_smoothing,
            "temperature": self.temperature,
            "head_lr": self.head_lr,
            **self.energy,
        }

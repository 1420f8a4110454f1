"""LP-FT / task-head preparation (Ren et al. 2023): train only the head first, then fine-tune everything.

Head probing ends after `probe_steps` optimizer steps, or earlier once the running training accuracy
reaches `target_acc` (or the running loss falls to `target_loss`). Ren et al. show that the training loss
and accuracy when full fine-tuning starts — the "energy" left for features to move — decides how much
features adapt; it is logged (`lp_ft/energy_loss`, `lp_ft/energy_acc`) and kept in results.json.

While probing, every non-head gradient is dropped right before the optimizer step (AdamW skips
parameters without a gradient, weight decay included). Parameters stay `requires_grad`, so the optimizer,
the learning-rate schedule and other controls (equal-step sees r_l = 0 and leaves blocks alone) span the
whole run unchanged; the price is a full backward pass during probing.
"""

from __future__ import annotations

from locality.controls.base import Control


class LPFT(Control):
    name = "lp_ft"

    def __init__(
        self,
        probe_steps: int = 100,
        target_acc: float | None = None,
        target_loss: float | None = None,
        smoothing: float = 0.9,
    ):
        if probe_steps < 0:
            raise ValueError(f"lp_ft probe_steps must be >= 0, got {probe_steps}")
        if target_acc is not None and not 0 < target_acc <= 1:
            raise ValueError(f"lp_ft target_acc={target_acc} must be an accuracy in (0, 1] (or null).")
        if target_loss is not None and not target_loss > 0:
            raise ValueError(f"lp_ft target_loss={target_loss} must be a loss > 0 (or null).")
        if not 0 <= smoothing < 1:
            raise ValueError(f"lp_ft smoothing={smoothing} must be in [0, 1).")
        self.probe_steps = probe_steps
        self.target_acc = target_acc
        self.target_loss = target_loss
        self.smoothing = smoothing
        self.switched_at: int | None = None
        self.energy: dict[str, float] = {}
        self._loss: float | None = None
        self._acc: float | None = None
        self._held: list = []

    @property
    def probing(self) -> bool:
        return self.switched_at is None

    def on_fit_start(self, trainer, pl_module) -> None:
        head = pl_module.parts.get("head")
        if head is None:
            raise ValueError("lp_ft needs a task head (objective=cls or tok).")
        head_params = {id(p) for p in head.parameters()}
        self._held = [p for p in pl_module.parameters() if id(p) not in head_params]
        if self.probe_steps == 0 and self.probing:  # no probing: plain fine-tuning from the first step
            self.switched_at = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.probing:
            for p in self._held:
                p.grad = None

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
        self.energy = {"energy_loss": self._loss, "energy_acc": self._acc, "switch_step": self.switched_at}
        pl_module.log_dict({f"lp_ft/{k}": float(v) for k, v in self.energy.items() if v is not None})

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
        return {"probe_steps": self.probe_steps, **self.energy}

"""The run's final validation (results.json's `final`), taken from the fit when the fit already validated the
final weights.

A fit validates every `trainer.val_check_interval` steps (or at the end of each epoch); when its last
validation came after the last optimizer step, running the validation set again after `fit` would give the
same numbers (the same weights, the same batches, in eval mode) at the cost of a full pass. `FinalValidation`
remembers the fit's last validation (its step and its `val/` metrics) and `after_fit` reuses it then;
otherwise it validates.
"""

from __future__ import annotations

import time

import lightning as L


class FinalValidation(L.Callback):
    def __init__(self) -> None:
        self.step: int | None = None
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.step = trainer.global_step
            self.metrics = {
                key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")
            }

    def after_fit(
        self, trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule
    ) -> tuple[dict[str, float], dict]:
        """The final `val/` metrics, and their timings: `validate_s` (0 when reused) and
        `final_from_fit` (whether the fit's last validation, at the final step, gave them)."""
        if self.metrics and self.step == trainer.global_step:
            return dict(self.metrics), {"validate_s": 0.0, "final_from_fit": True}
        started = time.perf_counter()
        metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        return metrics, {"validate_s": time.perf_counter() - started, "final_from_fit": False}

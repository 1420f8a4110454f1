"""`ProfileMeasurement`: the depth profile as a Lightning callback, so training code is only `trainer.fit`.

- `setup` (before `configure_model` and before a checkpoint is restored, so always on the pretrained
  weights): the pre-fine-tuning capture (cached), the pretrained snapshot and the step-0 quantities (`init`),
  on the trainer's device and in its precision; with `measure.ntk`, the empirical NTK per block (`ntk`).
- `on_fit_start` (FSDP2 only): the pretrained references are cut to this rank's shards.
- `on_fit_end` (the fine-tuned weights, still on the training device): the first steps' update ratios from
  the update-ratio monitor, if one ran, then the post-fine-tuning capture and every metric with its interval.
  The outcome is `results` (the `change`, `profile`, ... entries of results.json).

The measuring itself is `locality.instrument.depth.DepthProfiler`; every number is the same as calling it
around `fit` (all resampling uses its own seeded generators).
"""

from __future__ import annotations

import time

import lightning as L

from locality.controls.update_ratios import UpdateRatioMonitor
from locality.instrument.depth import DepthProfiler
from locality.instrument.ntk_profile import ntk_profile
from locality.instrument.phases import announce


class ProfileMeasurement(L.Callback):
    def __init__(self, profiler: DepthProfiler):
        self.profiler = profiler
        self.results: dict | None = None
        self.ntk: dict | None = None
        self._measured_before = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not self._measured_before:
            self.profiler.before_training(pl_module, trainer)
            cfg = self.profiler.cfg
            if cfg.ntk:
                start = time.perf_counter()
                examples = self.profiler.data.splits.train[: cfg.ntk_examples]
                self.ntk = ntk_profile(pl_module, examples, params=cfg.ntk_params)
                self.profiler.timings["ntk_s"] = time.perf_counter() - start
                announce(f"NTK at initialization on {len(examples)} examples", self.profiler.timings["ntk_s"])
            self._measured_before = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.profiler.to_local_shards()  # FSDP2: the model is sharded by now, the weights still pretrained

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        monitor = next((c for c in trainer.callbacks if isinstance(c, UpdateRatioMonitor)), None)
        if (
            monitor is not None and monitor.steps
        ):  # the first steps' update ratios, beside the step-0 gradients
            self.profiler.record_first_updates(monitor.first_update_ratios())
        self.results = self.profiler.after_training(pl_module, trainer)

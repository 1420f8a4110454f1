"""Cost of the end-of-run measurement against training, for one model, in one process.

Builds the run as `locality/train.py` does (composed config, objective, `LocalityModule`, the framework's
Trainer with its default callbacks, `ProfileMeasurement`, the measurement callback), from a randomly
initialised GPT-2-shaped model (`model=tiny_gpt2 model.init=random` with `--layers`, `--width`, `--heads`
written into `model.config_overrides`; the tiny presets' 4096-token vocabulary), and fits `--steps`
training steps: before them the profiler captures the probe set and computes the step-0 objective distance,
after them it captures again and computes every configured metric with its interval (`conf/measure/default.yaml`:
n_boot 1000, the jackknife or no interval for the plug-in metrics as `interval_method` decides).

Prints the measurement's phases (`DepthProfiler.timings`), the median training step time (each step timed
from one `on_train_batch_start` to the next, after one warm-up step), and the ratio of the end-of-run
measurement (post-capture + metrics; a run's pre-capture is cached across runs with the same weights) to
1,000 training steps extrapolated from that median.

    python bench/measure_cost.py                                     # the issue's setting: 12 x 768, n_probe 1024
    python bench/measure_cost.py --n-probe 256 --max-length 32      # scaled down for a CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from locality.core.config import compose_train  # noqa: E402
from locality.data.datamodule import LocalityDataModule  # noqa: E402
from locality.instrument.callback import ProfileMeasurement  # noqa: E402
from locality.instrument.depth import DepthProfiler  # noqa: E402
from locality.run.assembly import assemble  # noqa: E402
from locality.run.module import LocalityModule  # noqa: E402
from locality.run.resume import RunState  # noqa: E402
from locality.run.rundir import RunDir  # noqa: E402
from locality.run.trainer import build_trainer  # noqa: E402
from locality.train import ratio_monitor  # noqa: E402

RUN_STEPS = 1000


class StepTimer(L.Callback):
    """Step times, one `on_train_batch_start` to the next (the whole loop iteration; the last step, which
    saves the final checkpoint, is not timed)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--n-probe", type=int, default=1024)
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per sequence (training and probes)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides (e.g. measure.n_boot=200)")
    args = parser.parse_args()

    arch = f"{{n_layer: {args.layers}, n_embd: {args.width}, n_head: {args.heads}, n_positions: 1024}}"
    overrides = [
        "model=tiny_gpt2",
        "model.init=random",
        f"model.config_overrides={arch}",
        "objective=clm",
        f"objective.max_length={args.max_length}",
        f"measure.n_probe={args.n_probe}",
        "measure.cache=false",  # the pre-capture is timed, never read from or written to the cache
        f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={args.steps + 2}",  # a warm-up step first, an untimed one last
        "logger=csv",
        *args.overrides,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("LOCALITY_CACHE", str(Path(tmp) / "cache"))
        cfg = compose_train([*overrides, f"outputs_root={tmp}"])
        parts = assemble(cfg)
        splits, backbone, objective = parts.splits, parts.backbone, parts.objective
        data = LocalityDataModule(
            splits, objective, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed, cfg.data.num_workers
        )
        module = LocalityModule(backbone, objective, instantiate(cfg.optim), instantiate(cfg.scheduler), [])
        profiler = DepthProfiler(cfg.measure, backbone, data, cfg.seed)
        measurement = ProfileMeasurement(profiler)
        timer = StepTimer()
        callbacks = [*filter(None, [ratio_monitor(cfg.measure, [])]), measurement, RunState(), timer]
        trainer = build_trainer(cfg.trainer, RunDir(Path(tmp) / "run"), callbacks, False)
        started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        fit_s = time.perf_counter() - started

    t = profiler.timings
    step = statistics.median(timer.times[1:])
    end_of_run = t["post_capture_s"] + t["metrics_s"]
    run = RUN_STEPS * step
    print(f"\nmeasure cost | torch {torch.__version__} | {torch.get_num_threads()} threads | ", end="")
    print(f"python {sys.version.split()[0]} | {trainer.strategy.root_device}")
    print(
        f"model: GPT-2 shape, {args.layers} layers x {args.width} wide, {backbone.n_params / 1e6:.1f} M params"
    )
    print(f"probes: {args.n_probe} x {args.max_length} tokens; metrics {list(cfg.measure.metrics)}, ", end="")
    print(f"n_boot {cfg.measure.n_boot}, plugin_ci {cfg.measure.plugin_ci}")
    print(f"training: batch {args.batch_size} x {args.max_length} tokens, {cfg.trainer.precision}")
    for key in ("pre_capture_s", "init_s", "post_capture_s", "metrics_s"):
        print(f"  {key:<15} {t[key]:8.2f} s")
    print(
        f"  train step      {step:8.3f} s median of {len(timer.times) - 1} (after 1 warm-up); fit {fit_s:.1f} s"
    )
    print(f"end-of-run measurement (post-capture + metrics): {end_of_run:.2f} s")
    print(f"{RUN_STEPS} training steps (extrapolated): {run:.1f} s")
    print(f"ratio measurement / {RUN_STEPS}-step run: {end_of_run / run:.4f} ({100 * end_of_run / run:.2f}%)")
    uncached = end_of_run + t["pre_capture_s"] + t["init_s"]
    print(f"  with an uncached pre-capture and init: {uncached / run:.4f} ({100 * uncached / run:.2f}%)")


if __name__ == "__main__":
    main()

"""`DepthProfiler`: everything measured about one run's depth profile, in the order a run needs it.

    profiler.before_training(module, trainer)  # pre-capture (cached), weight snapshot, step-0 objective distance
    trainer.fit(...)                           # optional: the dynamics callback captures every n steps
    profiler.after_training(module, trainer)   # post-capture, per-layer change + bootstrap, profile statistics

Every forward pass runs where training runs: the module on the trainer's device, under the trainer's
precision context (autocast for `*-mixed`), with features pooled on the device and only the pooled
[n, d] features moved to the host. All numbers land in one dict shaped like results.json's "depth",
"change", "profile" and "init" keys.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import lightning as L
import torch

from locality.measure.capture import capture, capture_key, load_cached, save_cached, weights_fingerprint
from locality.measure.init_distance import objective_distance
from locality.measure.profile import ols_slope, profile_stats
from locality.measure.similarity import cka_matrix, layer_changes
from locality.measure.weights import snapshot_blocks, weight_rel
from locality.paths import cache_dir

FEATURE_STATS = ("dot", "norm_ratio")  # Ren et al. 2023 feature statistics; not "change" metrics


class DepthProfiler:
    def __init__(self, cfg, backbone, datamodule, seed: int):
        self.cfg = cfg
        self.backbone = backbone
        self.data = datamodule
        self.seed = seed
        self.pre: list[torch.Tensor] | None = None
        self.reference: list[dict] | None = None
        self.init: dict = {}
        self.timings: dict[str, float] = {}
        self.cache_hit = False
        self.history: list[dict] = []

    @property
    def groups(self) -> torch.Tensor | None:
        """Bootstrap units: with token-level pooling, all positions of one probe sequence resample together."""
        if self.cfg.pooling != "tokens":
            return None
        return torch.arange(len(self.data.splits.probe)).repeat_interleave(self.cfg.token_positions)

    @property
    def depth(self) -> list[float]:
        n = self.backbone.n_layers
        return [layer / n for layer in range(n + 1)]

    def _capture(self, context=nullcontext) -> list[torch.Tensor]:
        return capture(self.backbone.base, self.backbone.blocks, self.data.probe_dataloader(),
                       pooling=self.cfg.pooling, k_tokens=self.cfg.token_positions, seed=self.seed,
                       forward_context=context)

    def _settings(self) -> dict:
        """Everything besides weights and probe texts that the captured features depend on."""
        tok = self.backbone.tokenizer
        return {"pooling": self.cfg.pooling, "k": self.cfg.token_positions, "seed": self.seed,
                "tokenizer": tok.name_or_path, "vocab": len(tok), "max_length": self.data.max_length}

    def before_training(self, module: L.LightningModule, trainer: L.Trainer | None = None) -> None:
        context = on_training_device(module, trainer)
        start = time.perf_counter()
        key = capture_key(weights_fingerprint(self.backbone.base),
                          [e["text"] for e in self.data.splits.probe], self._settings())
        path = cache_dir() / "captures" / f"{key}.pt"
        self.pre = load_cached(path) if self.cfg.cache else None
        self.cache_hit = self.pre is not None
        if self.pre is None:
            self.pre = self._capture(context)
            if self.cfg.cache:
                save_cached(path, self.pre)
        self.timings["pre_capture_s"] = time.perf_counter() - start
        self.reference = snapshot_blocks(self.backbone.blocks)
        batches = [b for _, b in zip(range(self.cfg.init_batches), self.data.init_dataloader(), strict=False)]
        self.init = objective_distance(module, batches, forward_context=context)
        grad = self.init["grad_rel"]
        self.init["grad_rel_slope"] = _slope_over_blocks(grad)

    def after_training(self, module: L.LightningModule, trainer: L.Trainer | None = None) -> dict:
        start = time.perf_counter()
        post = self._capture(on_training_device(module, trainer))
        self.timings["post_capture_s"] = time.perf_counter() - start
        start = time.perf_counter()
        change_metrics = [m for m in self.cfg.metrics if m not in FEATURE_STATS]
        changes = layer_changes(self.pre, post, metrics=change_metrics + list(FEATURE_STATS),
                                n_boot=self.cfg.n_boot, seed=self.seed, groups=self.groups,
                                n_boot_procrustes=self.cfg.n_boot_procrustes)
        change = {m: changes[m].values for m in change_metrics}
        profile = {m: profile_stats(self.depth, changes[m].values, changes[m].replicates, ci=self.cfg.ci,
                                    method=self.cfg.ci_method)
                   for m in change_metrics}
        rel = [None, *weight_rel(self.backbone.blocks, self.reference)]
        change["weight_rel"] = rel
        profile["weight_rel"] = profile_stats(self.depth, rel, None, ci=self.cfg.ci, method=self.cfg.ci_method)
        self.timings["metrics_s"] = time.perf_counter() - start
        result = {"depth": self.depth, "change": change, "profile": profile,
                  "features": {m: changes[m].values for m in FEATURE_STATS}}
        if self.cfg.cross_layer:
            result["cross_layer"] = {"pretrained": cka_matrix(self.pre).tolist(),
                                     "finetuned": cka_matrix(post).tolist()}
        if self.history:
            result["dynamics"] = self.history
        return result

    def dynamics_callback(self) -> L.Callback | None:
        return _Dynamics(self) if self.cfg.every_n_steps > 0 else None


class _Dynamics(L.Callback):
    """Capture the probe set every `measure.every_n_steps` optimizer steps: the profile's trajectory."""

    def __init__(self, profiler: DepthProfiler):
        self.profiler = profiler
        self.last_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.last_step or step % self.profiler.cfg.every_n_steps:
            return
        self.last_step = step
        post = self.profiler._capture(trainer.precision_plugin.forward_context)
        metrics = [m for m in self.profiler.cfg.metrics if m in ("cosine", "cka_linear", "cka_debiased")]
        changes = layer_changes(self.profiler.pre, post, metrics=metrics, n_boot=0, seed=self.profiler.seed,
                                groups=self.profiler.groups)
        entry = {"step": step, **{m: changes[m].values for m in metrics}}
        entry["slope"] = {m: ols_slope(self.profiler.depth, changes[m].values) for m in metrics}
        self.profiler.history.append(entry)
        pl_module.log_dict({f"dynamics/{m}_slope": v for m, v in entry["slope"].items()})


def on_training_device(module: L.LightningModule, trainer: L.Trainer | None):
    """Move the module to the trainer's device (Lightning moves it back to the CPU after `fit`) and return
    the trainer's forward precision context, a factory of context managers."""
    if trainer is None:
        return nullcontext
    module.to(trainer.strategy.root_device)
    return trainer.precision_plugin.forward_context


def _slope_over_blocks(values: list[float | None]) -> float | None:
    points = [(i / len(values), v) for i, v in enumerate(values, start=1) if v is not None]
    if len(points) < 2:
        return None
    xs, ys = zip(*points, strict=True)
    return ols_slope(list(xs), list(ys))

"""`DepthProfiler`: everything measured about one run's depth profile, in the order a run needs it.

    profiler.before_training(module, trainer)  # pre-capture (cached), weight snapshot, step-0 objective distance
    trainer.fit(...)                           # optional: the dynamics callback captures every n steps
    profiler.after_training(module, trainer)   # post-capture, per-layer change + intervals, profile statistics

Every forward pass runs where training runs: the module on the trainer's device, under the trainer's
precision context (autocast for `*-mixed`), with features pooled on the device and only the pooled
[n, d] features (and, for cosine_tokens, per-sequence sums) moved to the host. All numbers land in one
dict shaped like results.json's "depth", "change", "profile" and "init" keys:

- change.<metric>: the pooled metrics from the pre- and post-capture (`layer_changes`); cosine_tokens
  from the post-capture pass that also runs the pretrained weights (`capture_token_change`, whose
  docstring states its memory and time), with the same bootstrap draws (`token_change`).
- profile.<metric>: `profile_stats` (slope, slope_ci, slope_per_layer, steepness, width, width_count,
  ci_method, ci_level, ci_note, slope_jackknife). The interval's method per metric comes from
  `interval_method`: the bootstrap, a delete-a-group jackknife for the plug-in metrics when d <= n/4,
  none (with a warning and ci_note) above.
- features: Ren et al. 2023's feature adaptation per layer (`feature_adaptation`: euclidean, cosine, dot,
  norm, norm_ratio), point estimates from the same pre- and post-capture.
- cross_layer (`measure.cross_layer`): layer x layer CKA of the pretrained and fine-tuned model, over
  `token_positions` random non-pad tokens per probe sequence (an extra capture before and after training,
  `cross_layer_pooling=tokens`) or the pooled features (`pooled`).
- init: `objective_distance`, with kl / kl_norm (a linear probe on frozen features for new heads,
  fitted on the first `measure.kl_probe_train` training examples, evaluated on the validation split). In a
  sweep, runs that differ only in their control share it (`shared_init`: measured once, read by the others).
"""

from __future__ import annotations

import json
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from locality.backbones.tokenizer import vocab_fingerprint
from locality.core.dtensor import is_dtensor
from locality.core.integrity import write_json_atomic
from locality.core.paths import cache_dir
from locality.instrument.capture import (
    capture,
    capture_key,
    capture_token_change,
    load_cached,
    save_cached,
    weights_fingerprint,
)
from locality.instrument.init_distance import objective_distance
from locality.instrument.phases import announce
from locality.measure.profile import interval_method, large_change_note, ols_slope, profile_stats
from locality.measure.similarity import (
    FEATURE_METRICS,
    TOKEN_METRICS,
    cka_matrix,
    feature_adaptation,
    jackknife_changes,
    layer_changes,
    token_change,
)
from locality.measure.weights import (
    is_sharded,
    local_shard,
    snapshot_blocks,
    snapshot_parameters,
    to_local_shards,
    weight_rel,
)


class DepthProfiler:
    def __init__(self, cfg, backbone, datamodule, seed: int, shared_init: Path | None = None):
        self.cfg = cfg
        self.backbone = backbone
        self.data = datamodule
        self.seed = seed
        self.shared_init = shared_init  # where runs differing only in their control share `init` (a sweep)
        self.pre: list[torch.Tensor] | None = None
        self.cross_pre: list[torch.Tensor] | None = None  # cross-layer CKA rows, when not `pre`'s
        self.reference: list[dict] | None = None
        self.pretrained: dict[str, torch.Tensor] | None = None  # the base model's weights, for cosine_tokens
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

    def _capture(self, context=nullcontext, pooling: str | None = None) -> list[torch.Tensor]:
        return capture(
            self.backbone.base,
            self.backbone.blocks,
            self.data.probe_dataloader(),
            pooling=pooling or self.cfg.pooling,
            k_tokens=self.cfg.token_positions,
            seed=self.seed,
            forward_context=context,
        )

    def _settings(self, trainer: L.Trainer | None) -> dict:
        """Everything besides weights and probe texts that the captured features depend on: how they are pooled,
        the tokenizer (its whole vocabulary), the model config (overrides that change the forward pass with the
        same weights), and the dtype and precision the capture runs in."""
        tok = self.backbone.tokenizer
        return {
            "pooling": self.cfg.pooling,
            "k": self.cfg.token_positions,
            "seed": self.seed,
            "tokenizer": tok.name_or_path,
            "vocab": vocab_fingerprint(tok),
            "special": tok.special_tokens_map,
            "padding_side": tok.padding_side,
            "max_length": self.data.max_length,
            "model_config": self.backbone.model.config.to_diff_dict(),
            "attention": getattr(self.backbone.model.config, "_attn_implementation", None),
            "dtype": str(next(self.backbone.base.parameters()).dtype),
            "precision": str(trainer.precision) if trainer is not None else None,
        }

    def before_training(self, module: L.LightningModule, trainer: L.Trainer | None = None) -> None:
        context = on_training_device(module, trainer)
        start = time.perf_counter()
        weights = weights_fingerprint(self.backbone.base)
        key = capture_key(
            weights,
            [e["text"] for e in self.data.splits.probe],
            self._settings(trainer),
        )
        path = cache_dir() / "captures" / f"{key}.pt"
        expected = (self.backbone.n_layers + 1, len(self.data.splits.probe))
        self.pre = load_cached(path, expected) if self.cfg.cache else None
        self.cache_hit = self.pre is not None
        if self.pre is None:
            self.pre = self._capture(context)
            if self.cfg.cache:
                save_cached(path, self.pre)
        if self._cross_layer_tokens:
            self.cross_pre = self._capture(context, pooling="tokens")
        self.timings["pre_capture_s"] = time.perf_counter() - start
        announce(
            f"pre-capture of {self.n_probe} probe sequences",
            self.timings["pre_capture_s"],
            "cached" if self.cache_hit else None,
        )
        if "cosine_tokens" in self.cfg.metrics:
            self.pretrained = snapshot_parameters(self.backbone.base)
        self.reference = snapshot_blocks(self.backbone.blocks, self.backbone.base, self.pretrained)
        start = time.perf_counter()
        fingerprint = f"{weights}-{weights_fingerprint(module.objective)}"
        # One process only: step 0's metrics sync across processes, so every rank must measure or none.
        shared = self.shared_init if trainer is None or trainer.world_size == 1 else None
        self.init = read_shared_init(shared, fingerprint)
        self.timings["init_shared"] = self.init is not None
        if self.init is None:
            self.init = self._objective_distance(module, context)
            write_shared_init(shared, fingerprint, self.init)
        self.timings["init_s"] = time.perf_counter() - start
        announce(
            "step 0 (the objective distance at initialization)",
            self.timings["init_s"],
            "shared: measured by a run of another control" if self.timings["init_shared"] else None,
        )

    def _objective_distance(self, module: L.LightningModule, context) -> dict:
        batches = [b for _, b in zip(range(self.cfg.init_batches), self.data.init_dataloader(), strict=False)]
        probe_train, probe_eval = self._probe_batches(module)
        init = objective_distance(
            module, batches, forward_context=context, probe_train=probe_train, probe_eval=probe_eval
        )
        init["grad_rel_slope"] = _slope_over_blocks(init["grad_rel"])
        return init

    def to_local_shards(self) -> None:
        """Under FSDP2, once the model is sharded (training starts, before a checkpoint is restored): keep only
        this rank's shards of the pretrained weights (weight_rel's reference, cosine_tokens' snapshot)."""
        base = self.backbone.base
        if not is_sharded(base):
            return
        to_local_shards(self.backbone.blocks, self.reference)
        if self.pretrained is not None:
            params = dict(base.named_parameters())
            self.pretrained = {
                name: local_shard(value, params[name]) if is_dtensor(params.get(name)) else value
                for name, value in self.pretrained.items()
            }

    @property
    def _cross_layer_tokens(self) -> bool:
        """Cross-layer CKA over sampled tokens needs its own capture unless the profile already pools tokens."""
        return (
            self.cfg.cross_layer and self.cfg.cross_layer_pooling == "tokens" and self.cfg.pooling != "tokens"
        )

    def record_first_updates(self, ratios: list[list[float]]) -> None:
        """init.update_rel: the blocks' update ratios ||ΔW_l||/||W_l|| of the first optimizer steps (one list
        per step), and the slope of the first, beside grad_rel."""
        self.init["update_rel"] = ratios
        self.init["update_rel_slope"] = _slope_over_blocks(ratios[0]) if ratios else None

    def _probe_batches(self, module: L.LightningModule) -> tuple[list[dict] | None, list[dict] | None]:
        """Training batches holding the first `kl_probe_train` examples, and every validation batch: the
        linear probe of init.kl for objectives with a new head (None when there is none or it is off)."""
        if self.cfg.kl_probe_train <= 0 or getattr(module.objective, "head", None) is None:
            return None, None
        train, n = [], 0
        for batch in self.data.init_dataloader():
            rows = batch["input_ids"].shape[0]
            take = min(rows, self.cfg.kl_probe_train - n)
            train.append({k: v[:take] for k, v in batch.items()} if take < rows else batch)
            n += take
            if n >= self.cfg.kl_probe_train:
                break
        return train, list(self.data.val_dataloader())

    def after_training(self, module: L.LightningModule, trainer: L.Trainer | None = None) -> dict:
        """The post-fine-tuning capture, then every metric with its interval and the profile statistics."""
        context = on_training_device(module, trainer)
        start = time.perf_counter()
        post, token_sums, token_counts = self._post_capture(context)
        self.timings["post_capture_s"] = time.perf_counter() - start
        with_tokens = " with the pretrained weights for cosine_tokens" if token_sums is not None else ""
        announce(
            f"post-capture of {self.n_probe} probe sequences{with_tokens}", self.timings["post_capture_s"]
        )
        start = time.perf_counter()
        change, profile = self._change_and_profile(post, token_sums, token_counts)
        self._add_weight_rel(change, profile)
        self.timings["metrics_s"] = time.perf_counter() - start
        announce(f"metrics and intervals ({self.cfg.n_boot} bootstrap replicates)", self.timings["metrics_s"])
        result = {
            "depth": self.depth,
            "change": change,
            "profile": profile,
            "features": feature_adaptation(self.pre, post),
        }
        if self.cfg.cross_layer:
            start = time.perf_counter()
            result["cross_layer"] = self._cross_layer(context, post)
            self.timings["cross_layer_s"] = time.perf_counter() - start
            announce("cross-layer CKA", self.timings["cross_layer_s"])
        if self.history:
            result["dynamics"] = self.history
        return result

    @property
    def n_probe(self) -> int:
        return len(self.data.splits.probe)

    def _post_capture(self, context) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """The fine-tuned model's pooled features, and with cosine_tokens the per-sequence token sums of the
        same pass that also runs the pretrained weights (None when not measured)."""
        post = token_sums = token_counts = None
        if self.pretrained is not None:
            try:
                post, token_sums, token_counts = capture_token_change(
                    self.backbone.base,
                    self.backbone.blocks,
                    self.data.probe_dataloader(),
                    self.pretrained,
                    pooling=self.cfg.pooling,
                    k_tokens=self.cfg.token_positions,
                    seed=self.seed,
                    forward_context=context,
                )
            except ValueError as err:  # a control added parameters with no pretrained value
                warnings.warn(f"cosine_tokens not measured: {err}", stacklevel=3)
            self.pretrained = None  # weight_rel's reference keeps only the blocks
        if post is None:
            post = self._capture(context)
        return post, token_sums, token_counts

    def _interval_plans(self, metrics: list[str]) -> dict[str, tuple[str | None, str | None]]:
        """Per metric, how its slope interval is made (`interval_method`) and the note saying why not."""
        n_rows, dim = self.pre[0].shape[0], max(f.shape[1] for f in self.pre)
        return {
            m: interval_method(m, n_rows, dim, bootstrap=self.cfg.ci_method, plugin=self.cfg.plugin_ci)
            for m in metrics
        }

    def _change_and_profile(self, post, token_sums, token_counts) -> tuple[dict, dict]:
        """change.<metric> (per layer) and profile.<metric> (slope with its interval, shape statistics). A
        metric without an interval says why in its ci_note (printed under the profile table)."""
        change_metrics = [m for m in self.cfg.metrics if m not in FEATURE_METRICS]
        pooled = [m for m in change_metrics if m not in TOKEN_METRICS]
        plans = self._interval_plans(change_metrics)
        bootstrapped = {m for m, (method, _) in plans.items() if method in ("basic", "percentile")}
        changes = layer_changes(
            self.pre,
            post,
            metrics=pooled,
            n_boot=self.cfg.n_boot,
            seed=self.seed,
            groups=self.groups,
            n_boot_procrustes=self.cfg.n_boot_procrustes if "procrustes" in bootstrapped else 0,
        )
        if token_sums is not None:
            changes["cosine_tokens"] = token_change(
                token_sums, token_counts, n_boot=self.cfg.n_boot, seed=self.seed
            )
        for m in pooled:
            note = large_change_note(m, changes[m].values) if plans[m][0] == "jackknife" else None
            plans[m] = (None, note) if note else plans[m]
        jackknifed = [m for m in pooled if plans[m][0] == "jackknife"]
        leave_out = (
            jackknife_changes(
                self.pre,
                post,
                jackknifed,
                n_groups=self.cfg.jackknife_groups,
                seed=self.seed,
                groups=self.groups,
            )
            if jackknifed
            else {}
        )
        change = {m: changes[m].values for m in change_metrics if m in changes}
        profile = {
            m: profile_stats(
                self.depth,
                changes[m].values,
                changes[m].replicates,
                ci=self.cfg.ci,
                method=plans[m][0],
                jackknife=leave_out.get(m),
                ci_note=plans[m][1],
                width_threshold=self.cfg.width_threshold,
            )
            for m in change
        }
        return change, profile

    def _add_weight_rel(self, change: dict, profile: dict) -> None:
        """weight_rel: each block's ||W_l - W_l(0)|| / ||W_l(0)||, no interval (nothing to resample)."""
        rel = [None, *weight_rel(self.backbone.blocks, self.reference)]
        change["weight_rel"] = rel
        profile["weight_rel"] = profile_stats(
            self.depth,
            rel,
            None,
            ci=self.cfg.ci,
            method=None,
            width_threshold=self.cfg.width_threshold,
            ci_note="no interval: one weight difference per block, nothing to resample",
        )

    def _cross_layer(self, context, post: list[torch.Tensor]) -> dict:
        """Layer x layer CKA of the pretrained and the fine-tuned model (over sampled tokens: a capture of its
        own after training; pooled: the profile's features)."""
        pre, post = (
            (self.cross_pre, self._capture(context, pooling="tokens"))
            if self._cross_layer_tokens
            else (self.pre, post)
        )
        return {
            "pooling": "tokens" if self._cross_layer_tokens else self.cfg.pooling,
            "n_rows": int(pre[0].shape[0]),
            "pretrained": cka_matrix(pre).tolist(),
            "finetuned": cka_matrix(post).tolist(),
        }

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
        changes = layer_changes(
            self.profiler.pre,
            post,
            metrics=metrics,
            n_boot=0,
            seed=self.profiler.seed,
            groups=self.profiler.groups,
        )
        entry = {"step": step, **{m: changes[m].values for m in metrics}}
        entry["slope"] = {m: ols_slope(self.profiler.depth, changes[m].values) for m in metrics}
        self.profiler.history.append(entry)
        pl_module.log_dict({f"dynamics/{m}_slope": v for m, v in entry["slope"].items()})

    def state_dict(self) -> dict:
        """The captures so far travel with the checkpoint: a resumed run reports the whole trajectory."""
        return {"history": list(self.profiler.history), "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.profiler.history[:] = state_dict["history"]
        self.last_step = state_dict["last_step"]


def read_shared_init(path: Path | None, fingerprint: str) -> dict | None:
    """The step-0 quantities a run of the same setting and seed (another control) measured, if any.

    They are measured before any control acts (before `configure_model`), on the same weights, head and
    batches, so they are the same numbers; `fingerprint` (the base model's and the objective's weights)
    guards against a file from other weights. Unreadable or foreign: None, and the run measures its own.
    """
    if path is None or not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored["init"] if stored.get("fingerprint") == fingerprint else None


def write_shared_init(path: Path | None, fingerprint: str, init: dict) -> None:
    if path is None or rank_zero_only.rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"fingerprint": fingerprint, "init": init})


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

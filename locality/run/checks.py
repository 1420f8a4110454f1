"""Checks before any work: every value a run needs, refused in one paragraph before data or weights load.

Three layers, cheapest first:
- `validate(cfg)` (the group schemas, then `check_values`; `locality.plan` runs it too): ranges and
  fixed choices of every plain value, from the composed config alone. Each rule is stated once, beside its
  field (`locality.core.config`: the group dataclasses and the rule classes of the `_target_` groups).
- `preflight(cfg)`: what needs a file but no weights: control arguments (each control's constructor and
  `check_model(n_blocks)` against the model's config.json), the model source (a local directory that is
  really a saved model, a valid hub id), the objective/family pairing, a writable output root, and a GPU
  when the trainer asks for one; for built-in data (read in milliseconds) the split sizes and the labels the
  objective needs.
- Data-dependent checks (split sizes, labels) run in `locality.data.sources.load_splits`, on the data,
  before the model is loaded.

A single run checks in a Hydra callback (`PreflightCallback`), before Hydra creates the run directory, and
exits 2 on a bad value; `locality.train.run` repeats the checks, so a sweep job fails alone (the sweep goes
on) and in-process callers get the same errors. README, "Bad input", lists every case and its message;
tests/test_checks.py runs each row of that table.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from locality.core.config import ModelConf, all_rules, apply_schemas, min_bootstrap  # noqa: F401 (re-exported)
from locality.core.errors import EXIT_USER_ERROR, UserError, report, wants_traceback

_ABSENT = object()


def validate(cfg: DictConfig) -> DictConfig:
    """The composed config merged onto the group schemas (`locality.core.config.apply_schemas`), then every value
    checked (`check_values`): a UserError names the bad key and what it may be."""
    cfg = apply_schemas(cfg)
    check_values(cfg)
    check_components(cfg)
    return cfg


def check_components(cfg: DictConfig) -> None:
    """The groups built from a `_target_` (objective, optim, scheduler; controls in `preflight`): every key is
    an argument of the target, of the right kind (`locality.core.components`)."""
    from locality.core.components import check_component
    from locality.objectives import check_objective_config
    from locality.run.trainer import OWN_KEYS, SUPPLIED

    for group in ("objective", "optim", "scheduler", "trainer", "logger"):
        if group not in cfg:
            raise UserError(f"The config has no '{group}' group; did an experiment file remove it?")
    check_objective_config(cfg.objective)
    check_component(cfg.optim, "optim", supplied_elsewhere=("params",))
    check_component(cfg.scheduler, "scheduler", supplied_elsewhere=("optimizer", "total_steps"))
    check_component(cfg.trainer, "trainer", supplied_elsewhere=SUPPLIED, extra_keys=OWN_KEYS)
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, DictConfig) and "_target_" in strategy:  # a strategy object (trainer=fsdp)
        check_component(strategy, "trainer.strategy")
    check_component(cfg.logger, "logger", supplied_elsewhere=("info",))
    for name, callback in (cfg.get("callbacks") or {}).items():
        check_component(callback, f"callbacks.{name}")


def check_values(cfg: DictConfig) -> None:
    """Ranges and fixed choices of the composed config (no files read): every rule of every home
    (`locality.core.config.HOMES`, each rule beside its field), cheapest first; a key the chosen option of
    its group lacks (objective.mask_prob, optim.betas) is not checked."""
    check_finite(cfg)
    for key, rule in all_rules():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value)
        problem = rule.problem(key, value, cfg)
        if problem:
            raise UserError(problem)


def check_finite(cfg: DictConfig) -> None:
    """No setting is inf or nan: no option means either (an infinite L2-SP strength or learning rate turns
    the first loss into nan; a nan threshold compares false everywhere)."""

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, float) and not math.isfinite(node):
            raise UserError(f"{key}={node} is not a finite number: give a finite value.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")


@dataclass
class Preflight:
    """What the checks learnt and training reuses: the built controls and the model's block count."""

    controls: list
    n_blocks: int | None
    family: str


def preflight(cfg: DictConfig) -> Preflight:
    """Checks that read files but no weights or data (a validated config; see the module docstring)."""
    from locality.backbones import family_of, peek_config, peek_n_blocks
    from locality.controls.build import build_controls
    from locality.objectives import objective_class

    check_output_names(cfg)
    check_writable(Path(cfg.outputs_root), "outputs_root")
    check_accelerator(cfg.trainer.accelerator)
    check_on_cpu(cfg)
    controls = build_controls(cfg.control)
    check_cache()
    spec = ModelConf(**cfg.model)
    config = peek_config(spec)
    check_vocabulary(spec)
    check_model_shape(cfg, config)
    if spec.arch is not None and spec.init == "pretrained":
        from locality.backbones.pretrained import settings

        settings(spec)  # model.pretrain and $LOCALITY_PRETRAIN_STEPS, before a pretraining could start
    family = spec.family or family_of(config)
    check_declared_family(spec, config)
    objective = objective_class(cfg.objective, family=family)
    objective.check_family(family, config)
    check_head(spec, config, objective.head_kind)
    if cfg.data.source == "builtin":  # built-in data is read in milliseconds: its sizes and labels now
        from locality.data.sources import load_splits
        from locality.objectives.base import Task

        objective.check_task(Task(tuple(load_splits(cfg.data, n_probe=cfg.measure.n_probe).label_names)))
    check_control_combination(controls, parameter_dtype(cfg))
    check_sharding(cfg, controls)
    base = check_structure(spec, config, controls)
    n_blocks = peek_n_blocks(config)
    if base is not None and n_blocks is not None:
        check_measurement_cost(cfg, config, base, n_blocks)
    for control in controls:
        try:
            control.check_steps(cfg.trainer.max_steps)
            if n_blocks is not None:
                control.check_model(n_blocks)
        except ValueError as err:
            raise UserError(f"control.{control.name}: {err}") from None
    return Preflight(controls, n_blocks, family)


def check_vocabulary(spec: ModelConf) -> None:
    """A model built from a config with a vocabulary of its own (`model.config_overrides.vocab_size`) must hold
    every id of its tokenizer (`locality.backbones.hf.config_for`)."""
    if spec.arch is None or "vocab_size" not in spec.config_overrides:
        return
    from locality.backbones import load_tokenizer
    from locality.backbones.hf import config_for

    config_for(spec.arch, load_tokenizer(spec, None), spec.config_overrides)


def check_head(spec: ModelConf, config, head) -> None:
    """A pretrained checkpoint in a local directory (or a bundled package) must hold the LM head an LM
    objective reuses; read from its safetensors header, before any weight is loaded."""
    from locality.backbones import GGUF_BUNDLES, check_pretrained_head, resolve_source

    if spec.arch is not None or spec.name_or_path is None or spec.name_or_path in GGUF_BUNDLES:
        return  # a GGUF model is converted on first load, never by a check (it ships its head)
    path, local = resolve_source(spec.name_or_path)
    if local and Path(path).is_dir():
        check_pretrained_head(spec, config, Path(path), head)


def check_declared_family(spec: ModelConf, config) -> None:
    """model.family may name the family of an architecture locality does not know; it may not contradict one
    it does (a BERT declared a decoder would be trained as a causal LM while attending both ways)."""
    from locality.backbones.families import ENCODER_TYPES, RNN_TYPES, SSM_TYPES, family_of

    known = config.model_type in ENCODER_TYPES | SSM_TYPES | RNN_TYPES
    if spec.family is not None and known and spec.family != family_of(config):
        raise UserError(
            f"model.family={spec.family} contradicts the checkpoint: a {config.model_type} model is a "
            f"{family_of(config)}. Remove model.family (it is read from the config), or choose a "
            f"{spec.family} model."
        )


def check_structure(spec: ModelConf, config, controls: list):
    """What the model's module tree decides, read from a skeleton on the meta device: the blocks at
    model.blocks_path, and what each control names inside them (`Control.check_blocks`). Returns the
    skeleton (None when transformers cannot build one from the config alone)."""
    from locality.backbones import find_blocks, skeleton

    base = skeleton(spec, config)
    if base is None:
        return None
    _, blocks = find_blocks(base, spec.blocks_path)
    for control in controls:
        try:
            control.check_blocks(blocks)
        except ValueError as err:
            raise UserError(f"control.{control.name}: {err}") from None
    return base


def check_measurement_cost(cfg: DictConfig, config, base, n_blocks: int) -> None:
    """Refuse a measurement that cannot fit in this machine's memory, naming the estimate and its largest
    part; announce an NTK that will take long (`locality.core.estimates`)."""
    from locality.core import estimates

    width = getattr(config, "hidden_size", None)
    if not isinstance(width, int):
        return
    shape = estimates.Shape(width, n_blocks, sum(p.numel() for p in base.parameters()))
    max_length = int(cfg.objective.get("max_length") or 512)
    parts = estimates.measurement_bytes(cfg.measure, shape)
    need, have = sum(parts.values()), estimates.available_bytes()
    if need > have:
        part, size = max(parts.items(), key=lambda kv: kv[1])
        raise UserError(
            f"The measurement needs at least {estimates.human_bytes(need)} of memory and this machine has "
            f"{estimates.human_bytes(have)} available: {part} alone is {estimates.human_bytes(size)}. Lower "
            "the measure.* settings in parentheses (or use fewer probe rows: measure.n_probe, "
            "measure.token_positions)."
        )
    import torch

    if cfg.measure.ntk and (cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()):
        seconds = estimates.ntk_seconds(cfg.measure, shape, max_length)
        if seconds > estimates.ANNOUNCE_AFTER_S:
            estimates.announce(
                f"locality: measure.ntk on {cfg.measure.ntk_examples} examples will take roughly "
                f"{estimates.human_seconds(seconds)} on this CPU (estimated from its measured matmul rate)."
            )


TRUE_PRECISIONS = {"bf16-true": "bfloat16", "bf16": "bfloat16", "16-true": "float16", "16": "float16"}


def parameter_dtype(cfg: DictConfig) -> str:
    """The dtype the parameters train in: model.dtype, unless a `-true` precision casts them."""
    return TRUE_PRECISIONS.get(str(cfg.trainer.precision), cfg.model.dtype)


def check_control_combination(controls: list, dtype: str) -> None:
    """Controls that contradict each other, and settings under which the equal-step control could not keep its
    promise (README, "The equal-step control, precisely"): low-precision parameters, and LoRA, whose
    adapters are not the weights the ratio is about."""
    from locality.controls import EqualStep, Freeze, LoRA

    if any(isinstance(c, LoRA) for c in controls) and any(isinstance(c, Freeze) for c in controls):
        raise UserError(
            "control=[lora,freeze] contradicts itself: lora already freezes every pretrained weight and trains "
            "only its adapters, which live in the blocks freeze would freeze (in one order nothing trains, in "
            "the other freeze is undone). Choose the adapted blocks with control.lora.layers instead."
        )
    if not any(isinstance(c, EqualStep) for c in controls):
        return
    if dtype in ("bfloat16", "float16"):
        raise UserError(
            f"control equal_step with {dtype} parameters (model.dtype or a -true trainer.precision): rounding "
            f"each updated weight to {dtype} "
            "undoes the rescale (a max/min spread of 1.3-1.8 per step instead of 1.000001). Keep "
            "float32 parameters and compute in bf16: model.dtype=float32 trainer.precision=bf16-mixed."
        )
    if any(isinstance(c, LoRA) for c in controls):
        raise UserError(
            "control=[lora,equal_step] is not supported: equal-step would equalize the adapter "
            "matrices' own ratios while the effective weights W0 + s*BA, whose ||dW||/||W|| the paper "
            "means, move with a spread of about 3 across blocks. Use equal_step with full fine-tuning, "
            "or lora with control=standard."
        )


def check_sharding(cfg: DictConfig, controls: list) -> None:
    """FSDP2 (`trainer=fsdp`, any ModelParallelStrategy): what is not supported on DTensor shards is refused
    here, not after the model is loaded; Lightning's FSDP1 (`strategy=fsdp`) is pointed to trainer=fsdp."""
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = cfg.trainer.get("strategy")
    known = ("auto", *StrategyRegistry.available_strategies())
    if isinstance(strategy, str) and strategy not in known:
        raise UserError(
            f"trainer.strategy={strategy!r} is not a Lightning strategy; choose one of: {', '.join(known)}, "
            "or trainer=fsdp."
        )
    if isinstance(strategy, str) and strategy.startswith("fsdp"):
        raise UserError(
            f"trainer.strategy={strategy} is Lightning's FSDP1, whose flat parameters split blocks across ranks "
            "(per-block update ratios and equal-step cannot be computed). Use trainer=fsdp (FSDP2, one shard "
            "of every block per process)."
        )
    if not (isinstance(strategy, DictConfig) and "_target_" in strategy):
        return
    from lightning.pytorch.strategies import ModelParallelStrategy

    from locality.core.components import target_of

    if not issubclass(target_of(strategy, "trainer.strategy"), ModelParallelStrategy):
        return
    problems = [
        f"control {c.name} (not supported on sharded parameters)" for c in controls if not c.supports_sharding
    ]
    if cfg.model.dtype != "float32":
        problems.append(
            f"model.dtype={cfg.model.dtype} (the shards stay float32; compute in bf16 with "
            "trainer.strategy.param_dtype=bfloat16)"
        )
    if cfg.measure.ntk:
        problems.append("measure.ntk=true (the kernel needs every parameter on one process)")
    if cfg.measure.drop_top_k:
        problems.append("measure.drop_top_k (evaluating with blocks removed needs the unsharded model)")
    if problems:
        import locality.controls as built_in

        supported = sorted(
            c.name
            for c in (getattr(built_in, n) for n in built_in.__all__)
            if isinstance(c, type) and issubclass(c, built_in.Control) and c.supports_sharding
        )
        raise UserError(
            "trainer=fsdp (FSDP2 sharding) does not support: "
            + "; ".join(problems)
            + f". Supported there: controls standard, {', '.join(supported)}, and every depth-profile metric."
        )


def check_accelerator(accelerator: str) -> None:
    """A GPU run on a machine without one (checked here, not in `check_values`: a sweep may be planned on a
    login node and run on GPU nodes)."""
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU "
            "(torch.cuda.is_available() is False). Use trainer.accelerator=auto or cpu."
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "trainer.accelerator=mps but this machine has no Apple GPU (torch.backends.mps.is_available() is "
            "False). Use trainer.accelerator=auto or cpu."
        )


def check_on_cpu(cfg: DictConfig) -> None:
    """Settings that a CPU run would silently replace or cannot run, refused where the run would be on the CPU:
    Lightning runs trainer.precision=16-mixed as bf16-mixed there (results.json would record what did not
    run), float16 parameters and FlashAttention-2 need a GPU."""
    import torch

    accelerator = cfg.trainer.accelerator
    if not (accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())):
        return
    precision = str(cfg.trainer.precision)
    if precision in ("16-mixed", "16", "16-true"):
        raise UserError(
            f"trainer.precision={precision} on the CPU: float16 needs a CUDA GPU (on the CPU Lightning would run "
            "bf16-mixed instead, and the run would record what did not run). Use trainer.precision=bf16-mixed "
            "or 32-true here."
        )
    if cfg.model.dtype == "float16":
        raise UserError(
            "model.dtype=float16 on the CPU: float16 weights need a CUDA GPU (many CPU kernels lack them). "
            "Use model.dtype=float32 (or bfloat16) here."
        )
    if cfg.model.attn_implementation == "flash_attention_2":
        raise UserError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package. Use sdpa "
            "(the default) or eager on the CPU."
        )


MAX_NAME = 200  # characters of a directory name (file systems allow 255 bytes)


def check_output_names(cfg: DictConfig) -> None:
    """Everything a run writes stays under outputs_root: it is set, and sweep_name is one plain name."""
    root = cfg.get("outputs_root")
    if not isinstance(root, str) or not root.strip():
        raise UserError(
            f"outputs_root={root!r} is empty (is $LOCALITY_OUTPUTS set to an empty string?): runs would be "
            "written under the file system's root. Set it to a directory, e.g. outputs_root=outputs."
        )
    from locality.core.identity import run_name

    run = run_name(cfg)
    if len(run.encode()) > MAX_NAME:
        raise UserError(
            f"The run's directory name would be {len(run.encode())} bytes long ({run[:60]}...), more than "
            f"{MAX_NAME}: file systems refuse names over 255. Shorten model.name, objective.name or the "
            "control's name."
        )
    name = cfg.get("sweep_name")
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or len(name) > MAX_NAME
    ):
        raise UserError(
            f"sweep_name={name!r} must be one plain directory name (no '/', not '.' or '..', at most "
            f"{MAX_NAME} characters): sweeps live in outputs_root/sweeps/<sweep_name>, and nothing is written "
            "outside outputs_root. E.g. sweep_name=my_study."
        )


def check_writable(path: Path, key: str) -> None:
    """The output root (or its nearest existing parent) must be a directory this process can create files in."""
    problem = writable_problem(path)
    if problem:
        raise UserError(
            f"{key}={str(path)!r} cannot hold run outputs: {problem}. Choose a writable directory, "
            f"e.g. {key}=$HOME/locality-outputs (or set $LOCALITY_OUTPUTS)."
        )


def writable_problem(path: Path) -> str | None:
    """Why files cannot be created in `path` (or its nearest existing parent), or None."""
    try:
        path.expanduser().resolve(strict=False)  # raises on a symlink loop (exists() only says False)
        existing = path.expanduser().absolute()
        while not existing.exists():
            if existing.is_symlink():  # a link to nowhere: nothing can be created through it
                return f"{existing} is a symbolic link to {existing.readlink()}, which does not exist"
            existing = existing.parent
    except (OSError, RuntimeError) as err:  # a symlink loop
        return f"it cannot be resolved ({getattr(err, 'strerror', None) or err})"
    if not existing.is_dir():
        return f"{existing} is {'a file, ' if existing.is_file() else ''}not a directory"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        return f"files cannot be created in {existing} ({err.strerror or err})"
    return None


def check_cache() -> None:
    """$LOCALITY_CACHE (pretrained checkpoints, converted GGUF models, pre-fine-tuning captures) is writable."""
    from locality.core.paths import CACHE_ENV, cache_path

    path = cache_path()
    problem = writable_problem(path)
    if problem:
        raise UserError(
            f"${CACHE_ENV}={str(path)!r} cannot hold locality's cache: {problem}. Point it at a writable "
            f"directory (e.g. export {CACHE_ENV}=$HOME/.cache/locality)."
        )


def check_model_shape(cfg: DictConfig, config) -> None:
    """What a config-built or saved model's config says that cannot train: no blocks, a width that does not
    split into its heads, sequences longer than its positions."""
    from locality.backbones import peek_n_blocks

    n_blocks = peek_n_blocks(config)
    if n_blocks is not None and n_blocks < 1:
        raise UserError(
            f"model '{cfg.model.name}' has {n_blocks} blocks (model.config_overrides): it needs at least 1."
        )
    width, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
        raise UserError(
            f"model '{cfg.model.name}': width {width} does not split into {heads} attention heads "
            "(model.config_overrides): choose a width divisible by the number of heads."
        )
    positions = getattr(config, "max_position_embeddings", None)
    if config.model_type in ("roberta", "xlm-roberta", "camembert") and isinstance(positions, int):
        positions -= 2  # position ids start after the padding index
    max_length = cfg.objective.get("max_length")
    if isinstance(positions, int) and isinstance(max_length, int) and max_length > positions:
        raise UserError(
            f"objective.max_length={max_length} is longer than the {positions} positions model "
            f"'{cfg.model.name}' has: use objective.max_length={positions} or less."
        )


class PreflightCallback(Callback):
    """Hydra callback: check a single run before Hydra creates its directory; a sweep's output root first.

    `composed` says that Hydra composed the config (it calls these hooks only then): a process's later exit 1
    is a failed run or sweep, not a config Hydra refused (`locality.train.exit_2_if_not_composed`)."""

    composed = False

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        PreflightCallback.composed = True
        _exit_on_user_error(lambda: preflight(validate(_without_hydra(config))))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        PreflightCallback.composed = True

        def check() -> None:
            check_output_names(config)
            check_writable(Path(config.outputs_root), "outputs_root")

        _exit_on_user_error(check)


def _without_hydra(config: DictConfig) -> DictConfig:
    copy = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    OmegaConf.set_struct(copy, False)
    return copy


def _exit_on_user_error(check: Callable[[], Any]) -> None:
    try:
        check()
    except UserError as err:
        if wants_traceback():
            raise
        report(err)
        sys.exit(EXIT_USER_ERROR)

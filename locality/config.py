"""Typed schemas for the config groups, the run-name resolver, and validation before any work starts.

Every option of a group extends its dataclass schema (`defaults: [schema, _self_]`), so every key can be
overridden on any option, and Hydra reports a misspelt key or a wrong type (exit 2) before a model is
loaded; `validate` then checks values that have a fixed set of choices. Controls are free-form `_target_` configs (their
constructor arguments are their schema) and are checked by instantiating them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from locality.errors import UserError
from locality.identity import run_name_resolver


@dataclass
class ModelConf:
    name: str = "hf"
    name_or_path: str | None = None
    arch: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    family: str | None = None
    block_type: str | None = None
    blocks_path: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class ObjectiveConf:
    name: str = "cls"
    max_length: int = 128
    pooling: str = "auto"  # cls: auto | first | last | mean
    head_dropout: float = 0.1
    mask_prob: float = 0.15  # mlm


@dataclass
class DataConf:
    name: str = "stdlib_docs"
    source: str = "builtin"  # builtin | hub
    builtin: str | None = None
    path: str | None = None  # datasets.load_dataset(path, subset, data_files=...)
    subset: str | None = None
    data_files: Any = None
    text_field: str = "text"
    label_field: str | None = None
    train_split: str = "train"
    heldout_split: str = "validation"
    # Where the probe / validation sets are drawn from (None = heldout_split); from one split the probe takes
    # the first measure.n_probe hash-ordered examples and validation the next n_validation; drawn from the
    # train split, they are held out from training (see locality.data.sources). Hub datasets only.
    probe_split: str | None = None
    validation_split: str | None = None
    min_chars: int = 1
    max_train_examples: int | None = None
    n_validation: int = 256
    batch_size: int = 16
    eval_batch_size: int = 64
    num_workers: int = 0


@dataclass
class OptimConf:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup: float = 0.1  # fraction of steps if < 1, else a number of steps
    schedule: str = "linear"  # any transformers.get_scheduler name: linear, cosine, constant_with_warmup, ...


@dataclass
class TrainerConf:
    max_steps: int = 100
    max_epochs: int = -1
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    enable_progress_bar: bool = True
    deterministic: Any = True
    ckpt_every_n_steps: int = 100


@dataclass
class MeasureConf:
    n_probe: int = 512
    pooling: str = "mean"  # mean | last | first | tokens
    token_positions: int = 8  # pooling=tokens: random token positions per sequence
    metrics: list[str] = field(default_factory=lambda: ["cosine", "cka_linear", "cka_debiased", "procrustes",
                                                         "euclidean"])
    n_boot: int = 1000
    n_boot_procrustes: int = 50  # Procrustes replicates cost ~100x the others: the first n of the same draws
    ci: float = 0.95
    ci_method: str = "basic"  # basic (2*slope - quantiles; robust to the bootstrap bias of biased metrics) | percentile
    every_n_steps: int = 0  # >0: also capture during training (profile dynamics)
    init_batches: int = 4  # training batches for the step-0 objective distance and gradient profile
    cache: bool = True  # reuse the pre-fine-tuning capture across runs
    update_ratios: bool = True  # log per-block ||dW||/||W|| every step in runs without equal_step
    cross_layer: bool = False  # (L+1)x(L+1) CKA matrices (Phang et al. 2021)
    drop_top_k: int = 0  # evaluate with the top k = 0..K blocks removed after training


@dataclass
class LoggerConf:
    kind: str = "wandb"  # wandb | csv | none
    project: str = "locality"
    entity: str | None = None
    offline: bool = True
    group: str | None = None
    tags: list[str] = field(default_factory=list)


SCHEMAS = {"model": ModelConf, "objective": ObjectiveConf, "data": DataConf, "optim": OptimConf,
           "trainer": TrainerConf, "measure": MeasureConf, "logger": LoggerConf}


def register_resolvers() -> None:
    """Register the run-name resolver (`${run_name:}`, see `locality.identity`) and each group's schema
    (`<group>/schema`, the base of its options)."""
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name_resolver)
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group=group, name="schema", node=schema)


def validate(cfg: DictConfig) -> DictConfig:
    """Merge every group onto its schema; raise UserError naming the bad key and the valid ones."""
    for group, schema in SCHEMAS.items():
        if group not in cfg:
            raise UserError(f"The config has no '{group}' group; did an experiment file remove it?")
        try:
            typed = OmegaConf.merge(OmegaConf.structured(schema), cfg[group])
        except OmegaConfBaseException as err:
            valid = ", ".join(schema.__dataclass_fields__)
            raise UserError(f"Invalid {group} config: {err.msg if hasattr(err, 'msg') else err}. "
                            f"Valid {group}.* keys: {valid}.") from None
        with_flag = OmegaConf.to_container(typed)
        OmegaConf.set_struct(cfg, False)
        cfg[group] = with_flag
    if not isinstance(cfg.control, DictConfig | type(None)):
        raise UserError("control must be a mapping of control components (e.g. control=equal_step).")
    _check_choices(cfg)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _check_choices(cfg: DictConfig) -> None:
    """Values with a fixed set of choices, checked now rather than when they are first used."""
    from locality.measure.capture import POOLINGS
    from locality.measure.similarity import METRICS

    choices = {
        "measure.pooling": (cfg.measure.pooling, POOLINGS),
        "measure.ci_method": (cfg.measure.ci_method, ("basic", "percentile")),
        "objective.pooling": (cfg.objective.pooling, ("auto", "first", "last", "mean")),
        "data.source": (cfg.data.source, ("builtin", "hub")),
        "logger.kind": (cfg.logger.kind, ("wandb", "csv", "none")),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise UserError(f"{key}={value!r} is not a valid choice; choose one of: {', '.join(valid)}.")
    unknown = [m for m in cfg.measure.metrics if m not in METRICS]
    if unknown:
        raise UserError(f"measure.metrics has unknown metric(s) {unknown}; valid metrics: {', '.join(METRICS)}.")
    if not 0 < cfg.measure.ci < 1:
        raise UserError(f"measure.ci={cfg.measure.ci} must be a coverage level in (0, 1), e.g. 0.95.")
    if cfg.measure.n_probe < 4:
        raise UserError(f"measure.n_probe={cfg.measure.n_probe} is too small; use at least 4 (512+ for stable CKA).")


def load_option(group: str, name: str) -> DictConfig:
    """One option of a config group merged onto its schema, outside Hydra (tests, notebooks)."""
    from locality.paths import conf_dir

    raw = OmegaConf.load(conf_dir() / group / f"{name}.yaml")
    raw.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), raw)


def to_plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value

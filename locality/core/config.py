"""Typed schemas for the config groups, the run-name resolver, and validation before any work starts.

Every option of a group extends its dataclass schema (`defaults: [/<group>_schema@_here_, _self_]`), so every key can be
overridden on any option, and Hydra reports a misspelt key or a wrong type (exit 2) before a model is
loaded; `locality.run.checks.validate` then checks every value's range or choices. Controls are free-form
`_target_` configs: their constructor arguments are their schema (`locality.controls.build`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from locality.core.errors import UserError
from locality.core.identity import run_name_resolver


@dataclass
class PretrainConf:
    """How a config-built (tiny_*) preset is pretrained offline before fine-tuning (`locality.pretrain`)."""

    steps: int = 400  # $LOCALITY_PRETRAIN_STEPS overrides it (a test/debug knob; it is part of the cache key)
    lr: float = 4.0e-3
    batch_size: int = 8
    seq_len: int = 128  # packed blocks of this many tokens
    seed: int = 0  # pretraining's own seed, independent of the fine-tuning seed
    warmup: float = 0.05  # fraction of steps, then cosine decay to 10% of lr
    weight_decay: float = 0.01
    mask_prob: float = 0.15  # masked LM (encoders): BERT's 15%, 80/10/10


INITS = ("pretrained", "random")


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
    # Config-built presets (`arch` set): start from the offline-pretrained checkpoint (cached, pretrained on
    # first use) or from random init. Checkpoint presets always load their weights: init=random is refused.
    init: str = "pretrained"
    # How the forward runs (speed and memory only; the same weights): transformers' attention implementation
    # (null: its default, SDPA where the architecture has it) and activation checkpointing of the blocks.
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    pretrain: PretrainConf = field(default_factory=PretrainConf)

    def __post_init__(self) -> None:
        if not isinstance(self.pretrain, PretrainConf):  # a mapping from the composed config
            self.pretrain = PretrainConf(**self.pretrain)
        if self.init not in INITS:
            raise UserError(
                f"model.init={self.init!r} is not a valid choice; choose one of: {', '.join(INITS)} "
                "(pretrained: the tiny preset's offline-pretrained checkpoint; random: random init)."
            )
        if self.init == "random" and self.arch is None:
            raise UserError(
                f"model.init=random applies to presets built from a config (tiny_*); model "
                f"'{self.name}' loads the weights of checkpoint '{self.name_or_path}'. Use a tiny_* "
                "preset for a randomly initialised model, or drop model.init."
            )


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
class MeasureConf:
    n_probe: int = 512
    pooling: str = "mean"  # mean | last | first | tokens
    token_positions: int = 8  # pooling=tokens: random token positions per sequence
    metrics: list[str] = field(
        default_factory=lambda: [
            "cosine",
            "cosine_tokens",
            "cka_linear",
            "cka_debiased",
            "procrustes",
            "euclidean",
        ]
    )
    n_boot: int = 1000
    n_boot_procrustes: int = 50  # Procrustes replicates cost ~100x the others: the first n of the same draws
    ci: float = 0.95
    ci_method: str = "basic"  # bootstrap CI: basic (2*slope - quantiles) | percentile
    plugin_ci: str = (
        "jackknife"  # cka_linear/procrustes: jackknife (d <= n/4; none above) | bootstrap (ci_method)
    )
    jackknife_groups: int = 32  # delete-a-group jackknife: groups of probe sequences
    width_threshold: float = 0.1  # width_count: layers whose change exceeds this (on each metric's own scale)
    kl_probe_train: int = (
        512  # init.kl for new heads: linear probe fitted on this many training examples (0: off)
    )
    every_n_steps: int = 0  # >0: also capture during training (profile dynamics)
    init_batches: int = 4  # training batches for the step-0 objective distance and gradient profile
    cache: bool = True  # reuse the pre-fine-tuning capture across runs
    update_ratios: bool = True  # log per-block ||dW||/||W|| every step in runs without equal_step
    cross_layer: bool = False  # (L+1)x(L+1) CKA matrices (Phang et al. 2021)
    cross_layer_pooling: str = "tokens"  # tokens (token_positions per probe sequence) | pooled (as `pooling`)
    drop_top_k: int = 0  # evaluate with the top k = 0..K blocks removed after training
    ntk: bool = False  # the empirical NTK at initialization per block (Afzal et al. 2025)
    ntk_examples: int = 32  # ... on the first n training examples
    ntk_params: str = "blocks"  # all | blocks | lora (see locality.ntk)


SCHEMAS = {
    "model": ModelConf,
    "data": DataConf,
    "measure": MeasureConf,
}


def register_resolvers() -> None:
    """Register the run-name resolver (`${run_name:}`, see `locality.core.identity`) and each group's schema
    (`/<group>_schema`, the base of its options: a root config, not in the group, so it is never offered as a choice)."""
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name_resolver)
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(name=f"{group}_schema", node=schema)


def apply_schemas(cfg: DictConfig) -> DictConfig:
    """Merge every group onto its schema (types, known keys); raise UserError naming the bad key and the valid
    keys. `locality.run.checks.validate` then checks every value's range or choices."""
    for group, schema in SCHEMAS.items():
        if group not in cfg:
            raise UserError(f"The config has no '{group}' group; did an experiment file remove it?")
        try:
            typed = OmegaConf.merge(OmegaConf.structured(schema), cfg[group])
        except OmegaConfBaseException as err:
            valid = ", ".join(schema.__dataclass_fields__)
            raise UserError(
                f"Invalid {group} config: {err.msg if hasattr(err, 'msg') else err}. "
                f"Valid {group}.* keys: {valid}."
            ) from None
        with_flag = OmegaConf.to_container(typed)
        OmegaConf.set_struct(cfg, False)
        cfg[group] = with_flag
    OmegaConf.set_struct(cfg, True)
    return cfg


def compose_train(overrides: list[str]) -> DictConfig:
    """`conf/train.yaml` with these overrides, composed outside `hydra.main` (the pretraining and NTK commands,
    benchmarks); a config Hydra cannot compose is a UserError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from locality.core.paths import conf_dir

    register_resolvers()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return compose("train", overrides=overrides)
    except HydraException as err:
        raise UserError(f"Could not compose the config: {err}") from None


def load_option(group: str, name: str) -> DictConfig:
    """One option of a config group (merged onto its schema where the group has one), outside Hydra (tests,
    notebooks)."""
    from locality.core.paths import conf_dir

    raw = OmegaConf.load(conf_dir() / group / f"{name}.yaml")
    raw.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), raw) if group in SCHEMAS else raw


def to_plain(value: Any) -> Any:
    return (
        OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
    )

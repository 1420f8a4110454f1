"""Typed schemas for the config groups, the run-name resolver, and validation before any work starts.

Every option of a group extends its dataclass schema (`defaults: [/<group>_schema@_here_, _self_]`), so every key can be
overridden on any option, and Hydra reports a misspelt key or a wrong type (exit 2) before a model is
loaded; `locality.run.checks.validate` then checks every value's range or choices. Controls are free-form
`_target_` configs: their constructor arguments are their schema (`locality.controls.build`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from locality.core.errors import UserError
from locality.core.identity import run_name_resolver
from locality.core.metric_names import MEASURE_METRICS
from locality.core.rules import STAGES, Check, Choice, Depends, Members, Range, Rule, integer, number, rule


def _n(noun: str, example: str, low: float | None = None, **kw: Any) -> Any:
    """A field's range rule (`locality.core.rules.Range`) as field metadata."""
    return rule(Range(noun, example, low, **kw))


@dataclass
class PretrainConf:
    """How a config-built (tiny_*) preset is pretrained offline before fine-tuning (`locality.pretrain`)."""

    # $LOCALITY_PRETRAIN_STEPS overrides it (a test/debug knob; it is part of the cache key)
    steps: int = field(default=400, metadata=_n("a number of pretraining steps", "400", 1))
    lr: float = 4.0e-3
    batch_size: int = 8
    seq_len: int = 128  # packed blocks of this many tokens
    seed: int = 0  # pretraining's own seed, independent of the fine-tuning seed
    warmup: float = 0.05  # fraction of steps, then cosine decay to 10% of lr
    weight_decay: float = 0.01
    mask_prob: float = 0.15  # masked LM (encoders): BERT's 15%, 80/10/10


INITS = ("pretrained", "random")
DTYPES = ("float32", "bfloat16", "float16", "float64")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention")
Family = Literal["encoder", "decoder", "ssm", "rnn"]

BlockType = Literal["sequential", "parallel", "recurrent"]
# The NTK's parameter sets (`locality.instrument.ntk_profile`): every trainable parameter, the blocks', LoRA's
NTK_PARAMS = ("all", "blocks", "lora")


@dataclass
class ModelConf:
    name: str = "hf"
    name_or_path: str | None = None  # a hub id or a local directory written by save_pretrained
    arch: str | None = None  # a transformers model type: the model is built from its config (tiny_* presets)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    # null: read from the checkpoint's config; set them (with blocks_path) for odd architectures
    family: str | None = field(default=None, metadata=rule(Choice(Family, null="listed")))
    block_type: str | None = field(default=None, metadata=rule(Choice(BlockType, null="listed")))
    blocks_path: str | None = None  # null: the longest ModuleList of same-class modules
    revision: str | None = None
    dtype: str = field(default="float32", metadata=rule(Choice(DTYPES)))
    trust_remote_code: bool = False
    # Config-built presets (`arch` set): start from the offline-pretrained checkpoint (cached, pretrained on
    # first use) or from random init. Checkpoint presets always load their weights: init=random is refused.
    init: str = field(default="pretrained", metadata=rule(Choice(INITS)))
    # How the forward runs (speed and memory only; the same weights): transformers' attention implementation
    # (null: its default, SDPA where the architecture has it) and activation checkpointing of the blocks.
    attn_implementation: str | None = field(default=None, metadata=rule(Choice(ATTENTION, null="unchecked")))
    gradient_checkpointing: bool = False
    pretrain: PretrainConf = field(default_factory=PretrainConf)

    def __post_init__(self) -> None:
        if not isinstance(self.pretrain, PretrainConf):  # a mapping from the composed config
            self.pretrain = PretrainConf(**self.pretrain)
        problem = rules_of(ModelConf)["init"][0].problem("model.init", self.init, None)
        if problem:
            raise UserError(problem)
        if self.init == "random" and self.arch is None:
            raise UserError(
                f"model.init=random applies to presets built from a config (tiny_*); model "
                f"'{self.name}' loads the weights of checkpoint '{self.name_or_path}'. Use a tiny_* "
                "preset for a randomly initialised model, or drop model.init."
            )


@dataclass
class DataConf:
    name: str = "stdlib_docs"
    # builtin: offline, read from the Python installation (`builtin` names which); hub: datasets.load_dataset
    source: str = field(default="builtin", metadata=rule(Choice(("builtin", "hub"))))
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
    # texts shorter than this are dropped before the split (every dataset, built-in or hub)
    min_chars: int = field(default=1, metadata=_n("an integer", "1", 0))
    max_train_examples: int | None = field(
        default=None, metadata=_n("an integer", "10000", 1, null="all")
    )  # cuts the training set
    n_validation: int = field(default=256, metadata=_n("an integer", "256", 1))
    batch_size: int = field(default=16, metadata=_n("an integer", "16", 1))
    eval_batch_size: int = field(default=64, metadata=_n("an integer", "64", 1))
    num_workers: int = field(default=0, metadata=_n("an integer", "0", 0))  # 0: exact resume (README)


def _enough_replicates(may_be_off: bool) -> Depends:
    def test(key: str, value: Any, cfg: Any) -> str | None:
        ci = cfg.measure.ci
        least = min_bootstrap(ci)
        if integer(value) and (value >= least or may_be_off and value == 0):
            return None
        off = " or 0 for no Procrustes bootstrap" if may_be_off else ""
        return (
            f"{key}={value!r} is too few bootstrap replicates for a {ci:.0%} interval: use at least {least} "
            f"(2 / (1 - measure.ci)){off}, e.g. {key}=200."
        )

    return Depends(
        test, "at least 2 / (1 - measure.ci) replicates" + (", or 0 for none" if may_be_off else "")
    )


def min_bootstrap(ci: float) -> int:
    """Fewest replicates that put at least one replicate in each tail of a `ci` interval (40 at 0.95)."""
    return math.ceil(2 / (1 - ci) - 1e-9)


def _no_adapters_yet(key: str, value: Any, cfg: Any) -> str | None:
    """A training run takes its kernel in the measurement callback's `setup`, before Lightning's
    `configure_model` lets the controls add LoRA adapters: there are none to take it over yet."""
    if value != "lora" or not cfg.measure.ntk:
        return None
    return (
        f"{key}=lora is not supported in a training run: the kernel is taken before any control adds its "
        f"LoRA adapters, so there are none to take it over. Use {key}=blocks (or all); the adapters' kernel "
        "is `python -m locality.ntk control=lora ntk.params=lora`."
    )


@dataclass
class MeasureConf:
    """The depth profile: representational change of every layer on a fixed held-out probe set."""

    n_probe: int = field(
        default=512, metadata=_n("an integer", "512", 4, note="512+ for stable CKA")
    )  # probe sequences (held out from training)
    # mean | last | first | tokens (token_positions random non-pad positions per sequence)
    pooling: str = field(default="mean", metadata=rule(Choice("locality.core.pooling:POOLINGS")))
    token_positions: int = field(default=8, metadata=_n("an integer", "8", 1))
    # cosine: 1 - cos of pooled features; cosine_tokens: 1 - cos of every non-pad token (the paper's; one extra
    # forward of the probe set through the pretrained weights); cka_linear, cka_debiased, procrustes, euclidean
    metrics: list[str] = field(
        default_factory=lambda: [
            "cosine",
            "cosine_tokens",
            "cka_linear",
            "cka_debiased",
            "procrustes",
            "euclidean",
        ],
        metadata=rule(Members(MEASURE_METRICS, noun="metric")),
    )
    # bootstrap replicates over probe sequences for the slope CI
    n_boot: int = field(default=1000, metadata=rule(_enough_replicates(False)))
    # Procrustes replicates (each costs ~100x the others): the first n of the same draws; 0: none
    n_boot_procrustes: int = field(default=50, metadata=rule(_enough_replicates(True)))
    ci: float = field(
        default=0.95, metadata=_n("a coverage level", "0.95", 0, high=1, low_open=True, whole=False)
    )  # level of every slope interval
    # bootstrap interval: basic (2*slope - replicate quantiles) | percentile
    ci_method: str = field(default="basic", metadata=rule(Choice(("basic", "percentile"))))
    # cka_linear, procrustes (plug-in, biased as d nears n): jackknife = bias-corrected delete-a-group
    # jackknife when d <= n/4 and no interval above (ci_note says why); bootstrap = ci_method as for the
    # other metrics (undercovers: bench/ci_coverage.py)
    plugin_ci: str = field(default="jackknife", metadata=rule(Choice(("jackknife", "bootstrap"))))
    # groups of probe sequences for the jackknife (G; t interval with G-1 df)
    jackknife_groups: int = field(default=32, metadata=_n("an integer", "32", 2))
    # width_count = layers whose change exceeds this, on each metric's own scale (1 - cos > 0.1, CKA < 0.9,
    # Procrustes > 0.1; euclidean/weight_rel: compare within a model)
    width_threshold: float = field(default=0.1, metadata=_n("a change", "0.1", 0, whole=False))
    # init.kl for objectives with a new head (cls, tok): a linear probe of the frozen features fitted on the
    # first n training examples, scored on validation; costs forwards of these n + the validation examples
    # (~1.5x a probe capture)
    kl_probe_train: int = field(
        default=512, metadata=_n("an integer", "512", 0, note="0 turns the probe off")
    )
    # > 0: also capture during training (profile dynamics)
    every_n_steps: int = field(default=0, metadata=_n("an integer", "0", 0, note="0: no dynamics"))
    # training batches for the step-0 objective distance and gradient profile
    init_batches: int = field(default=4, metadata=_n("an integer", "4", 1))
    cache: bool = True  # reuse the pre-fine-tuning capture across runs with the same weights
    update_ratios: bool = True  # runs without equal_step log per-block ||dW||/||W|| (update_ratio/block_NN)
    cross_layer: bool = (
        False  # layer x layer CKA matrices of the pretrained and fine-tuned model (Phang et al.)
    )
    # rows of those matrices: tokens (token_positions random non-pad tokens per probe sequence, as Phang et
    # al.) | pooled (the profile's pooled features)
    cross_layer_pooling: str = field(default="tokens", metadata=rule(Choice(("tokens", "pooled"))))
    # after training, evaluate with the top k = 0..K blocks removed
    drop_top_k: int = field(default=0, metadata=_n("an integer", "0", 0))
    # the empirical NTK at initialization, per block (Afzal et al. 2025; see `python -m locality.ntk`)
    ntk: bool = False
    ntk_examples: int = field(
        default=32, metadata=_n("a number of examples", "32", 2)
    )  # first n training ones
    # all: every trainable parameter (with the word embeddings: slow for large vocabularies); blocks; lora:
    # the adapters, only in `python -m locality.ntk` (a run's kernel is taken before they exist)
    ntk_params: str = field(
        default="blocks",
        metadata=rule(
            Choice(NTK_PARAMS),
            Depends(_no_adapters_yet, "lora: only in python -m locality.ntk", stage="last"),
        ),
    )


# The groups built from a `_target_` (trainer, optim, scheduler, objective) have no schema: their target's
# signature is one (`locality.core.components`). Their rules live here, one class per group, beside the keys
# they govern; a key the chosen option lacks (optim.momentum under adamw) is not checked.
MIN_LR = 1e-8


def _devices(value: Any) -> bool:
    return (
        value == "auto"
        or (integer(value) and (value >= 1 or value == -1))
        or (isinstance(value, list) and len(value) > 0 and all(integer(v) and v >= 0 for v in value))
    )


def _shapes() -> tuple[str, ...]:
    from transformers import SchedulerType

    return tuple(s.value for s in SchedulerType if s.value != "greedy")


def _warmup_ends(key: str, value: Any, cfg: Any) -> str | None:
    steps = cfg.trainer.max_steps
    if not (number(value) and value >= 1 and value >= steps):
        return None
    return (
        f"{key}={value:g} steps >= trainer.max_steps={steps}: the run would end before the learning rate "
        f"reached its value. Use a fraction (e.g. {key}=0.1) or fewer steps."
    )


@dataclass
class RunRules:
    """Top-level keys (conf/train.yaml)."""

    seed: int = field(metadata=_n("an integer", "0", 0, high=2**32, note="numpy's seed range"))


@dataclass
class TrainerRules:
    """trainer.*: lightning.pytorch.Trainer arguments, and locality's own keys (`locality.run.trainer`)."""

    max_steps: int = field(metadata=_n("a number of optimizer steps", "100", 1))
    max_epochs: int = field(
        metadata=rule(
            Check(
                "",
                "-1",
                words="-1 (no epoch limit: trainer.max_steps decides) or an integer >= 1",
                test=lambda v: v is None or v == -1 or (integer(v) and v >= 1),
            )
        )
    )
    devices: Any = field(
        metadata=rule(
            Check(
                "",
                "1",
                words="a number of devices >= 1, -1 (all), 'auto' or a list of indices",
                test=_devices,
            )
        )
    )
    val_check_interval: float | None = field(
        metadata=_n(
            "",
            "null",
            0,
            low_open=True,
            whole=False,
            null="",
            words="a number of batches >= 1 or a fraction of an epoch in (0, 1], or null",
        )
    )
    limit_train_batches: float = field(
        metadata=_n("a number or fraction of batches", "1.0", 0, low_open=True, whole=False, null="")
    )
    limit_val_batches: float = field(
        metadata=_n("a number or fraction of batches", "1.0", 0, low_open=True, whole=False, null="")
    )
    fast_dev_run: bool = field(
        metadata=rule(
            Check(
                "",
                "false",
                test=lambda v: v in (False, None, 0),
                words="false: it runs a handful of steps with no checkpoint, logger or measurement, so nothing "
                "it reports is a run; use trainer=smoke for a quick real run",
            )
        )
    )
    accumulate_grad_batches: int = field(metadata=_n("an integer", "1", 1))
    ckpt_every_n_steps: int = field(metadata=_n("an integer", "100", 1))
    log_every_n_steps: int = field(metadata=_n("an integer", "10", 1))
    gradient_clip_val: float | None = field(
        metadata=_n("a norm", "1.0", 0, low_open=True, whole=False, null="no clipping")
    )
    precision: str = field(
        metadata=rule(Choice("lightning.fabric.connector:_PRECISION_INPUT_STR", as_text=True))
    )
    accelerator: str = field(metadata=rule(Choice(("auto", "cpu", "gpu", "cuda", "mps"))))
    # highest | high (TF32 float32 matmuls on GPUs that have them) | medium
    matmul_precision: str = field(metadata=rule(Choice(("highest", "high", "medium"))))
    # torch.compile every block's forward: true is inductor, or a backend name
    compile: Any = field(metadata=rule(Choice((False, True, "inductor", "aot_eager", "eager"))))
    # last: kept after the run; none: deleted once results.json is written
    keep_checkpoint: str = field(metadata=rule(Choice(("last", "none"))))


@dataclass
class OptimRules:
    """optim.*: a torch optimizer's constructor arguments."""

    lr: float = field(
        metadata=_n(
            "a learning rate",
            "1e-4",
            MIN_LR,
            whole=False,
            note="below it no weight moves by 1e-6 of its norm: the run would not train",
        )
    )
    weight_decay: float = field(metadata=_n("a number", "0.01", 0, whole=False))
    eps: float = field(metadata=_n("a number", "1e-8", 0, low_open=True, whole=False))
    betas: list[float] = field(
        metadata=rule(
            Check(
                "",
                "[0.9,0.999]",
                words="two numbers in [0, 1)",
                test=lambda v: (
                    isinstance(v, list) and len(v) == 2 and all(number(b) and 0 <= b < 1 for b in v)
                ),
            )
        )
    )
    momentum: float = field(metadata=_n("a number", "0.9", 0, high=1, whole=False))


@dataclass
class SchedulerRules:
    """scheduler.*: `locality.run.schedules.warmup_then`'s arguments."""

    # a fraction of the steps (< 1) or a number of steps
    warmup: float = field(
        metadata=rule(
            Range(
                "", "0.1", 0, whole=False, words="a fraction of the steps in [0, 1) or a number of steps >= 1"
            ),
            Depends(_warmup_ends, "fewer steps than trainer.max_steps", stage="last"),
        )
    )
    # any transformers.get_scheduler name but greedy
    shape: str = field(metadata=rule(Choice(_shapes)))


@dataclass
class ObjectiveRules:
    """objective.*: an objective's constructor arguments (`locality.objectives`); each applies where the chosen
    objective takes the key."""

    max_length: int = field(metadata=_n("a number of tokens", "128", 2))
    head_hidden: int | None = field(metadata=_n("a width", "null", 1, null="the hidden size"))
    head_dropout: float = field(metadata=_n("a probability", "0.1", 0, high=1, whole=False))
    mask_prob: float = field(metadata=_n("a probability", "0.15", 0, high=1, low_open=True, whole=False))
    alpha: float = field(metadata=_n("a finite perturbation scale", "1.0", 0, whole=False))
    noise: float = field(
        metadata=_n("a fraction of noisy labels", "0.25", 0, high=1, high_closed=True, whole=False)
    )
    classes: int = field(metadata=_n("a number of classes", "8", 2))


# Where each key's rules live: the prefix of its keys and the class holding them.
HOMES: dict[str, type] = {
    "": RunRules,
    "model": ModelConf,
    "model.pretrain": PretrainConf,
    "data": DataConf,
    "measure": MeasureConf,
    "trainer": TrainerRules,
    "optim": OptimRules,
    "scheduler": SchedulerRules,
    "objective": ObjectiveRules,
}


def rules_of(home: type) -> dict[str, tuple[Rule, ...]]:
    """A home's fields and their rules (read at every call: a test may change one in place)."""
    return {f.name: f.metadata["rules"] for f in fields(home) if "rules" in f.metadata}


def all_rules() -> list[tuple[str, Rule]]:
    """(dotted key, rule) for every rule of every home, in the order checks run them (`rules.STAGES`)."""
    found = [
        (f"{prefix}.{name}" if prefix else name, r)
        for prefix, home in HOMES.items()
        for name, rules in rules_of(home).items()
        for r in rules
    ]
    return sorted(found, key=lambda kr: STAGES.index(kr[1].stage))


def describe(key: str) -> str:
    """What `key` may be, from its rules' home (the words its error message uses): e.g. describe("optim.lr")."""
    prefix, _, name = key.rpartition(".")
    home = HOMES.get(prefix)
    rules = rules_of(home).get(name) if home else None
    if not rules:
        raise KeyError(f"{key} has no rule (keys with rules: {', '.join(k for k, _ in all_rules())})")
    example = next((r.example for r in rules if isinstance(r, Range)), None)
    text = "; ".join(r.describe() for r in rules)
    return f"{key}: {text}" + (f" (e.g. {key}={example})" if example else "")


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

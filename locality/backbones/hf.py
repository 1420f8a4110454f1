"""The few facts about Hugging Face models that loading, pretraining and objectives share: which auto class
loads which head, the token ids a config-built model takes from its tokenizer, and `no_cache`."""

from __future__ import annotations

from typing import Literal

from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedTokenizerBase

HeadKind = Literal["base", "causal_lm", "masked_lm"]

AUTO_CLASSES = {"base": AutoModel, "causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM}


def no_cache(model: nn.Module) -> dict:
    """Training never needs the generation cache; RWKV even updates its state in place with it (which
    breaks backward in eval mode), so models that have one are told not to use it."""
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


def token_ids(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The vocabulary size and special-token ids a model built from a config must agree on with its tokenizer."""
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        ids["bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        ids["eos_token_id"] = tokenizer.eos_token_id
    return ids

"""Which family (encoder, decoder, ssm, rnn) and block type (sequential, parallel, recurrent) a model is,
from its transformers config alone."""

from __future__ import annotations

from locality.core.config import BlockType, Family  # noqa: F401 -- the families' names, stated with their rule

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

"""Which parameters get weight decay: one rule, by module type, for every model family.

AdamW decays the weight matrices of linear and convolutional layers (`nn.Linear`, `nn.Conv1d`,
`nn.Conv2d`, `nn.Conv3d`, and transformers' `Conv1D`, GPT-2's linear layer) and nothing else: no decay on
biases, norms, embeddings, parameters owned directly by any other module type (RWKV's `time_decay`,
`time_first`, `time_mix_*`; Mamba's `A_log` and `D`), and parameters a model marks
`_no_weight_decay = True`. Deciding by type rather than by parameter name keeps the rule the same across
families whose names differ (GPT-2's `wte`, Pythia's `embed_out`, ...).

A parameter shared by several modules (an LM head tied to the input embedding) lands in exactly one
group, and an embedding owner wins: a tied embedding/LM head is not decayed, an untied LM head (a Linear,
e.g. Pythia's `embed_out`) is. Only parameters with `requires_grad` are listed.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

DECAYED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)


def decays(owners: list[tuple[nn.Module, str]], param: nn.Parameter) -> bool:
    """Whether `param`, held by `owners` as (module, attribute name) pairs, gets weight decay."""
    if getattr(param, "_no_weight_decay", False):
        return False
    if any(isinstance(module, nn.Embedding) for module, _ in owners):
        return False
    return any(isinstance(module, DECAYED_TYPES) and attr == "weight" for module, attr in owners)


def decay_split(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(decay, no_decay): the trainable parameters of `model` by name (each parameter once, under its
    first name in `model.named_parameters()`), split by the rule of this module."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, attr))
    decay, no_decay = {}, {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(owners[id(param)], param) else no_decay)[name] = param
    return decay, no_decay

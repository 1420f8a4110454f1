"""`objective=native`: the backbone's own pretraining objective, masked LM for encoders, causal LM otherwise."""

from __future__ import annotations

from locality.objectives.base import Objective
from locality.objectives.clm import CausalLM
from locality.objectives.mlm import MaskedLM


class NativeObjective:
    """A selector, not an objective: its arguments are those of the objectives it picks between."""

    def __init__(self, max_length: int = 128, mask_prob: float = 0.15):
        raise TypeError("NativeObjective selects an objective class with for_family(); it is never built.")

    @staticmethod
    def for_family(family: str) -> type[Objective]:
        return MaskedLM if family == "encoder" else CausalLM

"""Objectives by name. Adding one = a file here defining an `Objective` subclass + `conf/objective/<name>.yaml`."""

from __future__ import annotations

from locality.errors import UserError
from locality.objectives.base import Objective, StepOutput
from locality.objectives.clm import CausalLM
from locality.objectives.cls import SequenceClassification
from locality.objectives.mlm import MaskedLM
from locality.objectives.tok import TokenClassification

OBJECTIVES: dict[str, type[Objective]] = {
    o.name: o for o in (CausalLM, MaskedLM, SequenceClassification, TokenClassification)
}


def objective_class(name: str, family: str | None = None) -> type[Objective]:
    """The objective's class; `native` is the family's own pretraining objective (mlm for encoders, else clm)."""
    if name == "native":
        if family is None:
            raise ValueError("objective 'native' needs the model family")
        name = "mlm" if family == "encoder" else "clm"
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UserError(
            f"Unknown objective '{name}'. Objectives: {', '.join([*OBJECTIVES, 'native'])}."
        ) from None


__all__ = ["OBJECTIVES", "Objective", "StepOutput", "objective_class"]

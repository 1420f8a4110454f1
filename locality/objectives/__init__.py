"""Objectives are built from config: `conf/objective/<name>.yaml` names an `Objective` subclass in `_target_`
and sets its constructor's keyword arguments. Adding one is a .py defining the subclass plus that yaml.

`name` in the yaml is the objective's name in run directories; a target may instead be a selector with a
`for_family(family)` method (`native`: the family's own pretraining objective).
"""

from __future__ import annotations

from omegaconf import DictConfig

from locality.backbones import Backbone
from locality.core.components import HYDRA_KEYS, arguments, check_component, instantiate_component
from locality.core.errors import UserError
from locality.objectives.base import Objective, StepOutput, Task

FRAMEWORK_KEYS = ("name",)  # read by the framework, not passed to the objective
SUPPLIED = ("backbone", "task")  # passed by the framework when it builds the objective


def check_objective_config(cfg: DictConfig) -> type:
    """The config's target (an Objective or a selector), every key checked against its constructor."""
    if not isinstance(cfg, DictConfig) or not cfg.get("name"):
        raise UserError("objective needs a `name` (its name in run directories), e.g. `name: cls`.")
    return check_component(cfg, "objective", supplied_elsewhere=SUPPLIED, extra_keys=FRAMEWORK_KEYS)


def objective_class(cfg: DictConfig, family: str | None = None) -> type[Objective]:
    """The objective's class for this model family, its config checked (UserError before any work)."""
    target = check_objective_config(cfg)
    if hasattr(target, "for_family"):
        if family is None:
            raise ValueError(f"objective '{cfg.get('name')}' needs the model family")
        target = target.for_family(family)
    if not (isinstance(target, type) and issubclass(target, Objective)):
        raise UserError(f"objective: {cfg['_target_']} is not a locality Objective.")
    return target


def build_objective(cfg: DictConfig, backbone: Backbone, task: Task) -> Objective:
    """The objective for this backbone and task, with the options its class takes (a selector's options that
    the chosen class does not take are its other choices' and are left out)."""
    cls = objective_class(cfg, backbone.family)
    cls.check(backbone, task)
    accepted = arguments(cls, SUPPLIED)
    unused = [key for key in cfg if key not in accepted and key not in HYDRA_KEYS]
    return instantiate_component(
        DictConfig({**cfg, "_target_": f"{cls.__module__}.{cls.__qualname__}"}),
        "objective",
        extra_keys=unused,
        backbone=backbone,
        task=task,
    )


__all__ = ["Objective", "StepOutput", "Task", "build_objective", "check_objective_config", "objective_class"]

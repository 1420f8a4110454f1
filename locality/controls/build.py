"""Build the run's controls from the `control` config group, turning any bad argument into a UserError.

A control's constructor signature is its schema: an argument it does not take is refused with the list of
those it does, and a value its constructor refuses is reported with the control's own explanation.
"""

from __future__ import annotations

import inspect

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from locality.controls.base import Control
from locality.errors import UserError


def build_controls(control_cfg: DictConfig | None) -> list[Control]:
    """One Control per entry of the `control` group (`control=standard` has none)."""
    if control_cfg is not None and not isinstance(control_cfg, DictConfig):
        raise UserError("control must be a mapping of control components (e.g. control=equal_step).")
    return [_build(name, component) for name, component in (control_cfg or {}).items()]


def _build(name: str, component: DictConfig) -> Control:
    plain = OmegaConf.to_container(component, resolve=True)
    if not isinstance(plain, dict) or "_target_" not in plain:
        raise UserError(
            f"control.{name} must be a mapping with a `_target_` (a Control class), got {plain!r}."
        )
    try:
        cls = get_class(plain["_target_"])
    except Exception:  # noqa: BLE001 -- any import failure means the same thing to the user
        raise UserError(
            f"control.{name}: `_target_: {plain['_target_']}` is not an importable class."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Control)):
        raise UserError(f"control.{name}: {plain['_target_']} is not a locality Control.")
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(plain) - {"_target_", *accepted})
    if unknown:
        raise UserError(
            f"control.{name} has no argument(s) {unknown}; {cls.__name__} takes: {', '.join(accepted)}."
        )
    try:
        return instantiate(component)
    except InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise UserError(f"control.{name}: {cause}") from None

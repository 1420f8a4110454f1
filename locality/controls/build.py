"""Build the run's controls from the `control` config group, turning any bad argument into a UserError.

A control's constructor signature is its schema (`locality.core.components`): an argument it does not take is
refused with the list of those it does, and a value its constructor refuses is reported with the
control's own explanation.
"""

from __future__ import annotations

from omegaconf import DictConfig

from locality.controls.base import Control
from locality.core.components import check_component, instantiate_component
from locality.core.errors import UserError


def build_controls(control_cfg: DictConfig | None) -> list[Control]:
    """One Control per entry of the `control` group (`control=standard` has none)."""
    if control_cfg is not None and not isinstance(control_cfg, DictConfig):
        raise UserError("control must be a mapping of control components (e.g. control=equal_step).")
    controls = []
    for name, component in (control_cfg or {}).items():
        check_component(component, f"control.{name}", base=Control)
        controls.append(instantiate_component(component, f"control.{name}"))
    return controls

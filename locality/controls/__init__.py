"""Controls: Lightning callbacks that change how fine-tuning proceeds (see `locality.controls.base`).

Adding one = a file here defining a `Control` subclass + `conf/control/<name>.yaml` with its `_target_`.
"""

from locality.controls.base import Control
from locality.controls.equal_step import EqualStep
from locality.controls.freeze import Freeze
from locality.controls.l2sp import L2SP
from locality.controls.linearized import Linearized
from locality.controls.llrd import LayerwiseLRDecay
from locality.controls.lora import LoRA
from locality.controls.lp_ft import LPFT
from locality.controls.update_core import EqualStepCore

__all__ = [
    "Control",
    "EqualStep",
    "EqualStepCore",
    "Freeze",
    "L2SP",
    "LPFT",
    "LayerwiseLRDecay",
    "Linearized",
    "LoRA",
]

"""The first-order value of a forward-mode dual tensor: what the `linearized` control's blocks output, and what
the depth profile captures of them (`locality.instrument.capture`)."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad


def first_order(tensor: torch.Tensor) -> torch.Tensor:
    """A forward-mode dual tensor (the `linearized` control's forward) as its first-order value, primal +
    tangent; any other tensor as it is."""
    primal, tangent = forward_ad.unpack_dual(tensor)
    return tensor if tangent is None else primal + tangent

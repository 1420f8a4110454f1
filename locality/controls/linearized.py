"""Linearized fine-tuning: train the first-order Taylor model of the pretrained network around theta_0.

The pretrained network (`module.pretrained`, the base model every objective reads: embeddings, blocks, final
norm) computes, from now on, z(x; theta) = z(x; theta_0) + J(theta_0)(theta - theta_0), a real linearization
(Afzal et al. 2025): forward-mode AD (`torch.autograd.forward_ad`) pushes the tangent theta - theta_0 through
the network at the frozen snapshot theta_0, and gradient descent trains theta through that tangent. Every
output of the forward (last hidden state, any `hidden_states`) is its first-order value; so are the block
outputs the depth profile captures (`locality.backbones.first_order`). Training and evaluation both
use the linearized model. What reads the features stays as it is: a new task head, or the LM head of
clm/mlm (a tied GPT-2 head reads the current, not the linearized, embedding matrix).

Cost: a forward with tangents (~2-3x a plain forward) and its backward, and one copy of the pretrained
weights. Forward-mode AD needs eager attention (SDPA has no forward derivative), which this control selects.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call

from locality.backbones.first_order import first_order
from locality.controls.base import Control


class Linearized(Control):
    name = "linearized"

    def __init__(self):
        self.forward: LinearizedForward | None = None

    def configure_model(self, module) -> None:
        use_eager_attention(module.model)
        self.forward = LinearizedForward(module.pretrained)

    def summary(self) -> dict:
        n = sum(t.numel() for t in self.forward.theta0.values()) if self.forward else 0
        return {"linearized_params": n}


class LinearizedForward:
    """Replaces `network.forward` by its linearization around the network's current (pretrained) weights."""

    def __init__(self, network: nn.Module):
        self.network = network
        self.theta0 = {name: p.detach().clone() for name, p in network.named_parameters()}
        self.original = network.forward
        self.inside = False
        network.forward = self

    def __call__(self, *args, **kwargs):
        if self.inside:  # the inner functional_call below runs the network's own forward
            return self.original(*args, **kwargs)
        theta = {
            name: _attribute(self.network, name) for name in self.theta0
        }  # swapped under functional_call
        self._follow(next(iter(theta.values())))
        with _forward_ad_allowed(), forward_ad.dual_level():
            duals = {name: forward_ad.make_dual(t0, theta[name] - t0) for name, t0 in self.theta0.items()}
            self.inside = True
            try:
                out = functional_call(self.network, duals, args, kwargs)
            finally:
                self.inside = False
            return pytree.tree_map(lambda v: first_order(v) if isinstance(v, torch.Tensor) else v, out)

    def _follow(self, param: torch.Tensor) -> None:
        """Keep the snapshot on the parameters' device and dtype (the trainer moves the model after setup)."""
        t0 = next(iter(self.theta0.values()))
        if t0.device != param.device or t0.dtype != param.dtype:
            self.theta0 = {k: v.to(param.device, param.dtype) for k, v in self.theta0.items()}


def _attribute(module: nn.Module, dotted: str) -> torch.Tensor:
    owner, _, leaf = dotted.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _forward_ad_allowed() -> contextlib.ExitStack:
    """Inference mode turns forward AD off; under it (Lightning's validation) run in no_grad mode instead."""
    stack = contextlib.ExitStack()
    if torch.is_inference_mode_enabled():
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
    return stack


def use_eager_attention(model: nn.Module) -> None:
    """Select eager attention (forward-mode AD through SDPA / flash attention is not implemented)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) in (None, "eager"):
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        config._attn_implementation = "eager"

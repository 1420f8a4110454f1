"""control=linearized: the first-order Taylor model of the pretrained network, checked against the network itself
(equal at theta_0), a finite-difference derivative (the tangent is J v), exact linearity in theta, the loss
trajectory of the full model for a tiny step size, the block outputs the depth profile captures, and
evaluation under inference mode."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import double_gpt2

from locality.controls import Linearized
from locality.controls.linearized import use_eager_attention
from locality.instrument.capture import block_hooks


def linearized(model):
    """A linearized copy of the model (the control applied as the module would apply it)."""
    model = copy.deepcopy(model)
    module = SimpleNamespace(model=model, pretrained=model.transformer, blocks=model.transformer.h)
    control = Linearized()
    control.configure_model(module)
    return model, control


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 40, (3, 7))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}


def direction(model, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for n, p in model.transformer.named_parameters()
    }


def move(model, v, eps):
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            p.add_(v[name], alpha=eps)


def features(model, batch):
    return model.transformer(**batch).last_hidden_state


def test_equals_the_network_at_theta0(batch):
    model = double_gpt2()
    lin, _ = linearized(model)
    torch.testing.assert_close(features(lin, batch), features(model, batch), rtol=0, atol=1e-13)
    torch.testing.assert_close(lin(**batch).logits, model(**batch).logits, rtol=0, atol=1e-12)


def test_tangent_is_a_finite_difference_derivative_and_exactly_linear(batch):
    model = double_gpt2()
    lin, _ = linearized(model)
    v, eps, h = direction(model), 1e-2, 1e-7  # v is large (unit normal entries): a small h
    f0 = features(model, batch)
    move(lin, v, eps)
    jv = (features(lin, batch) - f0) / eps
    plus, minus = copy.deepcopy(model), copy.deepcopy(model)
    move(plus, v, h)
    move(minus, v, -h)
    central = (features(plus, batch) - features(minus, batch)) / (2 * h)  # J v + O(h^2)
    torch.testing.assert_close(jv, central, rtol=1e-6, atol=1e-6)
    move(lin, v, 9 * eps)  # theta_0 + 10 eps v: ten times the change, however non-linear the network
    torch.testing.assert_close(features(lin, batch) - f0, 10 * eps * jv, rtol=1e-9, atol=1e-11)
    move(model, v, 10 * eps)
    assert (
        features(model, batch) - f0 - 10 * eps * jv
    ).abs().max() > 1e-6  # the network itself is not linear


def clm_losses(model, batch, lr, steps=5):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(**batch).logits[:, :-1]  # the loss in float64 (transformers' own casts to float32)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten())
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.tensor(losses, dtype=torch.float64)


def test_loss_trajectory_matches_the_full_model_for_a_tiny_step(batch):
    model = double_gpt2()

    def gap(lr):  # max |loss_linearized - loss_full| over 5 SGD steps, relative to how far the loss moved
        lin, _ = linearized(model)
        full, linear = clm_losses(copy.deepcopy(model), batch, lr), clm_losses(lin, batch, lr)
        return float((linear - full).abs().max() / (full - full[0]).abs().max())

    small, smaller = gap(1e-4), gap(1e-5)
    assert small < 1e-2
    assert smaller < small / 5  # the gap is second order: relative to the first-order move it shrinks with lr
    assert gap(1e-1) > 0.1  # with a large step the two models part


def test_captured_block_outputs_are_first_order(batch):
    model = double_gpt2()
    lin, _ = linearized(model)
    v = direction(model)
    sink = [None] * 3

    def last_block(m):
        with block_hooks(m.transformer.h, sink), torch.no_grad():
            m.transformer(**batch)
        return sink[-1].clone()

    at0 = last_block(lin)
    move(lin, v, 1e-2)
    once = last_block(lin)
    move(lin, v, 1e-2)
    twice = last_block(lin)
    torch.testing.assert_close(twice - at0, 2 * (once - at0), rtol=1e-9, atol=1e-12)
    move(model, v, 2e-2)
    assert (last_block(model) - twice).abs().max() > 1e-7


def test_inference_mode_evaluates_the_linearized_model(batch):
    model = double_gpt2()
    lin, control = linearized(model)
    move(lin, direction(model), 1e-2)
    with torch.no_grad():
        expected = features(lin, batch)
    with torch.inference_mode():
        got = features(lin, batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert control.summary()["linearized_params"] == sum(p.numel() for p in model.transformer.parameters())


def test_sdpa_models_switch_to_eager_attention():
    model = double_gpt2(attn="sdpa")
    use_eager_attention(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_a_linearized_run_trains_and_measures(train):
    results = train("model=tiny_gpt2", "objective=clm", "control=linearized")
    assert results["controls"]["linearized"]["linearized_params"] > 0
    assert max(results["change"]["cosine_tokens"][1:]) > 0  # the linearized blocks' outputs moved
    assert results["final"]["loss"] > 0

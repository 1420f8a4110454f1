"""L2-SP's selective pull (Afzal et al. 2025): a tensor is pulled toward theta_0 only while the task gradient
points away from it, grad R . (theta - theta_0) >= 0; the plain penalty is unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from locality.controls import L2SP


def module_with_two_tensors():
    net = nn.Linear(2, 1, bias=True)
    return SimpleNamespace(pretrained=net, blocks=nn.ModuleList([net])), net


def test_selective_pulls_only_tensors_moving_away():
    module, net = module_with_two_tensors()
    control = L2SP(strength=0.5, selective=True)
    control.configure_model(module)
    with torch.no_grad():
        net.weight.add_(torch.tensor([[1.0, -2.0]]))  # theta - theta_0 = (1, -2)
        net.bias.add_(torch.tensor([3.0]))  # theta - theta_0 = 3
    net.weight.grad = torch.tensor([[1.0, 0.0]])  # . (1, -2) = 1 >= 0: moving away, pulled
    net.bias.grad = torch.tensor([-1.0])  # . 3 = -3 < 0: already heading back, left alone
    assert control.penalty(module) is None  # the selective pull is not a loss term
    control.on_before_optimizer_step(None, None, None)
    torch.testing.assert_close(net.weight.grad, torch.tensor([[1.0 + 0.5, 0.0 - 1.0]]))
    torch.testing.assert_close(net.bias.grad, torch.tensor([-1.0]))
    assert control.summary() == {"pulled_fraction": pytest.approx(0.5)}


def test_selective_pull_matches_the_penalty_gradient_when_every_tensor_moves_away():
    torch.manual_seed(0)
    module, net = module_with_two_tensors()
    plain, selective = L2SP(strength=0.3), L2SP(strength=0.3, selective=True)
    plain.configure_model(module)
    selective.configure_model(module)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    task_grads = [p.detach() - a for p, a in zip(net.parameters(), plain.anchors, strict=True)]  # points away
    net.zero_grad()
    plain.penalty(module).backward()
    expected = [g + p.grad for g, p in zip(task_grads, net.parameters(), strict=True)]
    for p, g in zip(net.parameters(), task_grads, strict=True):
        p.grad = g.clone()
    selective.on_before_optimizer_step(None, None, None)
    for p, e in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e)


def test_plain_l2sp_keeps_its_penalty_and_empty_summary():
    module, net = module_with_two_tensors()
    control = L2SP(strength=2.0)
    control.configure_model(module)
    with torch.no_grad():
        net.bias.add_(1.0)
    assert control.penalty(module).item() == pytest.approx(1.0)  # 2/2 * 1^2
    net.bias.grad = torch.zeros(1)
    control.on_before_optimizer_step(None, None, None)
    assert float(net.bias.grad) == 0.0 and control.summary() == {}

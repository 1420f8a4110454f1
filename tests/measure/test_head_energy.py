"""Ren et al. 2023's head energy and feature-adaptation metrics on hand-computed cases, and LP-FT's strategies."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from locality.controls import LPFT
from locality.measure import feature_adaptation, feature_norm
from locality.measure.head_energy import energy_stats, head_energy
from locality.objectives.base import IGNORE


def test_energy_of_a_hand_computed_case():
    # p = softmax([ln 3, 0]) = [3/4, 1/4] for both rows; row 1 label 0: ||[1,0]-p|| = sqrt(2)/4,
    # row 2 label 1: ||[0,1]-p|| = 3 sqrt(2)/4; the mean is sqrt(2)/2. The IGNORE row is not scored.
    logits = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0], [5.0, -5.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, IGNORE])
    assert head_energy(logits, labels) == pytest.approx(math.sqrt(2) / 2, abs=1e-12)
    stats = energy_stats(logits, labels)
    assert stats["loss"] == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, abs=1e-12)
    assert stats["acc"] == 0.5 and stats["n"] == 2


def test_energy_bounds_uniform_and_token_shaped_logits():
    K = 3
    uniform = torch.zeros(4, 2, K)  # [batch, tokens, K] as a token head gives them
    labels = torch.tensor([[0, 1], [2, IGNORE], [1, 1], [IGNORE, 0]])
    assert head_energy(uniform, labels) == pytest.approx(math.sqrt(1 - 1 / K), abs=1e-12)
    confident_right = torch.tensor([[50.0, 0.0, 0.0]])
    confident_wrong = torch.tensor([[0.0, 50.0, 0.0]])
    assert head_energy(confident_right, torch.tensor([0])) == pytest.approx(0.0, abs=1e-12)
    assert head_energy(confident_wrong, torch.tensor([0])) == pytest.approx(math.sqrt(2), abs=1e-12)


def test_feature_adaptation_known_values():
    # one layer, two examples: z0 = (3, 4), zT = (6, 8) (same direction, twice the norm);
    # z0 = (1, 0), zT = (0, 2) (orthogonal)
    pre = [torch.tensor([[3.0, 4.0], [1.0, 0.0]])]
    post = [torch.tensor([[6.0, 8.0], [0.0, 2.0]])]
    f = feature_adaptation(pre, post)
    assert f["euclidean"] == pytest.approx([(5 + math.sqrt(5)) / 2])
    assert f["cosine"] == pytest.approx([(0 + 1) / 2])
    assert f["dot"] == pytest.approx([(50 + 0) / 2])
    assert f["norm"] == pytest.approx([(10 + 2) / 2])
    assert f["norm_ratio"] == pytest.approx([(2 + 2) / 2])
    assert feature_norm(pre[0], post[0]) == pytest.approx(6.0)


def test_label_smoothing_penalty_makes_the_smoothed_probing_loss():
    control = LPFT(probe_steps=5, label_smoothing=0.2)
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    control._logits, control._labels = logits, labels
    total = nn.functional.cross_entropy(logits, labels) + control.penalty(None)
    assert float(total.detach()) == pytest.approx(
        float(nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)), abs=1e-6
    )
    assert control._logits is None  # used once, for the step that produced it
    assert LPFT(probe_steps=5).penalty(None) is None


def test_temperature_divides_the_head_logits_while_probing_in_training_mode_only():
    control = LPFT(probe_steps=5, temperature=4.0)
    head = nn.Linear(3, 2)
    head.register_forward_hook(control._probe_logits)
    x = torch.randn(5, 3)
    plain = x @ head.weight.T + head.bias
    head.train()
    assert torch.allclose(head(x), plain / 4)
    head.eval()
    assert torch.allclose(head(x), plain)
    control.switched_at = 3
    head.train()
    assert torch.allclose(head(x), plain)


@pytest.mark.parametrize("value", [{"label_smoothing": 1.0}, {"temperature": 0.0}, {"energy_batches": 0}])
def test_bad_strategy_arguments_are_refused(value):
    with pytest.raises(ValueError, match="lp_ft"):
        LPFT(**value)


def test_energy_at_the_switch_in_results(train):
    common = ["model=tiny_bert", "objective=cls", "control=lp_ft", "control.lp_ft.energy_batches=1"]
    random_head = train(*common, "control.lp_ft.probe_steps=0")
    lp = random_head["controls"]["lp_ft"]
    # no probing: the switch is at step 0 on the same batch (measure=fast: init_batches=1), same weights
    assert lp["switch_step"] == 0
    assert lp["energy"] == pytest.approx(random_head["init"]["energy"], rel=1e-5)
    assert 0 < lp["energy"] < math.sqrt(2) and lp["energy_loss"] > 0 and 0 <= lp["energy_acc"] <= 1
    probed = train(
        *common,
        "control.lp_ft.probe_steps=2",
        "control.lp_ft.label_smoothing=0.1",
        "control.lp_ft.temperature=2.0",
        "trainer.max_steps=4",
    )
    lp = probed["controls"]["lp_ft"]
    assert lp["switch_step"] == 2 and lp["label_smoothing"] == 0.1 and lp["temperature"] == 2.0
    assert 0 < lp["energy"] < math.sqrt(2) and lp["running_loss"] > 0
    assert set(probed["features"]) == {"euclidean", "cosine", "dot", "norm", "norm_ratio"}
    assert len(probed["features"]["norm"]) == probed["run"]["n_layers"] + 1


def test_head_lr_applies_to_the_head_groups_while_probing():
    from types import SimpleNamespace

    head, body = nn.Linear(3, 2), nn.Linear(3, 3)
    control = LPFT(probe_steps=5, head_lr=0.5)
    module = SimpleNamespace(objective=SimpleNamespace(head=head))
    groups = control.param_groups(
        module, [{"params": [*body.parameters(), *head.parameters()], "weight_decay": 0}]
    )
    assert [len(g["params"]) for g in groups] == [2, 2] and groups[1]["lp_ft_head"]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    control.on_before_optimizer_step(None, None, optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 0.5]


def test_mlp_head_is_two_layers_ending_in_the_output_layer():
    from locality.objectives.cls import build_head

    mlp = build_head("mlp", 8, 3, dropout=0.0, hidden=5)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 5), (5, 3)] and mlp[-1] is linears[-1]
    assert mlp(torch.randn(4, 8)).shape == (4, 3)
    linear = build_head("linear", 8, 3, dropout=0.1)
    assert isinstance(linear[-1], nn.Linear) and linear[-1].in_features == 8
    with pytest.raises(ValueError, match="head="):
        build_head("conv", 8, 3, dropout=0.0)

"""objective=distill: the target is softmax(z_0 + alpha * xi), the loss the exact KL(target || model), so the
step-0 loss is the objective distance itself (0 at alpha = 0, growing with alpha); and the dose-response
analysis fits the profile's slope against that distance, one point per setting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from locality.backbones import load_backbone
from locality.core.config import ModelConf, load_option
from locality.core.errors import UserError
from locality.objectives.base import Task
from locality.objectives.distill import Distill


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone(
        ModelConf(**{**load_option("model", "tiny_gpt2"), "init": "random"}), head="causal_lm"
    )


def batch_of(objective: Distill) -> dict:
    return objective.collate([{"text": "def f(x): return x + 1"}, {"text": "class A: pass"}])


def test_the_loss_is_the_exact_kl_to_the_perturbed_teacher(backbone):
    backbone.model.eval()
    objective = Distill(backbone, Task(), max_length=16, alpha=0.7, buckets=4, xi_seed=3)
    batch = batch_of(objective)
    out = objective(backbone.model, batch)
    # an independent float64 reference: the teacher is the same weights, shifted by alpha * xi[token % 4]
    with torch.no_grad():
        z = backbone.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.double()
    xi = torch.randn(4, z.shape[-1], generator=torch.Generator().manual_seed(3)).double()
    teacher = torch.log_softmax(z[:, :-1] + 0.7 * xi[batch["input_ids"][:, :-1] % 4], -1)
    student = torch.log_softmax(z[:, :-1], -1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)[batch["attention_mask"][:, 1:].bool()].mean()
    assert float(out.loss) == pytest.approx(float(kl), rel=1e-5)
    assert (out.target[batch["attention_mask"][:, 1:] == 0] == -100).all()


def test_zero_alpha_is_zero_distance_and_the_distance_grows_with_alpha(backbone):
    backbone.model.eval()
    losses = []
    for alpha in (0.0, 0.5, 1.0, 2.0, 4.0):
        objective = Distill(backbone, Task(), max_length=16, alpha=alpha)
        losses.append(float(objective(backbone.model, batch_of(objective)).loss))
    assert abs(losses[0]) < 1e-6
    assert all(a < b for a, b in zip(losses, losses[1:], strict=False))
    assert losses[1] == pytest.approx(0.5**2 / 2, rel=0.3)  # ~alpha^2/2 nats while small (xi ~ N(0, 1))


def test_the_teacher_is_frozen_and_outside_the_trained_parameters(backbone):
    objective = Distill(backbone, Task(), alpha=1.0)
    assert list(objective.parameters()) == [] and "xi" not in objective.state_dict()
    assert not any(p.requires_grad for p in objective.teacher.module.parameters())


def test_bad_options_and_encoders_are_refused(backbone):
    with pytest.raises(UserError, match="alpha"):
        Distill(backbone, Task(), alpha=math.inf)
    with pytest.raises(UserError, match="bidirectional encoder"):
        Distill.check_family("encoder", type("C", (), {"model_type": "bert"})())


def test_a_distill_run_records_the_exact_distance(train):
    result = train("model=tiny_gpt2", "objective=distill", "objective.alpha=1.0")
    init = result["init"]
    assert init["kl_source"] == "exact" and init["kl"] == pytest.approx(init["loss"], rel=1e-12)
    assert init["kl_excess"] == init["kl"] > 0 and init["kl_norm"] == pytest.approx(
        init["kl"] / math.log(4096)
    )


def test_dose_response_fits_the_slope_against_the_distance_one_point_per_setting():
    import pandas as pd

    from locality.analysis.tables import dose_response

    rng = np.random.default_rng(0)
    rows = []
    for level, distance in enumerate([0.01, 0.1, 0.4, 1.0, 2.0, 4.0]):
        for seed in range(3):
            rows.append(
                {
                    "name": f"r{level}{seed}",
                    "model": "m",
                    "objective": "distill",
                    "control": "standard",
                    "setting_hash": f"s{level}",
                    "seed": seed,
                    "did_not_train": False,
                    "init_kl_excess": distance,
                    "cosine_tokens_slope": 0.01 + 0.02 * distance + rng.normal(0, 0.002),
                    "cosine_tokens_steepness": 1.0 + rng.normal(0, 0.1),
                }
            )
    table = dose_response(pd.DataFrame(rows), "cosine_tokens").set_index("y")
    slope = table.loc["cosine_tokens_slope"]
    assert slope.n_settings == 6 and slope.n_runs == 18
    assert slope.b_lo < 0.02 < slope.b_hi and slope.supported and slope.p_one_sided < 1e-4
    assert not table.loc["cosine_tokens_steepness"].supported  # no trend: not claimed

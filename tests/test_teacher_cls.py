"""objective=teacher_cls: labels from a linear teacher on the frozen pretrained features, a `noise` fraction of them
replaced by hash-chosen classes; fixed per text, so the step-0 probe KL is the excess divergence, ~0 at noise 0
and ~ln(classes) at noise 1."""

from __future__ import annotations

import math

import pytest
import torch

from locality.backbones import load_backbone
from locality.core.config import ModelConf, load_option
from locality.core.errors import UserError
from locality.data.corpus import pretraining_texts
from locality.objectives.base import Task
from locality.objectives.teacher_cls import TeacherClassification, example_hash


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone(ModelConf(**{**load_option("model", "tiny_gpt2"), "init": "random"}))


@pytest.fixture(scope="module")
def batch(backbone):
    objective = TeacherClassification(backbone, Task(), max_length=32)
    return objective.collate([{"text": t} for t in pretraining_texts()[300:556]])


def test_labels_are_a_fixed_function_of_the_text_and_the_noise_fraction(backbone, batch):
    clean = TeacherClassification(backbone, Task(), max_length=32, noise=0.0)
    noisy = TeacherClassification(backbone, Task(), max_length=32, noise=0.5)
    a, b = clean.labels(batch), noisy.labels(batch)
    assert torch.equal(a, clean.labels(batch)) and torch.equal(b, noisy.labels(batch))  # deterministic
    assert (torch.bincount(a, minlength=8) > 0).sum() >= 5  # standardized features: no class takes all
    flipped = (example_hash(batch["input_ids"], batch["attention_mask"]) % 10_000).double() / 10_000 < 0.5
    assert torch.equal(b[~flipped], a[~flipped]) and 0.35 < flipped.double().mean() < 0.65


def test_the_hash_ignores_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    assert torch.equal(example_hash(ids, mask), example_hash(ids[:, :3], mask[:, :3]))
    assert not torch.equal(example_hash(ids, mask), example_hash(torch.tensor([[5, 7, 6]]), mask[:, :3]))


def test_bad_options_are_refused(backbone):
    with pytest.raises(UserError, match="noise"):
        TeacherClassification(backbone, Task(), noise=1.5)
    with pytest.raises(UserError, match="classes"):
        TeacherClassification(backbone, Task(), classes=1)


@pytest.mark.parametrize(
    ("noise", "low", "high"), [(0.0, 0.0, 0.5), (1.0, 0.85 * math.log(8), 1.1 * math.log(8))]
)
def test_the_step0_distance_is_the_excess_divergence(train, noise, low, high):
    result = train(
        "model=tiny_gpt2", "objective=teacher_cls", f"objective.noise={noise}", "measure.kl_probe_train=256"
    )
    init = result["init"]
    assert init["kl_source"] == "linear_probe" and init["kl_excess"] == init["kl"]
    assert low <= init["kl"] <= high

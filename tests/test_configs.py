"""Every option of every config group composes and validates; experiments sweep what they claim."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from locality.core.config import register_resolvers
from locality.core.paths import conf_dir, model_presets
from locality.plan import plan
from locality.run.checks import validate

register_resolvers()
GROUPS = ["model", "objective", "control", "data", "optim", "scheduler", "trainer", "measure", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    cfg = composed(f"{group}={option}")
    cfg = validate(cfg)
    if group == "model":
        assert cfg.model.name == option and (cfg.model.arch or cfg.model.name_or_path or option == "hf")


def test_the_study_presets_are_all_there():
    hub = {
        "bert-base-uncased",
        "bert-large-uncased",
        "gpt2",
        "gpt2-medium",
        "opt-125m",
        "opt-350m",
        "opt-1.3b",
        "pythia-160m",
        "pythia-410m",
        "pythia-1.4b",
        "pythia-6.9b",
        "codegen-350m-mono",
        "mamba-130m",
        "mamba-370m",
        "rwkv-169m",
    }
    assert hub <= set(model_presets())
    assert composed("model=rwkv-169m").model.config_overrides == {"rescale_every": 0}


@pytest.mark.parametrize(
    ("experiment", "runs"),
    [
        ("tiny_matrix", 64),
        ("minilm_equal_step", 6),
        ("head_energy", 6),
        ("real_pair", 16),
        ("distance_dose", 39),
    ],
)
def test_experiments_sweep_existing_options(experiment, runs):
    """Every run of the sweep composes, validates and has its own directory (paper_240: tests/test_plan.py)."""
    listed = plan([f"experiment={experiment}"])
    assert len(listed) == runs and len({r.run_dir for r in listed}) == runs
    assert not [r.problem for r in listed if r.problem]


@pytest.mark.parametrize("option", options("optim"))
def test_every_optimizer_option_builds_an_optimizer_that_steps(option):
    import torch
    from hydra.utils import instantiate

    from locality.core.config import load_option

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = instantiate(load_option("optim", option))([{"params": [weight], "weight_decay": 0.0}])
    scheduler = instantiate(load_option("scheduler", "warmup_decay"))(optimizer, 10)
    for _ in range(3):  # the first step is warmup's lr = 0
        optimizer.zero_grad()
        (weight**2).sum().backward()
        optimizer.step()
        scheduler.step()
    assert isinstance(optimizer, torch.optim.Optimizer) and (weight < 1).all()

"""Every option of every config group composes and validates; experiments sweep what they claim."""

from __future__ import annotations

import itertools

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from locality.config import register_resolvers, run_name, validate
from locality.paths import conf_dir, model_presets

register_resolvers()
GROUPS = ["model", "objective", "control", "data", "optim", "trainer", "measure", "logger"]


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
    hub = {"bert-base-uncased", "bert-large-uncased", "gpt2", "gpt2-medium", "opt-125m", "opt-350m", "opt-1.3b",
           "pythia-160m", "pythia-410m", "pythia-1.4b", "pythia-6.9b", "codegen-350m-mono", "mamba-130m",
           "mamba-370m", "rwkv-169m"}
    assert hub <= set(model_presets())
    assert composed("model=rwkv-169m").model.config_overrides == {"rescale_every": 0}


def sweep_size(experiment: str) -> tuple[int, dict]:
    raw = OmegaConf.load(conf_dir() / "experiment" / f"{experiment}.yaml")
    params = {k: str(v).split(",") for k, v in raw.hydra.sweeper.params.items()}
    return len(list(itertools.product(*params.values()))), params


@pytest.mark.parametrize(("experiment", "runs"), [("paper_240", 240), ("tiny_matrix", 64),
                                                  ("minilm_equal_step", 6)])
def test_experiments_sweep_existing_options(experiment, runs):
    n, params = sweep_size(experiment)
    assert n == runs
    for group in ("model", "objective", "control"):
        for value in params.get(group, []):
            assert value in options(group), f"{experiment}: {group}={value} does not exist"
    composed(f"experiment={experiment}")


def test_run_names_are_stable_and_hash_only_other_overrides():
    assert run_name("gpt2", "clm", {"equal_step": {}}, 3) == "gpt2-clm-equal_step-s3"
    assert run_name("m", "cls", {}, 0) == "m-cls-standard-s0"
    a = run_name("m", "cls", {}, 0, "optim.lr=0.001")
    assert a == run_name("m", "cls", {}, 0, "optim.lr=0.001") != run_name("m", "cls", {}, 0, "optim.lr=0.01")
    assert run_name("m", "cls", {"freeze": {}, "equal_step": {}}, 0) == "m-cls-freeze+equal_step-s0"

"""`python -m locality.ntk`: the kernel of a tiny pretrained model at initialization, written into the run
directory of the same training config, its per-block split, the LoRA layer selection, and the objective
outputs it is taken over."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from locality.instrument.ntk_profile import ObjectiveOutputs
from locality.ntk import main

FAST = ["logger=none", "objective.max_length=16", "data.n_validation=8", "measure.n_probe=8"]


def training_run_dir(overrides: list[str]) -> Path:
    from hydra import compose, initialize_config_dir

    from locality.core.config import register_resolvers
    from locality.core.paths import conf_dir

    register_resolvers()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    return Path(cfg.hydra.run.dir)


def test_clm_kernel_lands_in_the_training_run_dir(tmp_path, capsys):
    overrides = ["model=tiny_gpt2", "objective=clm", f"outputs_root={tmp_path}", *FAST]
    assert main([*overrides, "ntk.n_examples=4", "ntk.select=2"]) == 0
    path = training_run_dir(overrides) / "ntk.json"
    result = json.loads(path.read_text())
    assert result["n_examples"] == 4 and result["n_outputs"] == 1 and len(result["eigenvalues"]) == 4
    assert result["layers"] == [f"block_{i:02d}" for i in range(4)]
    parts_trace = sum(c["trace"] for c in result["parts"].values())
    assert math.isclose(sum(result["block_trace"]) + parts_trace, result["trace"], rel_tol=1e-9)
    assert all(g >= -1e-9 for g in result["block_lambda_min_gain"])
    assert len(result["select"]["layers"]) == 2
    out = capsys.readouterr().out
    layers = ",".join(map(str, result["select"]["layers"]))
    assert f"control.lora.layers=[{layers}]" in out and "condition number" in out


def test_lora_kernel_is_over_the_adapters_of_the_chosen_layers(tmp_path):
    overrides = ["model=tiny_gpt2", "objective=clm", "control=lora", "control.lora.layers=[1,2]"]
    assert main([*overrides, f"outputs_root={tmp_path}", *FAST, "ntk.n_examples=3", "ntk.params=lora"]) == 0
    (path,) = tmp_path.glob("runs/*/ntk.json")
    result = json.loads(path.read_text())
    assert [t is not None for t in result["block_trace"]] == [False, True, True, False]
    assert result["parts"] == {}


def test_lora_params_without_the_lora_control_is_refused(tmp_path, capsys):
    code = main(["model=tiny_gpt2", "objective=clm", f"outputs_root={tmp_path}", *FAST, "ntk.params=lora"])
    assert code == 2 and "control=lora" in capsys.readouterr().err


def test_a_misspelt_ntk_key_is_refused(tmp_path, capsys):
    assert main(["model=tiny_gpt2", f"outputs_root={tmp_path}", "ntk.n_exmples=4"]) == 2


@pytest.mark.parametrize("objective", ["cls", "clm"])
def test_outputs_are_the_objectives(tmp_path, objective):
    from locality.ntk import build_module, compose_config

    cfg, _ = compose_config(["model=tiny_gpt2", f"objective={objective}", f"outputs_root={tmp_path}", *FAST])
    module, splits = build_module(cfg)
    module.eval()
    batch = module.objective.collate(splits.train[:3])
    with torch.no_grad():
        outputs = ObjectiveOutputs(module.model, module.objective)(batch)
        step = module.objective(module.model, batch)
    if objective == "cls":  # the class logits
        assert outputs.shape == (3, module.objective.num_classes)
        torch.testing.assert_close(outputs.argmax(-1), step.predicted())
    else:  # the mean next-token log-probability of each example: the loss when the examples are alike
        one = {k: v[:1] for k, v in batch.items()}
        with torch.no_grad():
            torch.testing.assert_close(
                ObjectiveOutputs(module.model, module.objective)(one)[0, 0],
                -module.objective(module.model, one).loss,
            )


def test_a_training_run_records_the_same_kernel_in_results(tmp_path, train):
    """measure.ntk=true: the kernel at initialization (before any update) in results.json equals the CLI's."""
    from conftest import FAST as TRAIN_FAST  # the settings the `train` fixture runs with

    overrides = ["model=tiny_gpt2", "objective=cls", f"outputs_root={tmp_path / 'cli'}", *TRAIN_FAST]
    assert main([*overrides, "ntk.n_examples=4", "ntk.params=blocks"]) == 0
    (path,) = (tmp_path / "cli").glob("runs/*/ntk.json")
    cli = json.loads(path.read_text())
    results = train("model=tiny_gpt2", "objective=cls", "measure.ntk=true", "measure.ntk_examples=4")
    ntk = results["ntk"]
    assert ntk["params"] == "blocks" and ntk["n_examples"] == 4 and ntk["layers"] == cli["layers"]
    assert ntk["trace"] == pytest.approx(cli["trace"], rel=1e-6)
    assert ntk["block_trace"] == pytest.approx(cli["block_trace"], rel=1e-6)

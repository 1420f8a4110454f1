"""Every tiny preset x every objective it supports trains through the real Hydra config; the rest are refused."""

from __future__ import annotations

import math

import pytest

from locality.core.errors import UserError

SUPPORTED = {
    "tiny_gpt2": ("clm", "cls", "tok"),
    "tiny_opt": ("clm", "cls", "tok"),
    "tiny_pythia": ("clm", "cls", "tok"),
    "tiny_codegen": ("clm", "cls", "tok"),
    "tiny_bert": ("mlm", "cls", "tok"),
    "tiny_roberta": ("mlm", "cls", "tok"),
    "tiny_mamba": ("clm", "cls", "tok"),
    "tiny_rwkv": ("clm", "cls", "tok"),
}
CASES = [(m, o) for m, objectives in SUPPORTED.items() for o in objectives]
REFUSED = [(m, o) for m in SUPPORTED for o in ("clm", "mlm", "cls", "tok") if o not in SUPPORTED[m]]


@pytest.mark.parametrize(("model", "objective"), CASES)
def test_preset_objective_trains(train, model, objective):
    results = train(f"model={model}", f"objective={objective}", "measure.n_probe=16", "measure.n_boot=40")
    assert results["run"]["steps"] == 2
    assert math.isfinite(results["init"]["loss"]) and math.isfinite(results["final"]["loss"])
    n_layers = results["run"]["n_layers"]
    assert len(results["change"]["cosine"]) == n_layers + 1
    assert all(v is not None and v >= -1e-6 for v in results["change"]["cosine"])


@pytest.mark.parametrize(("model", "objective"), REFUSED)
def test_nonsense_pairs_are_refused_before_training(train, model, objective):
    with pytest.raises(UserError, match=f"objective={objective}"):
        train(f"model={model}", f"objective={objective}")


def test_minilm_has_no_mlm_head_so_mlm_is_refused(train):
    with pytest.raises(UserError, match="no pretrained masked-LM head"):
        train("model=minilm", "objective=mlm")

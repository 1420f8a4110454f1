"""Every control of the family runs end to end on a tiny model and does what it says, in numbers."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from locality.backbones import load_backbone
from locality.controls.llrd import LayerwiseLRDecay
from locality.core.config import ModelConf, load_option
from locality.core.errors import UserError
from locality.data.sources import load_builtin
from locality.objectives import Task, build_objective
from locality.run.module import LocalityModule

MOVE = [
    "trainer.max_steps=4",
    "optim.lr=1e-2",
    "scheduler.warmup=0",
    "trainer.gradient_clip_val=null",
    "objective.head_dropout=0.0",
]


def block_changes(results) -> list[float]:
    return results["change"]["weight_rel"][1:]


def test_standard_moves_every_block(train):
    assert all(r > 0 for r in block_changes(train("model=tiny_gpt2", *MOVE)))


def test_freeze_bottom_blocks_keeps_them_exactly(train):
    results = train("model=tiny_gpt2", "control=freeze", "control.freeze.bottom=2", *MOVE)
    changes = block_changes(results)
    assert changes[:2] == [0.0, 0.0] and all(r > 0 for r in changes[2:])
    assert results["controls"]["freeze"]["frozen_blocks"] == [0, 1]
    # embeddings frozen too: the embedding output (layer 0) of the probe set is unchanged
    assert results["change"]["cosine"][0] == pytest.approx(0.0, abs=1e-6)


def test_l2sp_pulls_toward_pretrained(train):
    free = block_changes(train("model=tiny_gpt2", *MOVE, "seed=1"))
    pulled = block_changes(
        train("model=tiny_gpt2", "control=l2sp", "control.l2sp.strength=1e4", *MOVE, "seed=1")
    )
    assert sum(pulled) < 0.5 * sum(free)


def test_lora_on_last_block_changes_only_that_block(train):
    results = train(
        "model=tiny_bert",
        "objective=cls",
        "control=lora",
        "control.lora.layers=[-1]",
        "control.lora.rank=4",
        *MOVE,
    )
    changes = block_changes(results)
    assert changes[:-1] == [0.0, 0.0, 0.0] and changes[-1] > 0  # merged B@A counts as weight change
    assert (
        results["controls"]["lora"]["adapted_modules"] == 6
    )  # query, key, value, attn out, intermediate, out


def test_lp_ft_probes_the_head_then_fine_tunes(train):
    with pytest.raises(UserError, match="would end while still probing"):  # a run that never fine-tunes
        train("model=tiny_gpt2", "objective=cls", "control=lp_ft", "control.lp_ft.probe_steps=10", *MOVE)
    probed_only = train(  # an accuracy target the run does not reach: it probes to the end
        "model=tiny_gpt2",
        "objective=cls",
        "control=lp_ft",
        "control.lp_ft.probe_steps=10",
        "control.lp_ft.target_acc=1.0",
        *MOVE,
    )
    assert (
        all(r == 0.0 for r in block_changes(probed_only))
        and "energy_loss" not in probed_only["controls"]["lp_ft"]
    )
    switched = train(
        "model=tiny_gpt2", "objective=cls", "control=lp_ft", "control.lp_ft.probe_steps=2", *MOVE
    )
    energy = switched["controls"]["lp_ft"]
    assert energy["switch_step"] == 2 and energy["energy_loss"] > 0 and 0 <= energy["energy_acc"] <= 1
    assert all(r > 0 for r in block_changes(switched))


def test_controls_compose(train):
    results = train("model=tiny_gpt2", "control=[freeze,equal_step]", "control.freeze.bottom=1", *MOVE)
    assert results["run"]["control"] == "freeze+equal_step"
    changes = block_changes(results)
    assert changes[0] == 0.0 and all(r > 0 for r in changes[1:])


def test_llrd_scales_learning_rates_by_depth():
    backbone = load_backbone(ModelConf(**load_option("model", "tiny_gpt2")))
    splits = load_builtin("stdlib_docs", 16, 16)
    objective = build_objective(
        OmegaConf.merge(load_option("objective", "cls"), {"max_length": 128}),
        backbone,
        Task(tuple(splits.label_names)),
    )
    optim = instantiate(load_option("optim", "adamw"), lr=1.0)
    module = LocalityModule(backbone, objective, optim, controls=[LayerwiseLRDecay(decay=0.5)])
    groups = module.param_groups()
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for i, block in enumerate(backbone.blocks):
        assert {lr_of[id(p)] for p in block.parameters()} == {0.5 ** (3 - i)}
    assert {lr_of[id(p)] for p in backbone.parts()["embeddings"].parameters()} == {0.5**4}
    assert {lr_of[id(p)] for p in objective.head.parameters()} == {1.0}
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in module.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(groups)  # a valid optimizer spec that keeps every group's own rate
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.5**k for k in range(4, -1, -1)]


def _logged(run_dir) -> pd.DataFrame:
    import pandas as pd

    (metrics,) = run_dir.rglob("metrics.csv")
    return pd.read_csv(metrics)


@pytest.mark.parametrize(
    "model",
    ["tiny_gpt2", pytest.param("tiny_mamba", marks=pytest.mark.slow)],  # mamba: 60 s on 2 cores
)
def test_equal_step_logs_equal_ratios_at_every_step_and_standard_does_not(train, tmp_path, model):
    common = [
        f"model={model}",
        "objective=clm",
        "logger=csv",
        "trainer.max_steps=5",
        "trainer.log_every_n_steps=1",
        *[m for m in MOVE[1:] if not m.startswith("objective.")],  # clm has no head dropout
    ]
    controlled = train(*common, "control=equal_step")
    train(*common, "control=standard")
    runs = {p.name.split("-")[2]: p for p in (tmp_path / "runs").iterdir()}
    logged = _logged(runs["equal_step"])
    after = logged.filter(like="equal_step/ratio_after/").dropna(how="all")
    before = logged.filter(like="equal_step/ratio_before/").dropna(how="all")
    assert len(after) == 5 and after.shape[1] == controlled["run"]["n_layers"]
    spread = after.max(axis=1) / after.min(axis=1)
    assert (spread - 1).abs().max() < 1e-5  # re-measured from the stored float32 weights
    assert (before.max(axis=1) / before.min(axis=1)).max() > 1 + 1e-3
    standard = _logged(runs["standard"]).filter(like="update_ratio/block_").dropna(how="all")
    # Adam's first step moves identical random blocks almost equally; the spread grows from there
    assert len(standard) == 5 and (standard.max(axis=1) / standard.min(axis=1)).max() > 1.01
    assert "equal_step" in controlled["controls"]
    assert 1 <= controlled["controls"]["equal_step"]["spread_after_max"] < 1 + 1e-5  # re-measured, every step
    n_layers = controlled["run"]["n_layers"]
    for run in (controlled, train(*common, "control=standard")):  # the first updates' ratios, before control
        first = run["init"]["update_rel"]  # the steps that moved: warmup's first step (lr = 0) does not
        assert 4 <= len(first) <= 5 and {len(step) for step in first} == {n_layers}
        assert all(max(step) > 0 for step in first) and run["init"]["update_rel_slope"] is not None

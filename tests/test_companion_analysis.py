"""The analysis of the companion studies: head energy vs feature adaptation (Ren et al. 2023) and the per-run
cross-layer CKA and drop-top-k figures (Phang et al. 2021), from results.json alone."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from locality.analysis.tables import head_energy_runs, head_energy_trend, trend_shape
from locality.analyze import main


def lp_ft_result(i: int, energy: float, peaked: bool = True) -> dict:
    """A 2-block run whose last-layer distances grow with energy and whose dot product and norm peak at 0.5."""
    bump = 1 - 4 * (energy - 0.5) ** 2 if peaked else energy
    last = {"euclidean": 3 * energy, "cosine": energy / 2, "dot": 10 * bump, "norm": 5 + bump}
    features = {m: [0.0, v / 2, v] for m, v in last.items()}
    features["norm_ratio"] = [1.0, 1.0, 1.0]
    name = f"minilm-cls-lp_ft-s0-{i:08d}"
    return {
        "schema": "locality.results/1",
        "run": {
            "name": name,
            "model": "minilm",
            "family": "encoder",
            "block_type": "sequential",
            "objective": "cls",
            "control": "lp_ft",
            "seed": 0,
            "config_hash": name[-8:],
            "setting_hash": name[-8:],
            "n_layers": 2,
        },
        "layers": ["embed", "block_00", "block_01"],
        "depth": [0.0, 0.5, 1.0],
        "change": {"cosine": features["cosine"]},
        "profile": {"cosine": {"slope": 0.1, "slope_ci": [0.0, 0.2], "steepness": 1.0, "width": 0.5}},
        "features": features,
        "init": {"loss": 2.7, "energy": 0.97},
        "final": {"loss": 1.0, "acc": 0.6},
        "controls": {
            "lp_ft": {
                "probe_steps": 10 * i,
                "label_smoothing": 0.0,
                "temperature": 1.0,
                "switch_step": 10 * i,
                "energy": energy,
                "energy_loss": 2.0,
                "energy_acc": 0.3,
            }
        },
        "cross_layer": {
            "pooling": "tokens",
            "n_rows": 16,
            "pretrained": np.eye(3).tolist(),
            "finetuned": (0.5 + 0.5 * np.eye(3)).tolist(),
        },
        "drop_top_k": [{"k": 0, "loss": 1.0, "acc": 0.6}, {"k": 1, "loss": 2.0, "acc": 0.3}],
    }


ENERGIES = [0.1, 0.2, 0.3, 0.45, 0.55, 0.7, 0.85, 0.95]  # 8 runs: the fewest that get a rho interval


def test_trend_shapes_of_known_curves():
    x = pd.Series(np.linspace(0, 1, 9))
    assert trend_shape(x, 2 * x)[0] == "increasing"
    assert trend_shape(x, -x)[0] == "decreasing"
    shape, peak = trend_shape(x, -((x - 0.3) ** 2))
    assert shape == "rise then fall" and abs(peak - 0.3) < 1e-9
    assert trend_shape(x, (x - 0.6) ** 2)[0] == "fall then rise"
    assert trend_shape(x[:3], x[:3])[0] == "-"  # too few distinct energies


def test_head_energy_tables_recover_the_papers_trend_and_its_absence():
    runs = head_energy_runs([lp_ft_result(i, e) for i, e in enumerate(ENERGIES)])
    assert list(runs.energy) == ENERGIES and runs.euclidean_last.iloc[-1] == 3 * 0.95
    assert runs.euclidean_sum.iloc[0] == pytest.approx(1.5 * 3 * 0.1)  # 0 + v/2 + v over the three layers
    trend = head_energy_trend(runs).set_index(["metric", "where"])
    assert trend.loc[("euclidean", "last"), "rho"] == 1.0
    assert trend.loc[("euclidean", "last"), "agrees"] == "yes"
    assert trend.loc[("dot", "last"), "shape"] == "rise then fall"
    assert abs(trend.loc[("norm", "sum"), "peak_energy"] - 0.5) < 1e-9
    assert (trend.agrees == "yes").all()
    monotone = head_energy_runs([lp_ft_result(i, e, peaked=False) for i, e in enumerate(ENERGIES)])
    trend = head_energy_trend(monotone).set_index(["metric", "where"])
    assert trend.loc[("dot", "last"), "shape"] == "increasing"
    assert trend.loc[("dot", "last"), "agrees"] == "no"


def test_analyze_writes_the_companion_tables_figures_and_verdict(tmp_path):
    energies = ENERGIES[::2] + [0.5]  # 5 runs keep the figures few (and get no rho interval)
    for i, energy in enumerate(energies):
        r = lp_ft_result(i, energy)
        run_dir = tmp_path / "sweep" / r["run"]["name"]
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(r))
    out = tmp_path / "analysis"
    assert main([str(tmp_path / "sweep"), "--out", str(out), "--metric", "cosine"]) == 0
    assert {"head_energy.csv", "head_energy_trend.csv"} <= {p.name for p in (out / "tables").iterdir()}
    assert (out / "figures" / "head_energy.png").stat().st_size > 10_000
    names = {f"minilm-cls-lp_ft-s0-{i:08d}.png" for i in range(len(energies))}
    assert {p.name for p in (out / "figures" / "cross_layer").iterdir()} == names
    assert {p.name for p in (out / "figures" / "drop_top").iterdir()} == names
    summary = (out / "summary.md").read_text()
    assert "## Head energy and feature adaptation (Ren et al. 2023)" in summary
    assert (
        "Shows the paper's trend at the last layer: **in direction only (a distance's rank correlation has no "
        "interval, n < 8" in summary
    )
    assert "euclidean ρ = +1.00 (increasing; paper: increasing)" in summary  # n = 5: no interval

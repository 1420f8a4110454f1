"""The results schema: what a run must write, what analysis needs, and the reasons a file is refused."""

from __future__ import annotations

import json

import pytest

from locality.analysis.aggregate import inventory
from locality.core.results import SCHEMA, ResultsError, check_results, layer_names


def complete(n_blocks: int = 2) -> dict:
    points = n_blocks + 1
    return {
        "schema": SCHEMA,
        "run": {
            "name": "m-cls-standard-s0-00000000",
            "model": "m",
            "family": "decoder",
            "block_type": "sequential",
            "objective": "cls",
            "control": "standard",
            "seed": 0,
            "n_params": 10,
            "n_layers": n_blocks,
            "steps": 3,
            "init_from": "random",
        },
        "layers": layer_names(n_blocks),
        "depth": [i / n_blocks for i in range(points)],
        "change": {"cosine": [0.0] * points},
        "profile": {"cosine": {"slope": 0.0, "slope_ci": None}},
        "init": {},
        "final": {},
        "controls": {},
    }


def test_layer_names_are_one_per_depth_point():
    assert layer_names(3) == ["embed", "block_00", "block_01", "block_02"]


def test_a_complete_run_passes_both_checks():
    assert check_results(complete(), complete=True)["run"]["n_layers"] == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(schema="locality.results/0"), "schema is 'locality.results/0'"),
        (lambda r: r.pop("controls"), "missing controls"),
        (lambda r: r["run"].pop("init_from"), "run lacks init_from"),
        (lambda r: r.update(layers=["embed", "block_0", "block_1"]), "canonical names"),
        (lambda r: r["change"].update(cka_linear=[1.0, 0.5]), "change.cka_linear has 2 values, not 3"),
        (lambda r: r["run"].update(n_layers=4), "depth has 3 points for a model of 4 blocks"),
    ],
)
def test_what_a_run_writes_is_checked(change, message):
    results = complete()
    change(results)
    with pytest.raises(ResultsError, match=message):
        check_results(results, complete=True)


def test_analysis_reads_older_results_and_lists_unreadable_ones_with_the_reason(tmp_path):
    old = complete()
    for key in ("controls", "init", "final", "layers"):  # written by hand or by an older version
        old.pop(key)
    for name, content in {
        "old": json.dumps(old),
        "other": json.dumps({**complete(), "schema": "elsewhere/2"}),
        "short": json.dumps({**complete(), "change": {"cosine": [0.0]}}),
        "garbled": "{not json",
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(content)
    found = inventory([str(tmp_path)])
    assert [r["_path"].rsplit("/", 1)[-1] for r in found.results] == ["old"]
    reasons = {u["path"].split("/")[-2]: u["reason"] for u in found.unreadable}
    assert "schema is 'elsewhere/2'" in reasons["other"]
    assert "change.cosine has 1 values, not 3" in reasons["short"] and "not JSON" in reasons["garbled"]

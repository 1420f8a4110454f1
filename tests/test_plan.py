"""`python -m locality.plan` lists a sweep's runs without network or weights, and refuses invalid ones."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hydra import compose, initialize_config_dir

from locality.core.config import register_resolvers
from locality.core.paths import conf_dir
from locality.plan import main, plan
from locality.run.sweep import block_lists, expand


def test_paper_240_is_190_standard_and_50_equal_step_runs_each_objective_on_its_data(capsys):
    runs = plan(["experiment=paper_240"])
    assert len(runs) == 240 and len({r.run_dir for r in runs}) == 240
    assert Counter(r.control for r in runs) == {"standard": 190, "equal_step": 50}
    assert all(r.problem is None for r in runs)
    assert {(r.objective, r.data) for r in runs} == {("native", "wikitext"), ("cls", "sst2")}
    assert len({r.model for r in runs}) == 15 and all("/sweeps/paper_240/" in r.run_dir for r in runs)
    # replicates share a config hash; the 240 runs fall into 240 / seeds configurations
    configs = Counter(r.run_dir.rsplit("-", 1)[1] for r in runs)
    assert len(configs) == (12 * 2 + 2 * 2 + 2) + (12 * 2 + 1)  # standard cells + equal-step cells


def test_the_cli_prints_one_line_per_run_then_the_total(capsys):
    assert main(["experiment=minilm_equal_step"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and lines[-1].startswith("total 6 runs")
    assert lines[0].split()[0].endswith("minilm-cls-standard-s0-" + lines[0].split()[0].rsplit("-", 1)[1])


def test_an_invalid_run_is_named_and_exits_2(capsys):
    assert main(["model=tiny_gpt2,tiny_bert", "objective=clm"]) == 2
    captured = capsys.readouterr()
    assert "total 2 runs" in captured.out
    assert "tiny_bert-clm-standard-s0" in captured.err and "causal" in captured.err
    assert "tiny_gpt2-clm" not in captured.err


def test_matrix_blocks_are_a_union_and_command_line_keys_apply_to_every_block():
    matrix = [{"model": ["a", "b"], "seed": [0, 1]}, {"model": "c", "control": ["equal_step"], "seed": [0]}]
    jobs = expand(matrix, {})
    assert jobs == [
        ["model=a", "seed=0"],
        ["model=a", "seed=1"],
        ["model=b", "seed=0"],
        ["model=b", "seed=1"],
        ["model=c", "control=equal_step", "seed=0"],
    ]
    jobs = expand(matrix, {"seed": ["seed=5"]})  # replaces each block's seeds; duplicates kept once
    assert jobs == [["model=a", "seed=5"], ["model=b", "seed=5"], ["model=c", "control=equal_step", "seed=5"]]
    assert expand(None, {"a": ["a=1", "a=2"]}) == [["a=1"], ["a=2"]]  # no matrix: Hydra's basic sweep
    assert block_lists({"measure.metrics": [[1, 2]], "x": [None, True]}) == {
        "measure.metrics": ["measure.metrics=[1,2]"],
        "x": ["x=null", "x=true"],
    }


def test_the_sweeper_is_the_matrix_sweeper():
    register_resolvers()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=paper_240"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.locality_sweeper.MatrixSweeper"
    assert len(cfg.hydra.sweeper.matrix) == 9 and cfg.sweep_name == "paper_240"


def test_each_run_shows_its_state_read_from_its_directory(tmp_path, monkeypatch, capsys):
    """done: results.json; failed: failed.json; partial: a checkpoint and neither file; missing: nothing."""
    monkeypatch.setenv("LOCALITY_OUTPUTS", str(tmp_path))
    runs = plan(["experiment=minilm_equal_step"])
    dirs = [Path(r.run_dir) for r in runs]
    assert all(r.state == "missing" for r in runs) and all(str(tmp_path) in r.run_dir for r in runs)
    for d in dirs[:4]:
        (d / "checkpoints").mkdir(parents=True)
    (dirs[0] / "results.json").write_text("{}")
    (dirs[1] / "failed.json").write_text("{}")
    (dirs[2] / "checkpoints" / "last.ckpt").write_bytes(b"")
    (dirs[3] / "config.yaml").write_text("")  # started, stopped before its first checkpoint: missing
    assert [r.state for r in plan(["experiment=minilm_equal_step"])] == [
        "done",
        "failed",
        "partial",
        "missing",
        "missing",
        "missing",
    ]
    assert main(["experiment=minilm_equal_step"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["done", "failed", "partial"]
    assert lines[-1].endswith("done 1, failed 1, partial 1, missing 3")

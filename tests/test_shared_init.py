"""In a sweep, runs that differ only in their control measure the step-0 quantities once and share them."""

from __future__ import annotations

import json

from conftest import FAST
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from locality.core.paths import conf_dir
from locality.train import run

RUN = ["model=tiny_gpt2", "model.init=random", "objective=cls", "seed=31"]  # a seed no other test uses


def step_0(results: dict) -> dict:
    """`init` without the first optimizer steps' update ratios (added after training, and per control)."""
    return {k: v for k, v in results["init"].items() if not k.startswith("update_rel")}


def sweep_job(tmp_path, *overrides: str) -> dict:
    """One job of a multirun, in-process: its directory under sweeps/<sweep_name>/."""
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*FAST, f"outputs_root={tmp_path}", "sweep_name=share", *overrides],
            return_hydra_config=True,
        )
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}"
    HydraConfig.instance().set_config(cfg)
    return run(cfg)


def test_the_second_control_reads_step_0_and_changes_no_number(train, tmp_path):
    standard = sweep_job(tmp_path, *RUN, "control=standard")
    shared = sweep_job(tmp_path, *RUN, "control=equal_step")
    alone = train(*RUN, "control=equal_step")  # a single run measures its own

    assert standard["timings"]["init_shared"] is False and shared["timings"]["init_shared"] is True
    assert alone["timings"]["init_shared"] is False
    assert step_0(shared) == step_0(standard) == step_0(alone)
    assert shared["init"]["update_rel"] == alone["init"]["update_rel"]
    assert shared["change"] == alone["change"] and shared["final"] == alone["final"]  # training untouched
    (stored,) = (tmp_path / "sweeps" / "share" / ".init").iterdir()
    assert json.loads(stored.read_text())["init"] == step_0(standard)


def test_a_file_from_other_weights_or_damaged_is_not_used(tmp_path):
    from locality.instrument.depth import read_shared_init, write_shared_init

    path = tmp_path / ".init" / "setting-s0.json"
    assert read_shared_init(path, "weights-head") is None and read_shared_init(None, "weights-head") is None
    write_shared_init(path, "weights-head", {"loss": 1.5, "grad_rel": [0.1, None]})
    assert read_shared_init(path, "weights-head") == {"loss": 1.5, "grad_rel": [0.1, None]}
    assert read_shared_init(path, "other-weights-head") is None
    path.write_text('{"fingerprint": "weights-head", "init": ')  # cut short
    assert read_shared_init(path, "weights-head") is None

"""The command line Lightning re-runs for the other processes of a multi-process job in a sweep is that job's."""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from locality.config import register_resolvers
from locality.launch import children_run_this_job
from locality.paths import conf_dir


def hydra_job(tmp_path, mode: RunMode) -> None:
    register_resolvers()
    overrides = ["model=tiny_gpt2", "seed=3", f"outputs_root={tmp_path}"]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = mode
        cfg.hydra.overrides.task = overrides
        cfg.hydra.runtime.output_dir = str(tmp_path / "sweeps" / "s" / "job")
    HydraConfig.instance().set_config(cfg)


def test_in_a_multirun_job_the_children_run_the_job_and_everything_is_put_back(tmp_path, monkeypatch):
    hydra_job(tmp_path, RunMode.MULTIRUN)
    monkeypatch.setattr(sys, "argv", ["locality/train.py", "-m", "model=tiny_gpt2,tiny_opt", "seed=3"])
    run_dir = HydraConfig.get().run.dir
    with children_run_this_job():
        assert sys.argv == ["locality/train.py", "model=tiny_gpt2", "seed=3", f"outputs_root={tmp_path}"]
        assert HydraConfig.get().run.dir == str(tmp_path / "sweeps" / "s" / "job")
    assert sys.argv[1] == "-m" and HydraConfig.get().run.dir == run_dir


def test_a_single_run_is_left_alone(tmp_path, monkeypatch):
    hydra_job(tmp_path, RunMode.RUN)
    monkeypatch.setattr(sys, "argv", ["train.py", "seed=3"])
    with children_run_this_job():
        assert sys.argv == ["train.py", "seed=3"]

"""The command line Lightning re-runs for the other processes of a multi-process job in a sweep is that job's."""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from locality.core.config import register_resolvers
from locality.core.paths import conf_dir
from locality.run.launch import children_run_this_job


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


def test_in_a_launcher_worker_the_children_run_python_m_locality_train(tmp_path, monkeypatch):
    """A submitit job runs in `python -m submitit.core._submit <folder>`: the command Lightning builds for the
    other processes (its own `_hydra_subprocess_cmd`) is `python -m locality.train` with the job's overrides."""
    import importlib.util

    from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd

    hydra_job(tmp_path, RunMode.MULTIRUN)
    with read_write(HydraConfig.get()), open_dict(HydraConfig.get()):
        HydraConfig.get().runtime.cwd = str(tmp_path)
    main = sys.modules["__main__"]
    worker = importlib.util.find_spec("json")  # stands in for submitit.core._submit: any other module's spec
    monkeypatch.setattr(main, "__spec__", worker)
    monkeypatch.setattr(sys, "argv", ["/venv/lib/submitit/core/_submit.py", "/sweep/.submitit/123"])
    with children_run_this_job():
        command, cwd = _hydra_subprocess_cmd(local_rank=1)
    job_dir = tmp_path / "sweeps" / "s" / "job"
    assert command[1:3] == ["-m", "locality.train"]
    assert command[3:6] == ["model=tiny_gpt2", "seed=3", f"outputs_root={tmp_path}"]
    assert command[6] == f'hydra.run.dir="{job_dir}"' and cwd == str(tmp_path)
    assert main.__spec__ is worker and sys.argv[1] == "/sweep/.submitit/123"  # put back


def test_a_run_started_as_locality_train_keeps_its_main_module(tmp_path, monkeypatch):
    import importlib.util

    hydra_job(tmp_path, RunMode.MULTIRUN)
    main = sys.modules["__main__"]
    spec = importlib.util.find_spec("locality.train")
    monkeypatch.setattr(main, "__spec__", spec)
    with children_run_this_job():
        assert main.__spec__ is spec
    monkeypatch.setattr(main, "__spec__", None)  # `python locality/train.py` or the locality-train script
    with children_run_this_job():
        assert main.__spec__ is None

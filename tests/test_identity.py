"""A run's identity is its resolved config: same config by any route, same directory; any difference, another."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from locality.core.config import register_resolvers
from locality.core.errors import UserError
from locality.core.identity import NON_RESULT_KEYS, changed_keys, config_hash, result_config
from locality.core.paths import conf_dir
from locality.run.checks import validate
from locality.run.rundir import RunDir

register_resolvers()


def name_of(*overrides: str) -> str:
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        return str(cfg.hydra.run.dir).rsplit("/", 1)[-1]


def test_an_experiment_file_changes_the_directory():
    """The issue's case: the same command line with and without experiment=tiny_matrix (another lr, probe
    size and step count) used to share one directory."""
    plain = name_of("model=tiny_gpt2", "objective=clm")
    matrix = name_of("model=tiny_gpt2", "objective=clm", "experiment=tiny_matrix")
    assert plain.startswith("tiny_gpt2-clm-standard-s0-") and matrix.startswith("tiny_gpt2-clm-standard-s0-")
    assert plain != matrix


def test_the_same_config_by_any_route_is_the_same_directory():
    default = name_of("model=tiny_gpt2", "objective=clm")
    assert name_of("model=tiny_gpt2", "objective=clm", "optim.lr=1.0e-4") == default  # the default, spelt out
    assert name_of("model=tiny_gpt2", "objective=clm", "optim.lr=0.0001") == default
    assert name_of("objective=clm", "model=tiny_gpt2") == default  # order of overrides
    # what cannot change results stays out of the hash
    assert (
        name_of(
            "model=tiny_gpt2",
            "objective=clm",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            "data.num_workers=2",
            "measure.cache=false",
            "sweep_name=x",
        )
        == default
    )
    # a control spelt with its default arguments is the same control
    assert name_of("model=tiny_gpt2", "objective=clm", "control=equal_step") == name_of(
        "model=tiny_gpt2", "objective=clm", "control=equal_step", "control.equal_step.target=mean"
    )


def test_any_result_changing_value_is_another_directory():
    default = name_of("model=tiny_gpt2", "objective=clm")
    for override in (
        "optim.lr=0.001",
        "measure.n_probe=256",
        "data.batch_size=8",
        "trainer.max_steps=7",
        "objective.max_length=64",
        "model.config_overrides.n_layer=2",
        "data=pydoc_topics",
    ):
        assert name_of("model=tiny_gpt2", "objective=clm", override) != default, override


def test_replicates_share_a_hash_and_differ_in_the_name():
    s0, s1 = name_of("model=tiny_gpt2", "seed=0"), name_of("model=tiny_gpt2", "seed=1")
    assert s0.endswith(s1.rsplit("-", 1)[1]) and "-s0-" in s0 and "-s1-" in s1


def test_non_result_keys_are_listed_once_and_exist():
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    for key in NON_RESULT_KEYS:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key
    kept = result_config(cfg)
    assert "logger" not in kept and "hydra" not in kept and "enable_progress_bar" not in kept["trainer"]
    assert kept["seed"] == 0 and kept["optim"]["lr"] == pytest.approx(1e-4)


def composed(*overrides: str):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return validate(compose("train", overrides=["model=tiny_gpt2", *overrides]))


def test_a_directory_of_another_config_is_refused_naming_the_keys(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_config(composed())
    run.refuse_other_config(composed("logger=csv"))  # a non-result difference is the same run
    with pytest.raises(UserError, match=r"optim\.lr.*trainer\.max_steps|optim\.lr"):
        run.refuse_other_config(composed("optim.lr=0.001", "trainer.max_steps=7"))
    assert changed_keys(composed(), composed("optim.lr=0.001", "trainer.max_steps=7")) == [
        "optim.lr",
        "trainer.max_steps",
    ]
    assert config_hash(composed()) != config_hash(composed("optim.lr=0.001"))


@pytest.mark.parametrize(
    "damage",
    ["key: [unclosed", "- just\n- a list\n", "!!python/object/apply:os.system ['echo hostile']", "\x00\xff"],
)
def test_a_damaged_config_yaml_is_refused_with_the_way_out(tmp_path, damage):
    run = RunDir(tmp_path / "run")  # creates the directory
    run.config_path.write_text(damage)
    with pytest.raises(UserError, match=r"config.yaml is damaged .* add force=true"):
        run.refuse_other_config(composed())


def test_relaunching_a_directory_with_another_config_exits_2(train, tmp_path):
    first = train("model=tiny_gpt2", "objective=clm", "logger=csv")
    run_dir = tmp_path / "runs" / first["run"]["name"]
    assert first["run"]["config_hash"] == first["run"]["name"].rsplit("-", 1)[1]
    with pytest.raises(UserError, match="optim.lr"):
        train("model=tiny_gpt2", "objective=clm", "optim.lr=0.01", f"hydra.run.dir={run_dir}")
    assert OmegaConf.load(run_dir / "config.yaml").optim.lr == pytest.approx(1e-4)  # untouched


def test_wandb_run_id_follows_the_directory_and_sweeps_share_a_group(tmp_path):
    from locality.core.components import instantiate_component
    from locality.core.config import load_option
    from locality.run.loggers import RunInfo, finish_wandb

    run = RunDir(tmp_path / "gpt2-cls-equal_step-s3-0123abcd")
    info = RunInfo(
        run,
        "gpt2-cls-equal_step-s3-0123abcd",
        {},
        sweep="paper_240",
        job_type="equal_step",
        tags=["family:decoder", "scale:<200M"],
    )
    logger = instantiate_component(load_option("logger", "wandb"), "logger", info=info)
    wandb_run = logger.experiment
    assert (
        wandb_run.id == run.path.name
        and wandb_run.group == "paper_240"
        and wandb_run.job_type == "equal_step"
    )
    assert list(wandb_run.tags) == ["family:decoder", "scale:<200M"] and wandb_run.offline
    finish_wandb(teardown=True)  # a W&B run left open would be reused by later tests in this process


def test_a_run_directory_is_held_by_one_process(train, tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "held"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(60)",
            str(run_dir / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="Another process is running"):
            train("model=tiny_gpt2", f"hydra.run.dir={run_dir}")
        assert not (run_dir / "config.yaml").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    assert (
        train("model=tiny_gpt2", f"hydra.run.dir={run_dir}")["run"]["steps"] > 0
    )  # released with its process


@pytest.mark.parametrize("damage", ["truncated", "directory", "other schema"])
def test_a_damaged_results_json_is_refused_with_the_way_out_and_force_reruns(train, tmp_path, damage):
    import json

    run_dir = tmp_path / "done"
    args = ("model=tiny_gpt2", f"hydra.run.dir={run_dir}")
    good = train(*args)
    results = run_dir / "results.json"
    if damage == "truncated":
        results.write_text(results.read_text()[:100])
    elif damage == "directory":
        results.unlink()
        results.mkdir()
    else:
        results.write_text(json.dumps({**good, "schema": "locality.results/0"}))
    with pytest.raises(UserError, match=r"results.json is damaged .* force=true"):
        train(*args)
    assert train(*args, "force=true")["run"]["config_hash"] == good["run"]["config_hash"]
    assert json.loads(results.read_text())["schema"] == "locality.results/1"


def test_keep_checkpoint_none_deletes_the_checkpoints_once_the_run_is_complete(train, tmp_path):
    run_dir = tmp_path / "kept"
    kept = train("model=tiny_gpt2", "trainer.ckpt_every_n_steps=1", f"hydra.run.dir={run_dir}")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    other = tmp_path / "dropped"
    dropped = train(
        "model=tiny_gpt2",
        "trainer.ckpt_every_n_steps=1",
        "trainer.keep_checkpoint=none",
        f"hydra.run.dir={other}",
    )
    assert dropped["run"]["config_hash"] == kept["run"]["config_hash"]  # not a result-changing option
    assert (other / "results.json").is_file() and not list((other / "checkpoints").iterdir())
    assert train("model=tiny_gpt2", "trainer.keep_checkpoint=none", f"hydra.run.dir={other}") == dropped

"""The `callbacks` group: Lightning callbacks beyond locality's own come from config, by name, and join the
run's identity only when there are any (the run directories of existing sweeps keep their names)."""

from __future__ import annotations

import csv

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from locality.core.config import register_resolvers
from locality.core.identity import config_hash
from locality.core.paths import conf_dir

register_resolvers()  # the group schemas, as `locality.train` registers them


def composed(*overrides: str):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_no_callbacks_leave_the_identity_as_it_was_and_any_callback_changes_it():
    plain = composed("model=tiny_gpt2")
    assert plain.callbacks == {}
    with_none = config_hash(plain)
    before = OmegaConf.masked_copy(plain, [k for k in plain if k != "callbacks"])  # before the group existed
    assert "callbacks" not in before and config_hash(before) == with_none
    assert config_hash(composed("model=tiny_gpt2", "callbacks=lr_monitor")) != with_none
    both = composed("model=tiny_gpt2", "callbacks=[lr_monitor,early_stopping]")
    assert set(both.callbacks) == {"lr_monitor", "early_stopping"}


def test_a_configured_callback_runs_in_the_trainer(train, tmp_path):
    results = train(
        "model=tiny_gpt2",
        "objective=clm",
        "logger=csv",
        "callbacks=lr_monitor",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
    )
    with open(tmp_path / "runs" / results["run"]["name"] / "csv" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert any(column.startswith("lr-AdamW/") for column in header)


def test_a_callback_with_an_unknown_argument_is_refused_before_any_work(train, tmp_path, monkeypatch):
    from locality.core.errors import UserError

    monkeypatch.setattr("locality.train.assemble", _must_not_assemble)
    with pytest.raises(UserError, match=r"callbacks\.lr_monitor.*nonsense"):
        train("model=tiny_gpt2", "objective=clm", "callbacks=lr_monitor", "+callbacks.lr_monitor.nonsense=1")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _must_not_assemble(*args, **kwargs):
    raise AssertionError("data or weights were loaded before the callbacks were checked")

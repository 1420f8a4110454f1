"""The training metrics are computed only on the steps that log them, unless a control reads them every step."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

from locality.controls.lp_ft import LPFT
from locality.run.module import LocalityModule


def test_train_metrics_are_computed_on_logged_steps_and_logged_there(train, tmp_path, monkeypatch):
    asked = []
    wanted = LocalityModule._train_metrics_wanted

    def spy(self):
        answer = wanted(self)
        asked.append((self.trainer.global_step, answer))
        return answer

    monkeypatch.setattr(LocalityModule, "_train_metrics_wanted", spy)
    results = train(
        "model=tiny_gpt2",
        "model.init=random",
        "objective=clm",
        "logger=csv",
        "trainer.max_steps=5",
        "trainer.log_every_n_steps=2",
    )
    assert asked == [(0, False), (1, True), (2, False), (3, True), (4, False)]
    rows = list(
        csv.DictReader((Path(tmp_path) / "runs" / results["run"]["name"] / "csv" / "metrics.csv").open())
    )
    assert [int(r["step"]) for r in rows if r.get("train/acc")] == [1, 3]
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [1, 3]


def test_a_control_that_reads_the_metrics_every_step_gets_them_every_step():
    not_logging = SimpleNamespace(log_every_n_steps=2, global_step=2, should_stop=False)  # step 3: not logged
    module = SimpleNamespace(_trainer=not_logging, trainer=not_logging, controls=[])
    assert LocalityModule._train_metrics_wanted(module) is False
    module.controls = [LPFT()]
    assert LocalityModule._train_metrics_wanted(module) is True

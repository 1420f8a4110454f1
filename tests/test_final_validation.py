"""results.json's `final`: validated after fit, or taken from the fit's own last validation when that came
after the last step (the same weights and batches: the same numbers, without a second pass)."""

from __future__ import annotations

import pytest

RUN = ("model=tiny_gpt2", "model.init=random", "objective=cls", "trainer.max_steps=4", "seed=3")


def test_a_validation_at_the_last_step_is_reused_with_the_same_numbers(train):
    after = train(*RUN)
    in_fit = train(*RUN, "trainer.val_check_interval=2")  # validates at steps 2 and 4: 4 is the last
    assert after["timings"]["final_from_fit"] is False and after["timings"]["validate_s"] > 0
    assert in_fit["timings"]["final_from_fit"] is True and in_fit["timings"]["validate_s"] == 0.0
    assert in_fit["final"].keys() == after["final"].keys() and {"loss", "acc"} <= after["final"].keys()
    for key, value in after["final"].items():
        assert in_fit["final"][key] == pytest.approx(value, rel=1e-6), key
    assert in_fit["change"] == after["change"]  # validating during the fit changed nothing it measured


def test_a_validation_before_the_last_step_is_not_reused(train):
    earlier = train(*RUN, "trainer.val_check_interval=3")  # validates at step 3, the run ends at 4
    assert earlier["timings"]["final_from_fit"] is False and earlier["timings"]["validate_s"] > 0

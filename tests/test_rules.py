"""Each config rule is stated once, beside its field (`locality.core.config`, the rule kinds in
`locality.core.rules`): changing it there moves the checks (`validate`), the plan (`locality.plan`) and the
docs (`describe`, README) together."""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_checks import ROWS  # README's "Bad input" rows

from locality.core.config import (
    HOMES,
    MeasureConf,
    ObjectiveRules,
    all_rules,
    compose_train,
    describe,
    rules_of,
)
from locality.core.errors import UserError
from locality.core.rules import Choice, Range, rule
from locality.run.checks import validate

README = Path(__file__).parents[1] / "README.md"


def set_rule(monkeypatch, home: type, name: str, *rules) -> None:
    """Change a field's rules in its home, and only there."""
    (found,) = [f for f in dataclasses.fields(home) if f.name == name]
    monkeypatch.setattr(found, "metadata", types.MappingProxyType(rule(*rules)))


def refusal(overrides: list[str]) -> str:
    try:
        validate(compose_train(overrides))
    except UserError as err:
        return str(err)
    return ""


def planned(overrides: list[str], tmp_path) -> str | None:
    from locality.plan import plan

    (run,) = plan([f"outputs_root={tmp_path}", *overrides])
    return run.problem


@pytest.mark.parametrize(
    ("home", "name", "key", "changed", "value"),
    [
        (
            MeasureConf,
            "n_probe",
            "measure.n_probe",
            Range("an integer", "512", 64, note="512+ for stable CKA"),
            32,
        ),
        (
            ObjectiveRules,
            "head_dropout",
            "objective.head_dropout",
            Range("a probability", "0.1", 0, high=0.5, whole=False),
            0.7,
        ),
    ],
)
def test_a_range_changed_in_its_home_moves_checks_plan_and_docs(
    monkeypatch, tmp_path, home, name, key, changed, value
):
    override = [f"{key}={value}"]
    assert refusal(override) == "" and planned(override, tmp_path) is None  # allowed by today's rule
    set_rule(monkeypatch, home, name, changed)
    says = f"{key}={value} is invalid: it must be {changed.describe()} (e.g. {key}={changed.example})."
    assert refusal(override) == says
    assert planned(override, tmp_path) == says
    assert describe(key) == f"{key}: {changed.describe()} (e.g. {key}={changed.example})"


def test_a_choice_changed_in_its_home_moves_checks_and_docs(monkeypatch):
    set_rule(monkeypatch, MeasureConf, "ci_method", Choice(("basic",)))
    assert refusal(["measure.ci_method=percentile"]) == (
        "measure.ci_method='percentile' is not a valid choice; choose one of: basic."
    )
    assert describe("measure.ci_method") == "measure.ci_method: one of: basic"


def test_choices_that_code_defines_are_referenced_not_copied(monkeypatch):
    import locality.core.pooling
    import locality.instrument.ntk_profile
    from locality.core.config import NTK_PARAMS

    assert locality.instrument.ntk_profile.PARAMS is NTK_PARAMS  # the code computes what the rule offers
    assert describe("measure.ntk_params").startswith(f"measure.ntk_params: one of: {', '.join(NTK_PARAMS)};")
    monkeypatch.setattr(locality.core.pooling, "POOLINGS", ("mean", "last"))
    assert "choose one of: mean, last." in refusal(["measure.pooling=tokens"])


def test_ntk_params_lora_is_refused_in_a_training_run_with_the_reason(tmp_path):
    """ntk_profile.PARAMS offers lora (the adapters, `python -m locality.ntk`); a training run takes its kernel
    before the controls add adapters, so there it is refused before any work, with or without control=lora."""
    for control in ("control=lora", "control=standard"):
        says = refusal(["model=tiny_gpt2", control, "measure.ntk=true", "measure.ntk_params=lora"])
        assert says.startswith("measure.ntk_params=lora is not supported in a training run: the kernel is")
    assert planned(["measure.ntk=true", "measure.ntk_params=lora"], tmp_path) == says
    assert refusal(["measure.ntk_params=lora"]) == ""  # no kernel, nothing to refuse
    assert "choose one of: all, blocks, lora." in refusal(["measure.ntk_params=nonsense"])


def test_every_rule_has_a_home_field_and_describes_itself():
    keys = [key for key, _ in all_rules()]
    assert "measure.n_probe" in keys and "optim.lr" in keys and "trainer.precision" in keys
    for home in HOMES.values():
        assert rules_of(home), f"{home.__name__} states no rule"
    for key, r in all_rules():
        assert r.describe(), key


def test_readme_states_each_range_and_choice_as_its_home_does():
    """Every "Bad input" row answered from a rule states that rule's words (the table's ranges are the homes')."""
    checked = 0
    for _, says in ROWS:
        match = re.match(r"([\w.]+)=(.*?) is (invalid: it must be|not a valid choice; choose) ", says)
        if not match or match.group(1) not in {k for k, _ in all_rules()}:
            continue
        key = match.group(1)
        words = describe(key).removeprefix(f"{key}: ").split(" (e.g.")[0].split("; ")[0]
        stated = says[match.end() :]
        assert words.startswith(stated) or stated.startswith(words), (key, stated, words)
        checked += 1
    assert checked >= 40


def parenthesis_after(text: str, key: str) -> str:
    """The parenthesis that follows the first mention of `key` in README (nested ones included)."""
    start = text.index(f"`{key}` (") + len(f"`{key}` (")
    depth, end = 1, start
    while depth:
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        end += 1
    return text[start : end - 1]


@pytest.mark.parametrize(
    ("key", "written"),
    [
        ("model.attn_implementation", "model.attn_implementation"),
        ("trainer.matmul_precision", "matmul_precision"),  # in the trainer group's row
        ("trainer.keep_checkpoint", "keep_checkpoint"),
        ("measure.ntk_params", "measure.ntk_params"),
    ],
)
def test_readme_lists_the_choices_of_the_home(key, written):
    listed = re.findall(r"`([\w-]+)`", parenthesis_after(" ".join(README.read_text().split()), written))
    prefix, _, name = key.rpartition(".")
    (choice,) = [r for r in rules_of(HOMES[prefix])[name] if isinstance(r, Choice)]
    assert set(listed) == {c for c in choice.choices() if c is not None}


def test_the_measure_yaml_restates_no_default():
    from locality.core.config import SCHEMAS
    from locality.core.paths import conf_dir

    for group, schema in SCHEMAS.items():
        defaults = OmegaConf.to_container(OmegaConf.structured(schema))
        for path in sorted((conf_dir() / group).glob("*.yaml")):
            raw = OmegaConf.to_container(OmegaConf.load(path))
            raw.pop("defaults", None)
            same = sorted(k for k, v in raw.items() if k in defaults and defaults[k] == v)
            assert not same, f"{path.name} restates {group} defaults {same}"

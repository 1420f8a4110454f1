"""A sweep as data: the union of cartesian blocks, expanded into one override list per run.

An experiment lists its runs under `hydra.sweeper.matrix`, one block per cartesian product:

    matrix:
      - {model: [gpt2, opt-125m], objective: [native], data: [wikitext], control: [standard], seed: [0, 1]}
      - {model: [gpt2], objective: [cls], data: [sst2], control: [equal_step], seed: [0]}

so a study that is not one product (190 standard + 50 equal-step runs, each objective on its own data) is
still a file a user reads and edits. A key given on the command line (`seed=0,1`) or in
`hydra.sweeper.params` applies to every block and replaces the block's own values; runs that come out
identical are kept once. Without a matrix this is Hydra's basic sweep (one cartesian product).

Used by the Hydra sweeper (`hydra_plugins.locality_sweeper`) and by `python -m locality.plan`, so both list
the same runs in the same order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hydra.core.override_parser.types import Override


def render(value: Any) -> str:
    """A Python value as the right-hand side of a Hydra override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(render(v) for v in value) + "]"
    return str(value)


def override_lists(overrides: Iterable[Override]) -> dict[str, list[str]]:
    """Parsed command-line overrides as {key: ["key=value", ...]} (a sweep gives several values)."""
    lists: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise ValueError(f"{key}: only discrete sweeps (a,b,c or range(...)) are supported")
            lists[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            lists[key] = [f"{key}={override.get_value_element_as_str()}"]
    return lists


def block_lists(block: Mapping[str, Any]) -> dict[str, list[str]]:
    """One matrix block as {key: ["key=value", ...]}; a scalar is a single value."""
    lists = {}
    for key, values in block.items():
        values = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else [values]
        if not values:
            raise ValueError(f"matrix block {dict(block)} gives '{key}' no values")
        lists[key] = [f"{key}={render(v)}" for v in values]
    return lists


def expand(matrix: Sequence[Mapping[str, Any]] | None, common: Mapping[str, list[str]]) -> list[list[str]]:
    """Every run's overrides: the union over blocks of (block x common), common keys winning, deduplicated."""
    blocks = list(matrix or []) or [{}]
    jobs, seen = [], set()
    for block in blocks:
        lists = {**block_lists(block), **common}
        for combo in itertools.product(*lists.values()):
            job = list(combo)
            if tuple(job) not in seen:
                seen.add(tuple(job))
                jobs.append(job)
    return jobs

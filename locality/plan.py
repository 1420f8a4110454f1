"""List a sweep's runs without network or weights: `python -m locality.plan experiment=<name> [overrides]`.

Prints one line per run (its run directory, model, objective, control, seed, and its data), in the order
the sweep runs them, then a line starting with `total`. Every run's config is composed and checked as `locality.train`
would check it before loading anything (schema, choices, controls, objective vs model family); if any is
invalid, each is named with its reason and the exit status is 2.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from omegaconf import DictConfig, OmegaConf

from locality.core.config import ModelConf, register_resolvers
from locality.core.errors import EXIT_USER_ERROR, UserError, report
from locality.core.identity import control_name
from locality.core.paths import conf_dir
from locality.run.checks import validate
from locality.run.sweep import expand, override_lists


@dataclass
class PlannedRun:
    run_dir: str
    model: str
    objective: str
    control: str
    seed: int
    data: str
    problem: str | None = None


def plan(overrides: list[str]) -> list[PlannedRun]:
    """Every run of the sweep that `python -m locality.train -m <overrides>` would launch."""
    register_resolvers()
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        base = compose("train", overrides=fixed, return_hydra_config=True)
        sweeper = base.hydra.sweeper
        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        matrix = OmegaConf.to_container(sweeper.matrix) if sweeper.get("matrix") else None
        common = override_lists(parser.parse_overrides([*params, *overrides]))
        composer = _Composer(parser)
        return [_planned(composer(job)) for job in expand(matrix, common)]


class _Composer:
    """Compose run configs, once per choice of config groups: runs that differ only in plain values (the
    seed, a learning rate) reuse that composition and set the values, as Hydra would."""

    def __init__(self, parser: OverridesParser):
        self.parser = parser
        self.groups = {p.name for p in conf_dir().iterdir() if p.is_dir()}
        self.cache: dict[tuple[str, ...], DictConfig] = {}

    def __call__(self, job: list[str]) -> DictConfig:
        structural, values = [], []
        for override in self.parser.parse_overrides(job):
            key = override.get_key_element()
            plain = (
                override.type == OverrideType.CHANGE
                and key.split(".")[0] not in self.groups
                and not key.startswith("hydra")
            )
            (values if plain else structural).append(override)
        key = tuple(o.input_line for o in structural)
        if key not in self.cache:
            self.cache[key] = compose("train", overrides=list(key), return_hydra_config=True)
        cfg = copy.deepcopy(self.cache[key])
        for override in values:
            OmegaConf.update(cfg, override.get_key_element(), override.value(), merge=False)
        return cfg


def _planned(cfg) -> PlannedRun:
    run_dir = str(Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir)
    run = PlannedRun(
        run_dir, cfg.model.name, cfg.objective.name, control_name(cfg.control), cfg.seed, cfg.data.name
    )
    try:
        check_offline(cfg)
    except UserError as err:
        run.problem = " ".join(str(err).split())
    return run


def check_offline(cfg) -> None:
    """What `locality.train` checks before loading weights, minus what needs the hub."""
    from locality.backbones import family_of
    from locality.controls.build import build_controls
    from locality.objectives import objective_class

    cfg = validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    build_controls(cfg.control)
    spec = ModelConf(**cfg.model)
    family = spec.family
    if family is None and spec.arch is not None:
        from transformers import AutoConfig

        family = family_of(AutoConfig.for_model(spec.arch))
    if family is None and cfg.objective.name == "native":
        return  # a hub model without a preset family: resolved when its config is downloaded
    objective = objective_class(cfg.objective, family=family)
    if family is not None:
        objective.check_family(family, _ModelType(spec.arch or spec.name))


@dataclass
class _ModelType:
    model_type: str


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        return 0
    try:
        runs = plan(overrides)
    except UserError as err:
        report(err)
        return EXIT_USER_ERROR
    except Exception as err:  # Hydra's composition errors: an unknown choice, a misspelt key
        report(UserError(f"Could not compose the sweep {' '.join(overrides)}: {err}"))
        return EXIT_USER_ERROR
    width = max((len(r.run_dir) for r in runs), default=10)
    for r in runs:
        print(
            f"{r.run_dir:<{width}}  {r.model:<18} {r.objective:<7} {r.control:<12} {r.seed:<3} data={r.data}"
        )
    by_control = Counter(r.control for r in runs)
    dirs = Counter(r.run_dir for r in runs)
    print(
        f"total {len(runs)} runs ({', '.join(f'{c}: {n}' for c, n in sorted(by_control.items()))}); "
        f"{len(dirs)} distinct run directories"
    )
    invalid = [r for r in runs if r.problem]
    for r in invalid:
        report(UserError(f"invalid run {r.run_dir}: {r.problem}"))
    clashes = [d for d, n in dirs.items() if n > 1]
    for d in clashes:
        report(UserError(f"{dirs[d]} runs share the run directory {d}; their configs are identical."))
    return EXIT_USER_ERROR if invalid or clashes else 0


if __name__ == "__main__":
    sys.exit(main())

"""List a sweep's runs without network or weights: `python -m locality.plan experiment=<name> [overrides]`.

Prints one line per run (its run directory, its state, model, objective, control, seed, and its data), in the
order the sweep runs them, then a line starting with `total` (runs per control, distinct run directories, runs
per state). A run's state is read from its directory: done (results.json), failed (failed.json), partial (a
checkpoint to resume from, neither file) or missing. Every run's config is composed and checked as
`locality.train` would check it before loading anything (schema, choices, controls, objective vs model
family); if any is invalid, each is named with its reason and the exit status is 2.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import sys
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from omegaconf import DictConfig, OmegaConf, open_dict

from locality.core.config import ModelConf, register_resolvers
from locality.core.errors import EXIT_USER_ERROR, UserError, report
from locality.core.identity import control_name
from locality.core.paths import conf_dir
from locality.run.checks import validate
from locality.run.command import run_command
from locality.run.rundir import RunDir
from locality.run.sweep import expand, override_lists

STATES = ("done", "failed", "partial", "missing")


@dataclass
class PlannedRun:
    run_dir: str
    model: str
    objective: str
    control: str
    seed: int
    data: str
    problem: str | None = None
    state: str = "missing"  # one of STATES


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
        return _plan_jobs(_Composer(parser), expand(matrix, common))


def _plan_jobs(composer: _Composer, jobs: list[list[str]]) -> list[PlannedRun]:
    """Plan the jobs in launch order. Each distinct composition costs ~0.15 s and each check ~0.03 s of one
    core; with many compositions and more than one core, two forked processes share them, each taking whole
    compositions (the modules the checks need are imported once, before the fork)."""
    shares = _shares(composer, jobs)
    if len(shares) < 2:
        return [_planned(*composer(job)) for job in jobs]
    _import_checks()  # once, here: the forked processes inherit the modules
    context = multiprocessing.get_context("fork")
    with context.Pool(len(shares)) as pool:
        done = pool.map(partial(_plan_share, composer, jobs), shares)
    planned = dict(item for share in done for item in share)
    return [planned[i] for i in range(len(jobs))]


PARALLEL_FROM = 16  # compositions: below this the fork costs more than it saves


def _shares(composer: _Composer, jobs: list[list[str]]) -> list[list[int]]:
    """The job indices of each process: the compositions dealt out in turn, so that both get every kind."""
    if "fork" not in multiprocessing.get_all_start_methods() or (os.cpu_count() or 1) < 2:
        return [list(range(len(jobs)))]
    by_key: dict[tuple[str, ...], list[int]] = {}
    for index, job in enumerate(jobs):
        by_key.setdefault(composer.split(job)[0], []).append(index)
    if len(by_key) < PARALLEL_FROM:
        return [list(range(len(jobs)))]
    shares: list[list[int]] = [[], []]
    for n, indices in enumerate(by_key.values()):
        shares[n % 2].extend(indices)
    return shares


def _plan_share(composer: _Composer, jobs: list[list[str]], share: list[int]) -> list[tuple[int, PlannedRun]]:
    return [(i, _planned(*composer(jobs[i]))) for i in share]


class _Composer:
    """Compose run configs, once per choice of config groups: runs that differ only in plain values (the
    seed, a learning rate) reuse that composition and set the values, as Hydra would. A composition is kept
    without Hydra's own node (most of its size) but for `hydra.sweep`, the run directory's two keys."""

    def __init__(self, parser: OverridesParser):
        self.parser = parser
        self.groups = {p.name for p in conf_dir().iterdir() if p.is_dir()}
        self.cache: dict[tuple[str, ...], tuple[DictConfig, dict]] = {}

    def split(self, job: list[str]) -> tuple[tuple[str, ...], list]:
        """The overrides that need a composition of their own (as the cache key), and the plain values."""
        structural, values = [], []
        for override in self.parser.parse_overrides(job):
            key = override.get_key_element()
            plain = (
                override.type == OverrideType.CHANGE
                and key.split(".")[0] not in self.groups
                and not key.startswith("hydra")
            )
            (values if plain else structural).append(override)
        return tuple(o.input_line for o in structural), values

    def __call__(self, job: list[str]) -> tuple[DictConfig, str]:
        """The run's config (without the hydra node) and its run directory."""
        key, values = self.split(job)
        if key not in self.cache:
            full = compose("train", overrides=list(key), return_hydra_config=True)
            sweep = OmegaConf.to_container(full.hydra.sweep, resolve=False)
            self.cache[key] = (OmegaConf.masked_copy(full, [k for k in full if k != "hydra"]), sweep)
        composed, sweep = self.cache[key]
        cfg = copy.deepcopy(composed)
        for override in values:
            OmegaConf.update(cfg, override.get_key_element(), override.value(), merge=False)
        with open_dict(cfg):  # the run directory's interpolations resolve against the whole config
            cfg.hydra = {"sweep": sweep}
            run_dir = str(Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir)
            del cfg["hydra"]
        return cfg, run_dir


def _planned(cfg: DictConfig, run_dir: str) -> PlannedRun:
    run = PlannedRun(
        run_dir,
        cfg.model.name,
        cfg.objective.name,
        control_name(cfg.control),
        cfg.seed,
        cfg.data.name,
        state=run_state(Path(run_dir)),
    )
    try:
        check_offline(cfg)
    except UserError as err:
        run.problem = " ".join(str(err).split())
    return run


def run_state(path: Path) -> str:
    """done: results.json; failed: failed.json and no results; partial: a checkpoint to resume from and
    neither file; missing: none of these (never started, or stopped before its first checkpoint)."""
    run = RunDir(path)
    if run.results_path.is_file():
        return "done"
    if run.failed_path.is_file():
        return "failed"
    if run.checkpoints.is_dir() and any(run.checkpoints.glob("*.ckpt")):
        return "partial"
    return "missing"


def _import_checks() -> None:
    """The modules the checks need (torch, transformers and Lightning: most of a plan's first second)."""
    import locality.backbones
    import locality.controls.build
    import locality.objectives  # noqa: F401


def check_offline(cfg: DictConfig) -> None:
    """What `locality.train` checks before loading weights, minus what needs the hub (a config without the
    hydra node)."""
    from locality.backbones import family_of
    from locality.controls.build import build_controls
    from locality.objectives import objective_class

    cfg = validate(cfg)
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
    return run_command(__doc__, print_plan, argv)


def print_plan(overrides: list[str]) -> int:
    try:
        runs = plan(overrides)
    except UserError:
        raise
    except Exception as err:  # Hydra's composition errors: an unknown choice, a misspelt key
        raise UserError(f"Could not compose the sweep {' '.join(overrides)}: {err}") from None
    width = max((len(r.run_dir) for r in runs), default=10)
    for r in runs:
        print(
            f"{r.run_dir:<{width}}  {r.state:<7}  {r.model:<18} {r.objective:<7} {r.control:<12} {r.seed:<3} "
            f"data={r.data}"
        )
    by_control = Counter(r.control for r in runs)
    by_state = Counter(r.state for r in runs)
    dirs = Counter(r.run_dir for r in runs)
    print(
        f"total {len(runs)} runs ({', '.join(f'{c}: {n}' for c, n in sorted(by_control.items()))}); "
        f"{len(dirs)} distinct run directories; " + ", ".join(f"{s} {by_state[s]}" for s in STATES)
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

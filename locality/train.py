"""One fine-tuning run: `python -m locality.train [overrides]` (Hydra; `-m` sweeps).

Read top to bottom: resolve the run directory, load the data and then the backbone, build the objective,
controls, measurement and trainer, fit, validate (unless the fit's last validation was at its last step),
write results.json last. Measurement is a callback (`locality.instrument.callback`): before training on the
pretrained weights, after it on the fine-tuned ones, where training runs (the trainer's device and
precision); in a multi-process run every rank trains and measures, and rank zero alone writes files and
prints. A sweep's own process (`-m`) only composes and dispatches: torch, Lightning and transformers are
imported by its jobs, in the launcher's workers.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

import hydra

from locality.core.config import register_resolvers
from locality.core.errors import EXIT_USER_ERROR
from locality.core.paths import conf_dir
from locality.run.checks import PreflightCallback

register_resolvers()
HYDRA_MAIN = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")


def exit_2_if_not_composed(entry: Callable[[], None]) -> None:
    """Run a Hydra entry point. Hydra reports a config it cannot compose (an unknown choice, a misspelt key)
    and exits 1; those are user errors too, so they exit 2 like ours. Exit 1 after the config composed (a
    failed sweep, a crashed run) stays 1."""
    PreflightCallback.composed = False
    try:
        entry()
    except SystemExit as exit_:
        if exit_.code == 1 and not PreflightCallback.composed:
            sys.exit(EXIT_USER_ERROR)
        raise


def sweep_job(cfg) -> None:
    """A sweep's job: the run's modules (torch, Lightning, transformers: ~7 s) are imported by the process that
    runs it, once per process (a joblib or submitit worker; the sweep's own process only under Hydra's basic
    launcher, which runs the jobs in it), not by a sweep's process that only composes and dispatches."""
    importlib.import_module("locality.train").job(cfg)


if __name__ == "__main__":
    if {"--help", "-h", "--hydra-help"} & set(sys.argv[1:]):
        HYDRA_MAIN(lambda cfg: None)()  # Hydra prints the help from conf/ and exits, before torch is imported
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        exit_2_if_not_composed(HYDRA_MAIN(sweep_job))
        sys.exit(0)

import contextlib
import time
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from locality.analysis.cross_layer import save_cross_layer
from locality.controls import Control
from locality.controls.update_ratios import UpdateRatioMonitor
from locality.core.components import instantiate_component
from locality.core.config import to_plain
from locality.core.errors import UserError, report, wants_traceback
from locality.core.identity import config_hash, control_name, setting_hash
from locality.core.provenance import versions
from locality.core.quiet import quiet_libraries
from locality.core.results import compose
from locality.core.taxonomy import scale_band
from locality.data.datamodule import LocalityDataModule
from locality.instrument.callback import ProfileMeasurement
from locality.instrument.depth import DepthProfiler
from locality.instrument.drop_top import evaluate_dropping_top
from locality.instrument.phases import StepClock
from locality.instrument.report import format_profile, log_profile
from locality.run.assembly import assemble
from locality.run.checks import preflight, validate
from locality.run.faults import storage_error
from locality.run.final_validation import FinalValidation
from locality.run.launch import children_run_this_job
from locality.run.loggers import RunInfo, finish_wandb
from locality.run.module import LocalityModule
from locality.run.resume import RunState
from locality.run.rundir import RunDir, checkpoint_step
from locality.run.trainer import build_trainer


def run(cfg: DictConfig) -> dict:
    attempt = Attempt(time.perf_counter())
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = validate(cfg)
        checked = preflight(cfg)  # control arguments, model source, output root: before any work
    except (
        UserError
    ) as error:  # a single run was checked before its directory existed; a sweep job fails here
        if is_main_process() and output_dir.is_dir():
            RunDir(output_dir).write_failure(error, step=None)
        raise
    quiet_libraries()
    run_dir = RunDir(output_dir)
    with run_dir.exclusive() if is_main_process() else contextlib.nullcontext():
        return run_in(run_dir, cfg, checked.controls, attempt)


def run_in(run_dir: RunDir, cfg: DictConfig, controls: list[Control], attempt: Attempt) -> dict:
    """The run in its directory, which this process holds: skip it if complete, resume it, or start it."""
    if not cfg.force:
        run_dir.refuse_other_config(cfg)
        finished = run_dir.finished_results()
        if finished is not None:
            print(f"{run_dir.path} is complete (results.json exists); skipping. Use force=true to re-run.")
            return finished
        run_dir.check_checkpoint()  # a damaged checkpoint is reported before anything is loaded
    if is_main_process():
        if cfg.force:
            run_dir.start_over()
        run_dir.save_config(cfg)
    try:
        return train_and_measure(cfg, run_dir, attempt, controls)
    except BaseException as error:
        interrupted = was_interrupted(error, attempt)
        if is_main_process():
            with contextlib.suppress(OSError):  # the disk that failed the run may not take failed.json either
                run_dir.write_failure(error, step=attempt.step, reason="interrupted" if interrupted else None)
        if interrupted:
            kept = run_dir.last_checkpoint()
            print(
                f"\nlocality: interrupted at step {attempt.step}; "
                + (f"the last checkpoint is {kept}" if kept else "no checkpoint was written yet")
                + f". Relaunch the same command to {'resume from it' if kept else 'start again'}.",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_INTERRUPTED) from None
        storage = storage_error(error)
        if storage is not None:
            raise UserError(storage_message(run_dir, storage, attempt.step)) from error
        raise


def storage_message(run_dir: RunDir, error: OSError, step: int | None) -> str:
    """A full disk or an unwritable file: what could not be written, and which checkpoint (and step) is kept,
    never the temporary file a checkpoint is written to first."""
    failed = Path(error.filename) if error.filename else None
    if failed is not None and failed.parent == run_dir.checkpoints:
        what = f"the checkpoint of step {step}"
    else:
        what = str(failed) if failed is not None else "a file"
    kept = run_dir.last_checkpoint()
    if kept is None:
        keeps = "No checkpoint was written yet; "
    else:
        kept_step, _ = checkpoint_step(Path(kept))
        keeps = f"The checkpoint of step {kept_step} is kept ({kept}); "
    return (
        f"The run stopped at step {step} because {what} could not be written ({error.strerror}). {keeps}"
        "free space or fix permissions, then relaunch the same command to resume."
    )


EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


def was_interrupted(error: BaseException, attempt: Attempt) -> bool:
    """Ctrl-C: a KeyboardInterrupt, or the SystemExit Lightning raises after handling one itself."""
    if isinstance(error, KeyboardInterrupt):
        return True
    trainer = attempt.trainer
    return (
        isinstance(error, SystemExit) and trainer is not None and bool(getattr(trainer, "interrupted", False))
    )


class Attempt:
    """What a failure report needs to know about the attempt so far, and when it began (its checks)."""

    def __init__(self, started: float):
        self.started = started
        self.trainer: L.Trainer | None = None

    @property
    def step(self) -> int | None:
        return self.trainer.global_step if self.trainer is not None else None


def train_and_measure(cfg: DictConfig, run_dir: RunDir, attempt: Attempt, controls: list[Control]) -> dict:
    started = time.perf_counter()
    checks_s = started - attempt.started  # validation, preflight, the run directory's lock and checks
    parts = assemble(cfg)  # seeded; data first (refused before any weights load), backbone, objective
    load_s = time.perf_counter() - started  # the data and the weights
    data = LocalityDataModule(
        parts.splits,
        parts.objective,
        cfg.data.batch_size,
        cfg.data.eval_batch_size,
        cfg.seed,
        cfg.data.num_workers,
    )
    module = LocalityModule(
        parts.backbone,
        parts.objective,
        instantiate(cfg.optim),
        instantiate(cfg.scheduler),
        controls,
        compile=cfg.trainer.compile,
    )
    if is_main_process():
        print(parts.backbone.describe())

    sweep = cfg.sweep_name if HydraConfig.get().mode == RunMode.MULTIRUN else None
    # step 0 comes before any control acts: a sweep's runs that differ only in their control measure it once
    shared_init = run_dir.path.parent / ".init" / f"{setting_hash(cfg)}-s{cfg.seed}.json" if sweep else None
    profiler = DepthProfiler(cfg.measure, parts.backbone, data, cfg.seed, shared_init)
    run_state = RunState(started)  # RNG states, wall time and resumes, kept in the checkpoint
    measurement = ProfileMeasurement(profiler)  # before training and after it, on the training device
    clock = StepClock()
    final_validation = FinalValidation()  # the fit's own, when it validated the final weights
    callbacks = [
        *controls,
        *filter(None, [profiler.dynamics_callback(), ratio_monitor(cfg.measure, controls)]),
        measurement,
        run_state,
        clock,
        final_validation,
        *configured_callbacks(cfg),
    ]
    logger = make_logger(cfg, run_dir, parts.backbone, sweep) if is_main_process() else False
    trainer = attempt.trainer = build_trainer(cfg.trainer, run_dir, callbacks, logger)
    fit_started = time.perf_counter()
    # In a sweep, the processes Lightning starts for a multi-process run must run this job, not the sweep.
    with children_run_this_job():
        trainer.fit(module, datamodule=data, ckpt_path=run_dir.last_checkpoint())
    fit_s = time.perf_counter() - fit_started  # this segment's; includes the measurement before and after
    final, validate_timings = final_validation.after_fit(trainer, module, data)

    results = compose(
        run_record(cfg, run_dir, parts, trainer, sweep, run_state),
        measurement.results,
        measure={
            key: to_plain(cfg.measure[key]) for key in ("n_probe", "pooling", "ci", "ci_method", "n_boot")
        },
        init=profiler.init,
        final={key.removeprefix("val/"): float(value) for key, value in final.items()},
        controls={control.name: control.summary() for control in controls},
        timings={
            **profiler.timings,
            "checks_s": checks_s,
            "load_s": load_s,
            "fit_s": fit_s,
            **clock.timings(),
            **validate_timings,
            "pre_capture_cached": profiler.cache_hit,
        },
        ntk=measurement.ntk,
        drop_top_k=evaluate_dropping_top(trainer, module, data, parts.backbone, cfg.measure.drop_top_k)
        if cfg.measure.drop_top_k
        else None,
    )
    if is_main_process():
        write_outputs(cfg, run_dir, results, trainer)
    return results


def run_record(
    cfg: DictConfig, run_dir: RunDir, parts, trainer: L.Trainer, sweep, run_state: RunState
) -> dict:
    """results.json's `run`: what ran, where it came from, and how it went."""
    backbone = parts.backbone
    return {
        "name": run_dir.path.name,
        "model": cfg.model.name,
        "family": backbone.family,
        "block_type": backbone.block_type,
        "scale_band": scale_band(backbone.n_params),
        "objective": parts.objective.name,
        "control": control_name(cfg.control),
        "seed": cfg.seed,
        "n_params": backbone.n_params,
        "n_layers": backbone.n_layers,
        "steps": trainer.global_step,
        "init_from": backbone.init_from,
        "config_hash": config_hash(cfg),
        "setting_hash": setting_hash(cfg),
        "sweep": sweep,
        "versions": versions(),
        "data": parts.splits.info(),
        "wall_s": run_state.wall_s,  # over every segment of a resumed run
        "resumed_from_steps": run_state.resumed_from_steps,
        # fewer steps than asked (trainer.max_time, a data set shorter than max_epochs allows): said, not hidden
        "stopped_early": trainer.global_step < cfg.trainer.max_steps,
    }


def write_outputs(cfg: DictConfig, run_dir: RunDir, results: dict, trainer: L.Trainer) -> None:
    """Rank zero: the figures, the logged profile, results.json (last), then the printed profile."""
    if "cross_layer" in results:
        save_cross_layer(run_dir.path, results["cross_layer"])
    log_profile(trainer.loggers, results, step=trainer.global_step)
    run_dir.write_results(results)
    if cfg.trainer.get("keep_checkpoint", "last") == "none":  # the run is complete: nothing left to resume
        run_dir.drop_checkpoints()
    print(format_profile(results))
    print(f"\nresults: {run_dir.results_path}")


def make_logger(cfg: DictConfig, run_dir: RunDir, backbone, sweep: str | None):
    tags = [
        f"family:{backbone.family}",
        f"block:{backbone.block_type}",
        f"scale:{scale_band(backbone.n_params)}",
    ]
    info = RunInfo(run_dir, cfg.run_name, to_plain(cfg), sweep, control_name(cfg.control), tags)
    return instantiate_component(cfg.logger, "logger", info=info)


def configured_callbacks(cfg: DictConfig) -> list:
    """The `callbacks` group: any other Lightning callbacks, by name (README, "Callbacks")."""
    return [
        instantiate_component(spec, f"callbacks.{name}")
        for name, spec in (cfg.get("callbacks") or {}).items()
    ]


def is_main_process() -> bool:
    """Rank zero of a multi-process run (or the only process): it alone writes files and prints."""
    return rank_zero_only.rank == 0


def ratio_monitor(measure_cfg, controls: list[Control]) -> UpdateRatioMonitor | None:
    """Runs without the equal-step control still log their per-block update ratios, for comparison."""
    if not measure_cfg.update_ratios or any(isinstance(c, UpdateRatioMonitor) for c in controls):
        return None
    return UpdateRatioMonitor()


def job(cfg: DictConfig) -> None:
    """One run, as Hydra's task function (`python -m locality.train`, and each job of a sweep)."""
    try:
        run(cfg)
    except UserError as err:
        # A single run exits 2 with one paragraph; in a sweep the job fails and the sweep goes on.
        if HydraConfig.get().mode == RunMode.MULTIRUN or wants_traceback():
            raise
        report(err)
        sys.exit(EXIT_USER_ERROR)
    finally:
        finish_wandb()


def main() -> None:
    """Console entry point (`locality-train`); a config that does not compose exits 2."""
    exit_2_if_not_composed(HYDRA_MAIN(job))


if __name__ == "__main__":
    main()

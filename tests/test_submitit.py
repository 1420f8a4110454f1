"""Sweeps on Hydra's submitit launcher (`hydra/launcher=submitit_local`: every job a separate process started by
submitit, as `submitit_slurm` starts them on a cluster): results, skip and resume identical to the joblib
launcher's, and a multi-process (FSDP2) job inside a submitit job. Needs the `sweep` extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher", reason="needs the sweep extra (pip install -e '.[sweep]')"
)
pytestmark = pytest.mark.slow

SWEEP = [
    "-m",
    "model=tiny_gpt2",
    "model.init=random",
    "objective=clm",
    "control=standard,equal_step",
    "seed=0,1",
    "trainer=smoke",
    "measure=fast",
    "logger=none",
    "data.batch_size=4",
    "data.n_validation=16",
    "data.eval_batch_size=32",
    "objective.max_length=32",
    "sweep_name=launchers",
]
SUBMITIT = ["hydra/launcher=submitit_local", "hydra.sweeper.max_batch_size=2"]  # 2 jobs at a time on 2 cores
JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
# what may differ between two launches of the same run: how long it took, and whether caches were warm
VARIES = {"timings"}
VARIES_IN_RUN = {"wall_s"}


def cli(*args: str, outputs: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    outputs.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "locality.train", *args],
        cwd=outputs.parent,
        # One torch thread in every job: joblib's workers get cores / n_jobs threads, submitit's jobs torch's
        # default; float32 sums in another order would differ in the 7th digit.
        env={**os.environ, "LOCALITY_OUTPUTS": str(outputs), "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def results(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))}


def same_result(a: dict, b: dict) -> bool:
    strip = lambda r: {  # noqa: E731
        **{k: v for k, v in r.items() if k not in VARIES},
        "run": {k: v for k, v in r["run"].items() if k not in VARIES_IN_RUN},
    }
    return strip(a) == strip(b)


def job_logs(sweep: Path) -> str:
    return "".join(p.read_text() for p in sorted((sweep / ".submitit").glob("*/*_log.out")))


def test_a_submitit_local_sweep_skips_resumes_and_matches_joblib(tmp_path):
    outputs = tmp_path / "submitit"
    first = cli(*SWEEP, *SUBMITIT, outputs=outputs)
    assert first.returncode == 0, first.stderr[-4000:]
    sweep = outputs / "sweeps" / "launchers"
    done = results(sweep)
    assert len(done) == 4, sorted(done)
    assert {(r["run"]["control"], r["run"]["seed"]) for r in done.values()} == {
        (c, s) for c in ("standard", "equal_step") for s in (0, 1)
    }
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 4  # each job ran in its own process
    assert not (outputs / "runs").exists()

    # relaunch: three complete runs are skipped; one whose results.json is gone resumes from its checkpoint
    (resumed_name,) = [n for n in done if "-equal_step-s1-" in n]
    (sweep / resumed_name / "results.json").unlink()
    written = {n: (sweep / n / "results.json").stat().st_mtime_ns for n in done if n != resumed_name}
    again = cli(*SWEEP, *SUBMITIT, outputs=outputs)
    assert again.returncode == 0, again.stderr[-4000:]
    logs = job_logs(sweep)
    assert logs.count("is complete (results.json exists); skipping") == 3  # none in the first launch
    assert all((sweep / n / "results.json").stat().st_mtime_ns == t for n, t in written.items())
    relaunched = results(sweep)
    assert relaunched[resumed_name]["run"]["resumed_from_steps"] == [2]
    for name in ("change", "profile", "final", "init", "controls"):
        assert relaunched[resumed_name][name] == done[resumed_name][name], name

    # the same sweep on the joblib launcher: the same run directories and the same results
    joblib = cli(*SWEEP, *JOBLIB, outputs=tmp_path / "joblib")
    assert joblib.returncode == 0, joblib.stderr[-4000:]
    other = results(tmp_path / "joblib" / "sweeps" / "launchers")
    assert sorted(other) == sorted(done)
    for name in done:
        assert same_result(done[name], other[name]), name


def test_a_multi_process_job_runs_inside_a_submitit_job(tmp_path):
    """Lightning re-runs `python -m <main module>` for the second process; in a submitit job that module is
    submitit's: `children_run_this_job` makes it `locality.train` with the job's overrides and directory."""
    outputs = tmp_path / "outputs"
    proc = cli(
        "-m",
        "model=tiny_gpt2",
        "model.init=random",
        "objective=clm",
        "control=equal_step",
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy.param_dtype=float32",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "measure=fast",
        "logger=none",
        "data.batch_size=4",
        "data.n_validation=16",
        "objective.max_length=32",
        "sweep_name=fsdp",
        "hydra/launcher=submitit_local",
        outputs=outputs,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweep = outputs / "sweeps" / "fsdp"
    (found,) = sweep.glob("*/results.json")
    assert not (outputs / "runs").exists()  # the second process ran this job, not a run of its own
    assert len(list((found.parent / "checkpoints" / "last.ckpt").glob("*.distcp"))) == 2
    result = json.loads(found.read_text())
    assert result["run"]["steps"] == 2
    assert abs(result["controls"]["equal_step"]["spread_after_max"] - 1) < 1e-5

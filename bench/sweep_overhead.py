"""Where a sweep's time goes: the share of the workers' time spent outside training steps, and its parts.

Runs `python -m locality.train -m <overrides>` (default: the mini matrix) in a fresh outputs root, so no run is
skipped, times it from outside, then reads every run's `timings` in results.json:

    workers' time = wall time x parallel jobs (hydra.launcher.n_jobs)
    training steps = sum of timings.steps_s (forward, backward, optimizer step, step hooks)
    outside training steps = 1 - training steps / workers' time

and splits the rest: the sweep's start, dispatch and workers idle at the end of the sweep (the workers' time
the jobs do not account for: Hydra's sweeper composing every job's config before launching, each job's
config composed again in its worker), the job setup in the worker (from .hydra/config.yaml's time to the
run's start, with the results' writing: a worker's first job imports torch, Lightning and transformers), the
checks, loading, Lightning's setup, the training loop between steps (data, logging, checkpoints), the
measurement (pre-capture, step 0, post-capture, metrics), the final validation and the results. The sweep's
checkpoints must already be pretrained (`python -m locality.pretrain model=...`), or their first-use
pretraining is counted too; the cache of pre-fine-tuning captures (`~/.cache/locality/captures`, or under
$LOCALITY_CACHE) is used as it is: empty it first to measure a sweep's first pass.

    python bench/sweep_overhead.py                                   # the mini matrix, 112 runs
    python bench/sweep_overhead.py experiment=mini_matrix 'model=tiny_gpt2,tiny_opt'   # a part of it
    python bench/sweep_overhead.py --read outputs/sweeps/mini_matrix --wall 502 --jobs 2   # an earlier sweep
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

MEASUREMENT = ("pre_capture_s", "init_s", "post_capture_s", "metrics_s", "ntk_s", "cross_layer_s")


def breakdown(results: list[dict], wall_s: float, jobs: int) -> dict[str, float]:
    """The workers' time by part, in seconds; the parts sum to `wall_s * jobs`."""
    total = wall_s * jobs
    parts = dict.fromkeys(
        (
            "training steps",
            "training loop between steps",
            "Lightning setup and teardown",
            "measurement",
            "final validation",
            "loading",
            "checks",
            "results and the rest of the run",
        ),
        0.0,
    )
    in_runs = in_jobs = 0.0
    for result in results:
        t, run_s = result["timings"], result["run"]["wall_s"]
        measured = sum(t.get(key, 0.0) for key in MEASUREMENT)
        parts["training steps"] += t["steps_s"]
        parts["training loop between steps"] += t["train_loop_s"] - t["steps_s"]
        parts["Lightning setup and teardown"] += t["fit_s"] - measured - t["train_loop_s"]
        parts["measurement"] += measured
        parts["final validation"] += t["validate_s"]
        parts["loading"] += t["load_s"]
        parts["checks"] += t["checks_s"]
        parts["results and the rest of the run"] += run_s - t["load_s"] - t["fit_s"] - t["validate_s"]
        in_runs += t["checks_s"] + run_s
        in_jobs += result.get("job_span_s", t["checks_s"] + run_s)
    parts["job setup in the worker (1st: imports)"] = in_jobs - in_runs
    parts["sweep start, dispatch, idle workers"] = total - in_jobs
    return parts


def report(results: list[dict], wall_s: float, jobs: int) -> str:
    parts = breakdown(results, wall_s, jobs)
    total = wall_s * jobs
    median_steps = statistics.median_high(r["timings"]["steps_s"] for r in results)
    lines = [
        f"{len(results)} runs in {wall_s:.1f} s wall on {jobs} parallel jobs: {total:.1f} s of workers' time",
        f"{'part':<40} {'seconds':>9} {'share':>7} {'per run':>8}",
    ]
    for name, seconds in sorted(parts.items(), key=lambda item: -item[1]):
        lines.append(f"{name:<40} {seconds:9.1f} {seconds / total:7.1%} {seconds / len(results):8.2f}")
    lines.append(
        f"outside training steps: {1 - parts['training steps'] / total:.1%} of the workers' time "
        f"(median run: {median_steps:.2f} s of training steps)"
    )
    return "\n".join(lines)


def read_sweep(sweep_dir: Path) -> list[dict]:
    """Every run's results.json, with `job_span_s`: from Hydra's first file of the job (.hydra/config.yaml,
    written before the run starts) to results.json (the run's last)."""
    results = []
    for path in sorted(sweep_dir.glob("*/results.json")):
        result = json.loads(path.read_text())
        hydra_config = path.parent / ".hydra" / "config.yaml"
        if hydra_config.is_file():
            result["job_span_s"] = path.stat().st_mtime - hydra_config.stat().st_mtime
        results.append(result)
    if not results:
        sys.exit(f"no results.json under {sweep_dir}")
    missing = [r["run"]["name"] for r in results if "steps_s" not in r.get("timings", {})]
    if missing:
        sys.exit(f"{len(missing)} runs predate timings.steps_s (e.g. {missing[0]}); run the sweep again")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", default=["experiment=mini_matrix"])
    parser.add_argument("--read", type=Path, help="an earlier sweep's directory: report it, run nothing")
    parser.add_argument("--wall", type=float, help="with --read: the sweep's wall time in seconds")
    parser.add_argument("--jobs", type=int, default=2, help="with --read: its parallel jobs")
    parser.add_argument("--keep", type=Path, help="run the sweep in this outputs root and keep it")
    args = parser.parse_args()

    if args.read:
        if args.wall is None:
            parser.error("--read needs --wall (the sweep's wall time)")
        print(report(read_sweep(args.read), args.wall, args.jobs))
        return

    with tempfile.TemporaryDirectory(prefix="sweep_overhead_") as temporary:
        root = str(args.keep.resolve()) if args.keep else temporary
        env = dict(os.environ, LOCALITY_OUTPUTS=root)
        command = [sys.executable, "-m", "locality.train", "-m", *args.overrides, f"outputs_root={root}"]
        print(" ".join(command[1:]), flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall_s = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            sys.exit(f"the sweep failed (exit {done.returncode})")
        (sweep_dir,) = Path(root, "sweeps").iterdir()
        jobs = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.launcher.get("n_jobs", 1)
        print(report(read_sweep(sweep_dir), wall_s, jobs))


if __name__ == "__main__":
    main()

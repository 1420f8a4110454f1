"""Aggregate finished runs: `python -m locality.analyze PATH... [--out DIR] [--metric M] [--wandb]`.

PATH is a run dir, a sweep dir, or a glob. Writes to --out (default: analysis/ under the first PATH):
runs.csv and layers.csv (tidy tables), tables/*.csv (the paper's tables: headline, equal_step_survival,
steepness_vs_distance, width_variance, step0_prediction; with LP-FT runs head_energy and head_energy_trend),
figures/*.png (and per run, where recorded, figures/cross_layer/<run>.png and figures/drop_top/<run>.png)
and summary.md (the tables in markdown, plus failed, incomplete, unreadable and missing planned runs). `--wandb` also logs the tables and
figures to one analysis run in the sweep's W&B group (offline unless configured).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

from locality.analysis import figures, tables
from locality.analysis.aggregate import dynamics_table, inventory, layers_table, runs_table
from locality.analysis.summary import summary_markdown
from locality.core.errors import EXIT_USER_ERROR
from locality.core.results import Results

DEFAULT_METRICS = ("cosine_tokens", "cosine", "cka_linear")  # the paper's measure first


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    figures.EXTRA_FORMATS[:] = ["svg"] if args.svg else []
    found = inventory(args.paths)
    for bad in found.unreadable:
        print(f"locality: skipping {bad['path']}: {bad['reason']}", file=sys.stderr)
    if not found.results:
        print(
            f"locality: no finished runs (results.json) under {' '.join(args.paths)}"
            + (
                f"; {len(found.failed)} failed, {len(found.incomplete)} incomplete."
                if found.failed or found.incomplete
                else "."
            ),
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    runs, layers, dynamics = (
        runs_table(found.results),
        layers_table(found.results),
        dynamics_table(found.results),
    )
    offered = [
        c.removesuffix("_slope") for c in runs.columns if c.endswith("_slope") and not c.startswith("init_")
    ]
    metric = args.metric or next((m for m in DEFAULT_METRICS if m in offered), offered[0])
    if metric not in offered:
        print(
            f"locality: metric '{metric}' is not in these results; they have: {', '.join(sorted(offered))}.",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    out = args.out or Path(args.paths[0] if Path(args.paths[0]).is_dir() else ".") / "analysis"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    layers.to_csv(out / "layers.csv", index=False)
    if not dynamics.empty:
        dynamics.to_csv(out / "dynamics.csv", index=False)
    ci = _ci_level(found.results)
    paper_tables = write_tables(
        runs, found.results, metric, [metric, *sorted(set(offered) - {metric})], ci, out
    )
    made, per_run = write_figures(runs, layers, dynamics, found.results, paper_tables, metric, ci, out)
    summary = summary_markdown(runs, metric, paper_tables, found, missing_planned(args.paths, found))
    (out / "summary.md").write_text(summary)
    print(summary)
    print(
        f"{len(found.results)} runs -> {out}: runs.csv, layers.csv, tables/ ({len(paper_tables)}), "
        f"figures/ ({', '.join(f.name for f in made)}"
        + (f"; {len(per_run)} per-run figures in cross_layer/, drop_top/" if per_run else "")
        + "), summary.md"
    )
    if args.wandb:
        log_to_wandb(out, paper_tables, made, runs)
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m locality.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run dirs, sweep dirs or globs holding results.json files")
    parser.add_argument("--out", type=Path, help="output directory (default: <first path>/analysis)")
    parser.add_argument(
        "--metric",
        help="change metric for figures and tables (default: cosine_tokens, the "
        "paper's per-token cosine distance, when the runs have it)",
    )
    parser.add_argument(
        "--wandb", action="store_true", help="log tables and figures to W&B (offline by default)"
    )
    parser.add_argument(
        "--svg",
        action="store_true",
        help="also write every figure as SVG (text: diffable, fit for a repository)",
    )
    return parser


def write_tables(
    runs: pd.DataFrame, results: list[Results], metric: str, ordered: list[str], ci: float, out: Path
) -> dict[str, pd.DataFrame]:
    """The paper's tables (and those the runs' designs call for), each as tables/<name>.csv."""
    paper_tables = {
        "headline": tables.headline(runs, ordered),
        "equal_step_survival": tables.equal_step_survival(runs, metric),
        "steepness_vs_distance": tables.steepness_vs_distance(runs, metric, ci=ci),
        "width_variance": tables.width_variance(runs, metric),
        "step0_prediction": tables.step0_prediction(runs, metric, ci=ci),
    }
    if "init_kl_excess" in runs and runs.init_kl_excess.notna().any():
        paper_tables["dose_response"] = tables.dose_response(runs, metric, ci=ci)
    if (runs.control == "linearized").any():
        paper_tables["linearized_vs_standard"] = tables.linearized_vs_standard(runs, metric)
    energy_runs = tables.head_energy_runs(results)
    if not energy_runs.empty:
        paper_tables["head_energy"] = energy_runs
        paper_tables["head_energy_trend"] = tables.head_energy_trend(energy_runs, ci=ci)
    for name, table in paper_tables.items():
        table.to_csv(out / "tables" / f"{name}.csv", index=False)
    return paper_tables


def write_figures(runs, layers, dynamics, results, paper_tables, metric: str, ci: float, out: Path):
    """The study's figures and the per-run ones (cross-layer, drop-top): (study figures, per-run figures)."""
    rho = paper_tables["steepness_vs_distance"]
    pooled = rho[(rho.control == "all") & (rho.y == f"{metric}_steepness")]
    rho_all = pooled.iloc[0].to_dict() if len(pooled) else None
    made = [
        figures.profile_figure(layers, metric, out),
        figures.slope_forest(runs, metric, out, ci=ci),
        figures.steepness_scatter(runs, metric, out, rho_all),
        figures.dynamics_figure(dynamics, metric, out),
    ]
    if "dose_response" in paper_tables:
        made.append(figures.dose_response_figure(runs, paper_tables["dose_response"], metric, out))
    if "head_energy" in paper_tables:
        made.append(
            figures.head_energy_figure(paper_tables["head_energy"], paper_tables["head_energy_trend"], out)
        )
    per_run = [f(r, out) for r in results for f in (figures.cross_layer_figure, figures.drop_top_figure)]
    return [m for m in made if m is not None], [m for m in per_run if m is not None]


def _ci_level(results: list[Results]) -> float:
    levels = {(r.get("measure") or {}).get("ci") for r in results} - {None}
    return levels.pop() if len(levels) == 1 else 0.95


def missing_planned(paths: list[str], found) -> list[str] | None:
    """Planned runs of a sweep (its multirun.yaml) that have no results.json, by directory name."""
    from omegaconf import OmegaConf

    have = {Path(r["_path"]).name for r in found.results}
    missing: list[str] = []
    for path in paths:
        multirun = Path(path) / "multirun.yaml"
        if not multirun.is_file():
            continue
        try:
            from locality.plan import plan

            overrides = list(OmegaConf.load(multirun).hydra.overrides.task)
            planned = [Path(r.run_dir).name for r in plan(overrides)]
        except Exception as err:  # the plan is a convenience: never let it stop the analysis
            warnings.warn(f"could not re-plan the sweep in {path}: {err}", stacklevel=2)
            continue
        missing += [name for name in planned if name not in have]
    return missing if missing else None


def log_to_wandb(
    out: Path, paper_tables: dict[str, pd.DataFrame], made: list[Path], runs: pd.DataFrame
) -> None:
    """One W&B analysis run in the sweep's group: the tables as W&B Tables and the figures as images."""
    try:
        import os

        import wandb

        sweeps = runs["sweep"].dropna() if "sweep" in runs else pd.Series(dtype=object)
        group = sweeps.iloc[0] if len(sweeps) else out.parent.name
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "locality"),
            group=group,
            job_type="analysis",
            name=f"analysis-{group}",
            dir=str(out),
            mode=os.environ.get("WANDB_MODE", "offline"),
            settings=wandb.Settings(init_timeout=30),
        )
        run.log(
            {
                f"tables/{name}": wandb.Table(dataframe=table.fillna(""))
                for name, table in paper_tables.items()
            }
        )
        run.log({f"figures/{path.stem}": wandb.Image(str(path)) for path in made})
        run.finish()
    except Exception as err:  # the files are written; W&B is a view of them
        print(
            f"locality: could not log the analysis to W&B ({err}); the files in {out} are complete.",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())

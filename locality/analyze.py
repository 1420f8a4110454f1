"""Aggregate finished runs: `python -m locality.analyze PATH... [--out DIR] [--metric cka_linear]`.

PATH is a run dir, a sweep dir, or a glob. Writes runs.csv and layers.csv (tables), profiles_<metric>.png
and slopes_<metric>.png (figures) and summary.md to --out (default: analysis/ under the first PATH).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from locality.analysis.aggregate import find_results, layers_table, load_results, runs_table
from locality.analysis.figures import profile_figure, slope_figure
from locality.analysis.summary import summary_markdown
from locality.errors import EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m locality.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run dirs, sweep dirs or globs holding results.json files")
    parser.add_argument("--out", type=Path, help="output directory (default: <first path>/analysis)")
    parser.add_argument("--metric", default="cka_linear", help="change metric for figures and summary")
    args = parser.parse_args(argv)

    results = load_results(find_results(args.paths))
    if not results:
        print(f"locality: no finished runs (results.json) under {' '.join(args.paths)}.", file=sys.stderr)
        return EXIT_USER_ERROR
    runs, layers = runs_table(results), layers_table(results)
    if f"{args.metric}_slope" not in runs:
        metrics = sorted(c.removesuffix("_slope") for c in runs.columns if c.endswith("_slope"))
        print(f"locality: metric '{args.metric}' is not in these results; they have: {', '.join(metrics)}.",
              file=sys.stderr)
        return EXIT_USER_ERROR
    out = args.out or Path(args.paths[0] if Path(args.paths[0]).is_dir() else ".") / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    layers.to_csv(out / "layers.csv", index=False)
    figures = [profile_figure(layers, args.metric, out), slope_figure(runs, args.metric, out)]
    summary = summary_markdown(runs, args.metric)
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"{len(results)} runs -> {out}/runs.csv, layers.csv, {', '.join(f.name for f in figures)}, summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

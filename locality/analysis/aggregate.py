"""Collect finished runs (results.json files) into tidy pandas tables.

- `runs`: one row per run: identity (model, family, block_type, objective, control, seed), size, step-0
  objective distance, final task metrics, and per metric the slope with its CI, steepness and width.
- `layers`: one row per (run, metric, layer): the depth profile in long form.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pandas as pd

IDENTITY = ["model", "family", "block_type", "objective", "control", "seed"]


def find_results(paths: list[str]) -> list[Path]:
    """results.json files under run dirs, sweep dirs, or glob patterns (incomplete runs have none)."""
    found: list[Path] = []
    for pattern in paths:
        for match in sorted(glob.glob(pattern, recursive=True)) or [pattern]:
            path = Path(match)
            if path.is_file() and path.name == "results.json":
                found.append(path)
            elif path.is_dir():
                found.extend(sorted(path.rglob("results.json")))
    return sorted(set(found))


def load_results(files: list[Path]) -> list[dict]:
    out = []
    for file in files:
        result = json.loads(file.read_text())
        if result.get("schema") != "locality.results/1":
            continue
        result["_path"] = str(file.parent)
        out.append(result)
    return out


def runs_table(results: list[dict]) -> pd.DataFrame:
    rows = []
    for r in results:
        row = {**{k: r["run"].get(k) for k in ("name", *IDENTITY, "n_params", "n_layers", "steps", "wall_s")},
               "path": r["_path"]}
        row.update({f"init_{k}": v for k, v in r.get("init", {}).items() if isinstance(v, int | float)})
        row.update({f"final_{k}": v for k, v in r.get("final", {}).items() if isinstance(v, int | float)})
        for metric, stats in r.get("profile", {}).items():
            row[f"{metric}_slope"] = stats.get("slope")
            ci = stats.get("slope_ci") or [None, None]
            row[f"{metric}_slope_lo"], row[f"{metric}_slope_hi"] = ci
            row[f"{metric}_steepness"] = stats.get("steepness")
            row[f"{metric}_width"] = stats.get("width")
        rows.append(row)
    return pd.DataFrame(rows)


def layers_table(results: list[dict]) -> pd.DataFrame:
    rows = []
    for r in results:
        ident = {k: r["run"].get(k) for k in ("name", *IDENTITY)}
        grad = [None, *r.get("init", {}).get("grad_rel", [])]
        for metric, values in {**r["change"], "grad_rel_init": grad}.items():
            for layer, value in enumerate(values):
                rows.append({**ident, "metric": metric, "layer": layer, "depth": r["depth"][layer], "value": value})
    return pd.DataFrame(rows)

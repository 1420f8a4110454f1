"""Collect finished runs (results.json files) into tidy pandas tables, and account for the rest.

- `runs`: one row per run: identity (model, family, block_type, scale band, objective, control, seed, config
  and setting hashes), size, step-0 objective distance, final task metrics, whether it did not train
  (`locality.core.results.did_not_train`), and per metric the slope with its CI, the profile's level (mean change)
  and the relative slope (slope / level), slope per layer, steepness, width and width count.
- `layers`: one row per (run, metric, layer): the depth profile in long form.
- `dynamics`: one row per (run, metric, step) for runs that recorded the profile during training.
- `Inventory`: what was found besides complete runs: failed runs (failed.json), incomplete ones (a
  config.yaml and no results), and files that could not be read, each with its reason.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from locality.core.results import Results, ResultsError, did_not_train, layer_names, read_results
from locality.core.taxonomy import scale_band

# A run's identity. Runs that share a config_hash are replicates (they differ only in the seed); runs that
# share a setting_hash differ only in control and seed. Nothing is ever pooled across setting hashes.
IDENTITY = [
    "model",
    "family",
    "block_type",
    "scale_band",
    "objective",
    "control",
    "seed",
    "config_hash",
    "setting_hash",
]
PROFILE_STATS = ("slope_per_layer", "steepness", "width", "width_count")


@dataclass
class Inventory:
    results: list[Results] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {"run", "reason", "step"}
    incomplete: list[str] = field(default_factory=list)  # run dirs with a config and no results
    unreadable: list[dict] = field(default_factory=list)  # {"path", "reason"}


def _run_dirs(paths: list[str]) -> list[Path]:
    """Run directories (holding config.yaml, results.json or failed.json) under the given paths or globs."""
    found: set[Path] = set()
    for pattern in paths:
        for match in sorted(glob.glob(pattern, recursive=True)) or [pattern]:
            path = Path(match)
            if path.is_file():
                found.add(path.parent)
            elif path.is_dir():
                for marker in ("results.json", "config.yaml", "failed.json"):
                    found.update(p.parent for p in path.rglob(marker) if not _tool_dir(p.relative_to(path)))
    return sorted(found)


def _tool_dir(relative: Path) -> bool:
    """Files other tools keep inside a run directory (Hydra's .hydra/config.yaml, W&B's wandb/.../config.yaml)."""
    return any(part.startswith(".") or part == "wandb" for part in relative.parts[:-1])


def inventory(paths: list[str]) -> Inventory:
    """Every run directory under `paths`, sorted into complete, failed, incomplete and unreadable."""
    found = Inventory()
    for run_dir in _run_dirs(paths):
        results, failed = run_dir / "results.json", run_dir / "failed.json"
        if results.is_file():
            try:
                result = read_results(results)
            except (OSError, ResultsError) as err:
                found.unreadable.append({"path": str(results), "reason": f"{type(err).__name__}: {err}"})
                continue
            result["_path"] = str(run_dir)
            found.results.append(result)
        elif failed.is_file():
            try:
                info = json.loads(failed.read_text())
            except (OSError, ValueError) as err:
                info = {"reason": f"unreadable failed.json ({err})"}
            found.failed.append({"run": run_dir.name, "reason": info.get("reason"), "step": info.get("step")})
        elif (run_dir / "config.yaml").is_file():
            found.incomplete.append(run_dir.name)
    return found


def _identity(r: dict) -> dict:
    run = r["run"]
    ident = {k: run.get(k) for k in ("name", *IDENTITY)}
    # results written before run identities existed: one setting per run directory
    ident["config_hash"] = ident["config_hash"] or ident["name"]
    ident["setting_hash"] = ident["setting_hash"] or ident["config_hash"]
    if ident["scale_band"] is None and run.get("n_params"):
        ident["scale_band"] = scale_band(run["n_params"])
    return ident


def _slope_over_blocks(values) -> float | None:
    points = [(i / len(values), v) for i, v in enumerate(values, start=1) if v is not None]
    if len(points) < 2:
        return None
    x, y = (np.asarray(a, dtype=float) for a in zip(*points, strict=True))
    xc = x - x.mean()
    return float(xc @ (y - y.mean()) / (xc @ xc)) if xc @ xc > 0 else None


def _mean_change(values) -> float | None:
    """The profile's level: mean change over the depth points that have a value."""
    present = [v for v in values or [] if isinstance(v, int | float) and np.isfinite(v)]
    return float(np.mean(present)) if present else None


def _ratio(slope, level) -> float | None:
    """The slope in units of the profile's own level (scale-free: a profile scaled by 10 keeps it)."""
    if not isinstance(slope, int | float) or not level:
        return None
    return float(slope) / level


def runs_table(results: list[Results]) -> pd.DataFrame:
    rows = []
    for r in results:
        run = r["run"]
        row = {
            **_identity(r),
            **{k: run.get(k) for k in ("n_params", "n_layers", "steps", "wall_s", "init_from")},
            "data": (run.get("data") or {}).get("name"),
            "sweep": run.get("sweep"),
            "path": r.get("_path"),
        }
        init = r.get("init", {})
        row.update({f"init_{k}": v for k, v in init.items() if isinstance(v, int | float)})
        if "update_rel_slope" not in init and isinstance(init.get("update_rel"), list) and init["update_rel"]:
            first = init["update_rel"][0]  # the first optimizer step's per-block update ratios
            row["init_update_rel_slope"] = _slope_over_blocks(
                first if isinstance(first, list) else init["update_rel"]
            )
        row.update({f"final_{k}": v for k, v in r.get("final", {}).items() if isinstance(v, int | float)})
        reason = did_not_train(r)
        row["did_not_train"], row["did_not_train_reason"] = reason is not None, reason
        row["stopped_early"] = bool(run.get("stopped_early", False))
        for metric, stats in r.get("profile", {}).items():
            row[f"{metric}_slope"] = stats.get("slope")
            row[f"{metric}_level"] = _mean_change(r.get("change", {}).get(metric))
            row[f"{metric}_slope_relative"] = _ratio(stats.get("slope"), row[f"{metric}_level"])
            ci = stats.get("slope_ci") or [None, None]
            row[f"{metric}_slope_lo"], row[f"{metric}_slope_hi"] = ci
            for stat in PROFILE_STATS:
                row[f"{metric}_{stat}"] = stats.get(stat)
        rows.append(row)
    return pd.DataFrame(rows)


def layers_table(results: list[Results]) -> pd.DataFrame:
    rows = []
    for r in results:
        ident = _identity(r)
        names = r.get("layers") or layer_names(len(r["depth"]) - 1)
        grad = [None, *r.get("init", {}).get("grad_rel", [])]
        for metric, values in {**r["change"], "grad_rel_init": grad}.items():
            for layer, value in enumerate(values):
                rows.append(
                    {
                        **ident,
                        "metric": metric,
                        "layer": layer,
                        "layer_name": names[layer],
                        "depth": r["depth"][layer],
                        "value": value,
                    }
                )
    return pd.DataFrame(rows)


def dynamics_table(results: list[Results]) -> pd.DataFrame:
    rows = []
    for r in results:
        ident = _identity(r)
        for entry in r.get("dynamics") or []:
            for metric, slope in (entry.get("slope") or {}).items():
                rows.append({**ident, "metric": metric, "step": entry["step"], "slope": slope})
    return pd.DataFrame(rows, columns=["name", *IDENTITY, "metric", "step", "slope"])

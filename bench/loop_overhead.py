"""Loop overhead of the framework: `LocalityModule` under the framework's Trainer vs a plain PyTorch loop.

The framework side is built as `locality/train.py` builds it: the composed Hydra config (`conf/train.yaml`
plus the overrides below), the objective, AdamW with its decay groups, the warmup-decay schedule,
`LocalityModule`, and `locality.run.trainer.build_trainer` with the default callbacks (non-finite-loss stop, the
update-ratio monitor, checkpointing every `trainer.ckpt_every_n_steps`, the run-state callback, the progress
bar and logging cadence of `conf/trainer/default.yaml`, the CSV logger W&B falls back to when it is not
installed). The plain side is a deep copy of the same module, with the same weights, fed the same batches (a
second loader from the same data module: same order, same collate), trained with a hand-written loop: forward
to the loss, backward, `clip_grad_norm_` at the same value, AdamW with the same groups and settings, the same
schedule, `zero_grad`.

One process: inside the framework's fit, at every `--block`-th step a callback runs `--block` plain steps,
so machine noise hits both alike. A framework step is timed from one `on_train_batch_start` to the next (the
whole loop iteration: batch fetch, forward, backward, clipping, optimizer step, every callback, logging, the
progress bar); a plain step from fetching its batch to the end of `zero_grad`. Prints the median step time
of each over `--steps` timed steps after `--warmup` untimed ones, and their ratio.

On a GPU (overrides `trainer.accelerator=gpu trainer.precision=bf16-mixed ...`, as bench/gpu_suite.py gives),
the plain loop moves its copy and its batches to the device and runs its forward under the same bf16 autocast
as Lightning's bf16-mixed; both sides synchronize the device before reading the clock.

    python bench/loop_overhead.py                       # tiny_gpt2 (random init), clm, 16 x 128 tokens
    python bench/loop_overhead.py --steps 200 model=tiny_bert objective=cls

The median of step times leaves out work that comes every k steps (logging, checkpoints) and work around the
steps. `--outside` measures what a user's run costs instead, from outside the process: the wall time of
`python -m locality.train` (csv logger, the default checkpoint cadence, fault checks, update-ratio logging,
`measure=fast`, one thread) at --short and --long steps, and of a plain-loop process (`--plain-only N`: the same
parts from `assemble`, the same AdamW, clipping and schedule, nothing else) at the same step counts. The
marginal time per step is (T_long - T_short) / (long - short) for each; fixed costs (imports, loading, the
measurement before and after training) cancel. Runs alternate framework and plain, --repeats times; the
medians of the marginal times give the ratio.

    python bench/loop_overhead.py --outside             # 10 and 60 steps, 2 repeats
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from locality.backbones import no_cache  # noqa: E402
from locality.core.config import compose_train  # noqa: E402
from locality.data.datamodule import LocalityDataModule  # noqa: E402
from locality.run.assembly import assemble  # noqa: E402
from locality.run.loggers import RunInfo, csv_logger  # noqa: E402
from locality.run.module import LocalityModule  # noqa: E402
from locality.run.resume import RunState  # noqa: E402
from locality.run.rundir import RunDir  # noqa: E402
from locality.run.trainer import build_trainer  # noqa: E402
from locality.train import ratio_monitor  # noqa: E402

DEFAULT_OVERRIDES = ["model=tiny_gpt2", "model.init=random", "objective=clm", "control=standard"]


class PlainLoop:
    """The hand-written loop over a copy of the module: same weights, groups, optimizer, schedule, clipping.
    On a GPU: the copy and each batch on the device, the forward under the trainer's autocast (bf16-mixed)."""

    def __init__(self, module: LocalityModule, cfg, total_steps: int, loader, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.module = copy.deepcopy(module).to(self.device)  # before the trainer touches `module`
        self.model = self.module.model
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = module.optimizer_factory(self.module.param_groups())
        self.scheduler = module.scheduler_factory(self.optimizer, total_steps)
        self.clip = cfg.trainer.gradient_clip_val
        precision = str(cfg.trainer.precision)
        self.autocast = precision.endswith("-mixed") and self.device.type != "cpu"
        self.dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        self.loader = loader
        self.batches = iter(loader)
        self.module.train()

    def next_batch(self) -> dict:
        """The next batch; a new epoch (the loader's next permutation, as the framework's) after the last."""
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        if self.device.type == "cpu":
            return batch
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
        }

    def step(self) -> None:
        batch = self.next_batch()
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else contextlib.nullcontext()
        )
        with autocast:
            out = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                **no_cache(self.model),
            )
        out.loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        sync(self.device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so the clock measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Alternate(L.Callback):
    """Times every framework step (one `on_train_batch_start` to the next) and, at every block boundary, runs
    and times a block of plain steps in between (their time is left out of the framework step)."""

    def __init__(self, plain: PlainLoop, warmup: int, block: int, steps: int) -> None:
        self.plain, self.warmup, self.block, self.steps = plain, warmup, block, steps
        self.framework: list[float] = []
        self.framework_block: list[int] = []  # the plain block each framework step follows
        self.plain_times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(pl_module.device)
        now = time.perf_counter()
        step = trainer.global_step  # steps completed; the previous framework step is step - 1
        if self._last is not None and step - 1 >= self.warmup:
            self.framework.append(now - self._last)
            self.framework_block.append(len(self.plain_times) // self.block - 1)
        if step == 0:
            for _ in range(self.warmup):
                self.plain.step()
        elif (
            step >= self.warmup
            and (step - self.warmup) % self.block == 0
            and len(self.plain_times) < self.steps
        ):
            for _ in range(self.block):
                start = time.perf_counter()
                self.plain.step()
                self.plain_times.append(time.perf_counter() - start)
        self._last = time.perf_counter()


def measure(
    overrides: list[str] = (),
    steps: int = 120,
    warmup: int = 10,
    block: int = 10,
    device: str = "cpu",
    profile: str | None = None,
) -> dict:
    """One fit of the framework with plain blocks in between; the step times of each side and their ratio.
    `overrides` follow DEFAULT_OVERRIDES; on a GPU they must name its accelerator and precision."""
    blocks = -(-steps // block)
    total = warmup + blocks * block + 1  # the last framework step is not timed
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train(
            [
                *DEFAULT_OVERRIDES,
                *overrides,
                f"trainer.max_steps={total}",
                f"outputs_root={tmp}",
            ],
        )
        parts = assemble(cfg)
        splits, backbone, objective = parts.splits, parts.backbone, parts.objective

        def datamodule() -> LocalityDataModule:
            data = cfg.data
            return LocalityDataModule(
                splits, objective, data.batch_size, data.eval_batch_size, cfg.seed, data.num_workers
            )

        data = datamodule()
        module = LocalityModule(backbone, objective, instantiate(cfg.optim), instantiate(cfg.scheduler), [])
        plain = PlainLoop(module, cfg, total, datamodule().train_dataloader(), device)
        timer = Alternate(plain, warmup, block, blocks * block)
        run_dir = RunDir(Path(tmp) / "run")
        logger = csv_logger(RunInfo(run_dir, "bench", {}))
        callbacks = [*filter(None, [ratio_monitor(cfg.measure, [])]), RunState(), timer]
        trainer = build_trainer(cfg.trainer, run_dir, callbacks, logger)
        if profile:
            import cProfile

            cProfile.runctx("trainer.fit(module, datamodule=data)", globals(), locals(), profile)
        else:
            trainer.fit(module, datamodule=data)

    framework, plain_times = timer.framework, timer.plain_times
    ratio = statistics.median(framework) / statistics.median(plain_times)
    paired = statistics.median(  # each framework block against the plain block just before it
        statistics.median(t for t, b in zip(framework, timer.framework_block, strict=True) if b == i)
        / statistics.median(plain_times[i * block : (i + 1) * block])
        for i in sorted(set(timer.framework_block))
    )
    return {
        "config": [*DEFAULT_OVERRIDES, *overrides],
        "device": device,
        "batch_size": cfg.data.batch_size,
        "max_length": cfg.objective.max_length,
        "precision": str(cfg.trainer.precision),
        "log_every_n_steps": cfg.trainer.log_every_n_steps,
        "progress_bar": cfg.trainer.enable_progress_bar,
        "params": backbone.n_params,
        "threads": torch.get_num_threads(),
        "block": block,
        "warmup": warmup,
        "times": {"framework": framework, "plain": plain_times},
        "median_ms": {
            "framework": 1e3 * statistics.median(framework),
            "plain": 1e3 * statistics.median(plain_times),
        },
        "ratio": ratio,
        "paired_ratio": paired,
    }


def plain_only(overrides: list[str], steps: int) -> None:
    """`steps` plain-loop steps over the parts a run assembles (the other side of --outside)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train(
            [*DEFAULT_OVERRIDES, *overrides, f"trainer.max_steps={steps}", f"outputs_root={tmp}"]
        )
        parts = assemble(cfg)
        data = LocalityDataModule(
            parts.splits, parts.objective, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed, 0
        )
        module = LocalityModule(
            parts.backbone, parts.objective, instantiate(cfg.optim), instantiate(cfg.scheduler), []
        )
        plain = PlainLoop(module, cfg, steps, data.train_dataloader())
        for _ in range(steps):
            plain.step()


def outside(overrides: list[str], short: int, long: int, repeats: int) -> dict:
    """Marginal seconds per step of the framework's CLI run and of the plain loop, each from the wall time of
    whole processes at `short` and `long` steps (see the module docstring)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    run_overrides = [*DEFAULT_OVERRIDES, *overrides, "logger=csv", "measure=fast"]

    def wall(command: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True)
        return time.perf_counter() - started

    marginal: dict[str, list[float]] = {"framework": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            times = {}
            for steps in (short, long):
                framework = [sys.executable, "-m", "locality.train", *run_overrides]
                framework += [f"trainer.max_steps={steps}", f"outputs_root={tmp}/{repeat}-{steps}"]
                times["framework", steps] = wall(framework)
                plain = [sys.executable, __file__, "--plain-only", str(steps), *overrides]
                times["plain", steps] = wall(plain)
            for side in marginal:
                marginal[side].append((times[side, long] - times[side, short]) / (long - short))
    framework, plain = (statistics.median(marginal[side]) for side in ("framework", "plain"))
    return {
        "marginal_s": marginal,
        "framework_ms": 1e3 * framework,
        "plain_ms": 1e3 * plain,
        "ratio": framework / plain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="timed steps per side (>= 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per side first")
    parser.add_argument("--block", type=int, default=10, help="steps per alternating block")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides after the defaults " + str(DEFAULT_OVERRIDES)
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a busy machine)"
    )
    parser.add_argument(
        "--profile", help="write a cProfile of the fit (framework and plain steps) to this file"
    )
    parser.add_argument(
        "--every-step-metrics",
        action="store_true",
        help="compute the training metrics on every step, not only on logged ones (the framework before 2026-12)",
    )
    parser.add_argument(
        "--outside", action="store_true", help="marginal step time of whole processes (above)"
    )
    parser.add_argument("--short", type=int, default=10, help="--outside: steps of the short runs")
    parser.add_argument("--long", type=int, default=60, help="--outside: steps of the long runs")
    parser.add_argument("--repeats", type=int, default=2, help="--outside: runs of each kind and length")
    parser.add_argument("--plain-only", type=int, metavar="N", help="run N plain-loop steps and exit")
    args = parser.parse_args()
    if args.plain_only:
        torch.set_num_threads(1)
        plain_only(args.overrides, args.plain_only)
        return
    if args.outside:
        r = outside(args.overrides, args.short, args.long, args.repeats)
        print(
            f"loop overhead from outside the process | torch {torch.__version__} | lightning {L.__version__}"
        )
        print(
            f"config: {' '.join([*DEFAULT_OVERRIDES, *args.overrides])}, logger=csv, measure=fast, 1 thread"
        )
        for side in ("framework", "plain"):
            each = ", ".join(f"{1e3 * v:.1f}" for v in r["marginal_s"][side])
            print(f"  {side:<9} marginal {r[side + '_ms']:8.1f} ms/step (each repeat: {each})")
        print(
            f"marginal step-time ratio framework / plain ({args.long} vs {args.short} steps): {r['ratio']:.3f}"
        )
        return
    if args.every_step_metrics:
        LocalityModule._train_metrics_wanted = lambda self: True
    torch.set_num_threads(args.threads)

    r = measure(args.overrides, args.steps, args.warmup, args.block, profile=args.profile)
    framework, plain_times = r["times"]["framework"], r["times"]["plain"]
    print(f"\nloop overhead | torch {torch.__version__} | lightning {L.__version__} | ", end="")
    print(f"{r['threads']} threads | python {sys.version.split()[0]}")
    print(f"config: {' '.join(r['config'])}; batch {r['batch_size']}, ", end="")
    print(f"max_length {r['max_length']}, precision {r['precision']}, ", end="")
    print(f"log_every_n_steps {r['log_every_n_steps']}, progress bar {r['progress_bar']}")
    print(f"params: {r['params'] / 1e6:.2f} M; ", end="")
    print(f"timed steps: {len(framework)} framework, {len(plain_times)} plain ", end="")
    print(f"(alternating blocks of {args.block}, after {args.warmup} warm-up steps each)")
    for name, times in (("framework", framework), ("plain", plain_times)):
        q = statistics.quantiles(times, n=4)
        print(f"  {name:<9} median {1e3 * statistics.median(times):8.2f} ms  ", end="")
        print(f"(p25 {1e3 * q[0]:.2f}, p75 {1e3 * q[2]:.2f}, mean {1e3 * statistics.fmean(times):.2f})")
    if args.every_step_metrics:
        print("training metrics computed on every step (--every-step-metrics)")
    print(f"step-time ratio framework / plain (medians): {r['ratio']:.4f}")
    print(
        f"  median over blocks of the block-median ratio (robust to drifting load): {r['paired_ratio']:.4f}"
    )


if __name__ == "__main__":
    main()

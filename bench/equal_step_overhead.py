"""Overhead of the equal-step control: full Lightning training steps, standard vs equal_step.

One process, one model, one data stream: after a warm-up of each mode, blocks of steps alternate
between the control switched off (`EqualStep.enabled = False`: the standard step) and on, so machine
noise hits both modes alike. A step is timed from `on_train_batch_start` to the end of
`on_train_batch_end` (forward, backward, clipping, optimizer step with the control's hooks, the
control's logging): what a user pays per step. Prints the median step time of each mode, their ratio,
and the memory overhead (analytical snapshot size; measured peak RSS on CPU or peak allocated memory on
CUDA, standard warm-up vs equal-step warm-up).

    python bench/equal_step_overhead.py --device cpu --preset tiny --steps 100
    python bench/equal_step_overhead.py --device cuda --preset gpt2-124m --steps 200
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from locality.controls import EqualStep

PRESETS = {  # tiny: the project's tiny backbones use a 4096-token BPE vocabulary
    "tiny": dict(
        n_layer=4, n_embd=128, n_head=4, vocab_size=4096, batch_size=8, seq_len=128, precision="32-true"
    ),
    "gpt2-124m": dict(
        n_layer=12,
        n_embd=768,
        n_head=12,
        vocab_size=50257,
        batch_size=16,
        seq_len=512,
        precision="bf16-mixed",
    ),
}


class GPT2Module(L.LightningModule):
    """A GPT-2 built from its config (no download), exposing `.blocks` and `.parts` like LocalityModule."""

    def __init__(self, n_layer: int, n_embd: int, n_head: int, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        config = GPT2Config(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            vocab_size=vocab_size,
            n_positions=seq_len,
            bos_token_id=vocab_size - 1,
            eos_token_id=vocab_size - 1,
        )
        self.model = GPT2LMHeadModel(config)
        self.blocks = self.model.transformer.h
        self.parts = {
            "embeddings": self.model.transformer.wte,
            "final_norm": self.model.transformer.ln_f,
            "head": self.model.lm_head,
        }

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class NullLogger(Logger):
    """Accepts metrics and drops them: logging runs in both modes without touching the disk."""

    name, version = "null", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class Alternate(L.Callback):
    """Switches the control per block of steps and times every step; must be the last callback."""

    def __init__(self, control: EqualStep, warmup: int, block: int, device: str) -> None:
        self.control, self.warmup, self.block, self.cuda = control, warmup, block, device == "cuda"
        self.times: dict[bool, list[float]] = {False: [], True: []}
        self.peak: dict[bool, int] = {}

    def mode(self, step: int) -> tuple[bool, bool]:
        """(control on?, timed?) for a global step: warm-up standard, warm-up control, then alternate."""
        if step < 2 * self.warmup:
            return step >= self.warmup, False
        return (step - 2 * self.warmup) // self.block % 2 == 1, True

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _peak(self) -> int:
        """Peak memory so far: allocated by torch on CUDA (reset per phase); resident set on CPU."""
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        self.control.enabled, _ = self.mode(step)
        if step == self.warmup:  # end of the standard warm-up
            self.peak[False] = self._peak()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
        self._sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._sync()
        elapsed = time.perf_counter() - self.start
        on, timed = self.mode(trainer.global_step - 1)
        if timed:
            self.times[on].append(elapsed)
        if trainer.global_step == 2 * self.warmup:  # end of the equal-step warm-up
            self.peak[True] = self._peak()


def measure(
    device: str = "cpu",
    preset: str = "tiny",
    steps: int = 100,
    warmup: int = 10,
    block: int = 10,
    batch_size: int | None = None,
    seq_len: int | None = None,
    **arch_overrides: int,
) -> dict:
    """One alternating fit, standard vs equal_step; the step times, their ratio and the memory overhead.
    `arch_overrides` (n_layer, n_embd, n_head, vocab_size) change the preset's shape (bench/gpu_suite.py's dry
    run shrinks it)."""
    spec = PRESETS[preset]
    arch = {k: arch_overrides.get(k, spec[k]) for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
    batch_size, seq_len = batch_size or spec["batch_size"], seq_len or spec["seq_len"]
    precision = spec["precision"] if device == "cuda" else "32-true"  # no fast bf16 on CPU

    L.seed_everything(0, verbose=False)
    module = GPT2Module(**arch, seq_len=seq_len)
    blocks_per_mode = -(-steps // block)
    total = 2 * warmup + 2 * blocks_per_mode * block
    tokens = torch.randint(module.model.config.vocab_size, (total * batch_size, seq_len))
    loader = DataLoader(TensorDataset(tokens), batch_size=batch_size, pin_memory=device == "cuda")

    control = EqualStep()
    timer = Alternate(control, warmup, block, device)
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=total,
        callbacks=[control, timer],
        logger=NullLogger(),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,  # Lightning's default: the control logs (one host copy) every 50 steps
    )
    trainer.fit(module, loader)

    std, eq = (statistics.median(timer.times[on]) for on in (False, True))
    return {
        "device": device,
        "preset": preset,
        "arch": arch,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "params_total": sum(p.numel() for p in module.parameters()),
        "params_blocks": sum(p.numel() for p in module.blocks.parameters()),
        "n_blocks": len(module.blocks),
        "block": block,
        "warmup": warmup,
        "times": {"standard": timer.times[False], "equal_step": timer.times[True]},
        "median_ms": {"standard": 1e3 * std, "equal_step": 1e3 * eq},
        "ratio": eq / std,
        "snapshot_bytes": control.core.snapshot_bytes,
        "memory_delta_bytes": timer.peak[True] - timer.peak[False],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per mode (>= 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per mode before timing")
    parser.add_argument("--block", type=int, default=10, help="steps per alternating block")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    r = measure(args.device, args.preset, args.steps, args.warmup, args.block, args.batch_size, args.seq_len)
    unit = "peak allocated (CUDA)" if args.device == "cuda" else "peak RSS"
    print(
        f"equal_step overhead | torch {torch.__version__} | lightning {L.__version__} | {args.device} | ",
        end="",
    )
    print(f"{r['threads']} threads")
    print(
        f"preset {args.preset}: {r['arch']}, batch {r['batch_size']}x{r['seq_len']}, precision {r['precision']}"
    )
    print(
        f"params: {r['params_total'] / 1e6:.2f} M total, {r['params_blocks'] / 1e6:.2f} M in {r['n_blocks']} blocks"
    )
    times = r["times"]
    print(
        f"timed steps per mode: {len(times['standard'])} standard, {len(times['equal_step'])} equal_step ",
        end="",
    )
    print(f"(alternating blocks of {args.block}, after {args.warmup} warm-up steps each)")
    for name in ("standard", "equal_step"):
        q = statistics.quantiles(times[name], n=4)
        print(f"  {name:<10} median {r['median_ms'][name]:8.2f} ms  ", end="")
        print(f"(p25 {1e3 * q[0]:.2f}, p75 {1e3 * q[2]:.2f})")
    print(f"step-time ratio equal_step / standard: {r['ratio']:.4f}")
    print(f"memory: snapshot buffers {r['snapshot_bytes'] / 2**20:.2f} MiB (analytical); ", end="")
    print(f"{unit} delta {r['memory_delta_bytes'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()

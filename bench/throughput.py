"""Training throughput of the framework: tokens/s and MFU for GPT-2-shaped models, standard vs equal-step, with
and without `torch.compile` of the blocks.

Each configuration is a `LocalityModule` under the framework's Trainer (`locality.run.trainer.build_trainer`, the
default callbacks), built from the composed Hydra config as `locality/train.py` builds it, with random weights
(`model=tiny_gpt2 model.init=random` plus `model.config_overrides` for the size, GPT-2's 50,257-row vocabulary
included, so the 124M and 355M shapes have GPT-2's parameter counts; the tiny size keeps the tiny preset's
4,096 tokens). Every batch is `--batch-size` full-length rows of
`--seq-len` random token ids (no padding: the offline corpus's docstrings are shorter than a GPU's sequence,
242 tokens at most per row of 16 at max_length 512, 34% of them padding); `--corpus` trains on the run's own
batches instead. A callback times every optimizer step after `--warmup` steps and counts the positions of
each timed batch; tokens/s = median positions per step / median step time. MFU = achieved FLOP/s / the GPU's dense bf16
peak, with FLOPs per token = 6 N + 12 L d T (PaLM's estimate: N parameters, L layers, d width, T sequence
length). On a GPU: bf16-mixed, SDPA attention, fused AdamW, TF32 matmuls. On a CPU (no peak, float32) it runs
the tiny size as a check that the script works; its numbers are not the benchmark.

    python bench/throughput.py                      # GPU: 124m and 355m; CPU: tiny
    python bench/throughput.py --sizes 355m --steps 30
    python bench/throughput.py --sizes smollm2 --no-compile   # the real 30-block decoder (CPU: 2 threads)
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from locality.core.config import compose_train  # noqa: E402
from locality.core.quiet import quiet_libraries  # noqa: E402
from locality.data.datamodule import LocalityDataModule  # noqa: E402
from locality.run.assembly import assemble  # noqa: E402
from locality.run.checks import preflight, validate  # noqa: E402
from locality.run.module import LocalityModule  # noqa: E402
from locality.run.rundir import RunDir  # noqa: E402
from locality.run.trainer import build_trainer  # noqa: E402
from locality.train import ratio_monitor  # noqa: E402

SIZES = {  # GPT-2 shapes: layers, width, heads (and GPT-2's vocabulary)
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "124m": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
    "355m": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257},
}
PRESETS = {"smollm2": ["model=smollm2"]}  # real pretrained presets, measured as they are
# dense bf16 FLOP/s by a substring of torch.cuda.get_device_name(), first match wins (the PCIe and NVL H100s
# before the SXM one, whose name is "NVIDIA H100 80GB HBM3"); NVIDIA's data sheets, without sparsity
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
}
GPU_OVERRIDES = [  # what a GPU run of these benchmarks sets
    "trainer.accelerator=gpu",
    "trainer.precision=bf16-mixed",
    "trainer.deterministic=false",
    "trainer.matmul_precision=high",
    "optim.fused=true",
    "model.attn_implementation=sdpa",
]


class StepTimer(L.Callback):
    """Times every optimizer step after `warmup` (one batch end to the next) and counts its batch's positions."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.positions, self._last = warmup, [], [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None and trainer.global_step > self.warmup:
            self.times.append(now - self._last)
            self.positions.append(batch["input_ids"].numel())
        self._last = now


class FullLength(Dataset):
    """`length` rows of `seq_len` random token ids below `vocab`, every position real (clm's batch keys)."""

    def __init__(self, vocab: int, seq_len: int, length: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(vocab, (length, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def peak_flops(name: str | None = None) -> float | None:
    """The dense bf16 peak of the GPU named `name` (default: this process's GPU), None when unknown."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def overrides_for(size: str, control: str, args, gpu: bool) -> list[str]:
    """The Hydra overrides of one configuration (`measure` adds the output root)."""
    model = PRESETS.get(size) or [
        "model=tiny_gpt2",
        "model.init=random",
        *[f"++model.config_overrides.{k}={v}" for k, v in SIZES[size].items()],
        f"++model.config_overrides.n_positions={max(args.seq_len, 128)}",
    ]
    return [
        *model,
        "objective=clm",
        f"objective.max_length={args.seq_len}",
        f"control={control}",
        "logger=none",
        f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={args.warmup + args.steps + 1}",
        "trainer.enable_progress_bar=false",
        "trainer.check_val_every_n_epoch=null",
        f"trainer.ckpt_every_n_steps={10**6}",
        *(GPU_OVERRIDES if gpu else ["trainer.accelerator=cpu"]),
        *args.overrides,
    ]


def measure(size: str, control: str, compiled: bool | str, args, gpu: bool | None = None) -> dict:
    """One fit of `size` (a GPT-2 shape of SIZES or a preset of PRESETS); `args` holds seq_len, batch_size,
    warmup, steps and more Hydra overrides. `gpu`: on the GPU (default: when there is one) or the CPU.
    `compiled`: trainer.compile's value (True = inductor, or a backend name)."""
    gpu = torch.cuda.is_available() if gpu is None else gpu
    overrides = overrides_for(size, control, args, gpu)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate(compose_train([*overrides, f"outputs_root={tmp}"]))
        controls = preflight(cfg).controls
        parts = assemble(cfg)
        data = LocalityDataModule(
            parts.splits, parts.objective, args.batch_size, args.batch_size, cfg.seed, 0
        )
        module = LocalityModule(
            parts.backbone,
            parts.objective,
            instantiate(cfg.optim),
            instantiate(cfg.scheduler),
            controls,
            compile=compiled,  # trainer.compile: each block's forward
        )
        timer = StepTimer(args.warmup)
        callbacks = [*controls, *filter(None, [ratio_monitor(cfg.measure, controls)]), timer]
        trainer = build_trainer(cfg.trainer, RunDir(tmp), callbacks, False)
        if getattr(args, "corpus", False):
            trainer.fit(module, datamodule=data)
        else:
            vocab = parts.backbone.model.get_input_embeddings().num_embeddings
            rows = FullLength(vocab, args.seq_len, cfg.trainer.max_steps * args.batch_size, cfg.seed)
            loader = DataLoader(rows, batch_size=args.batch_size, shuffle=False, pin_memory=gpu)
            trainer.fit(module, train_dataloaders=loader)
    n_params = parts.backbone.n_params
    step_s = statistics.median(timer.times)
    tokens = statistics.median(timer.positions)  # positions computed per step, padding included (--corpus)
    n_layer, width = parts.backbone.n_layers, parts.backbone.hidden_size
    flops_per_token = 6 * n_params + 12 * n_layer * width * tokens / args.batch_size
    peak = peak_flops() if gpu else None
    return {
        "size": size,
        "control": control,
        "compile": compiled,
        "params_M": n_params / 1e6,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens / step_s,
        "mfu": flops_per_token * tokens / step_s / peak if peak else None,
        "n_layers": n_layer,
        "hidden_size": width,
        "tokens_per_step": tokens,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # so far in this process
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    gpu = torch.cuda.is_available()
    parser.add_argument(
        "--sizes", nargs="+", default=["124m", "355m"] if gpu else ["tiny"], choices=[*SIZES, *PRESETS]
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the trainer.compile rows")
    parser.add_argument("--batch-size", type=int, default=16 if gpu else 4)
    parser.add_argument("--seq-len", type=int, default=1024 if gpu else 64)
    parser.add_argument("--warmup", type=int, default=10 if gpu else 2)
    parser.add_argument("--steps", type=int, default=40 if gpu else 5)
    parser.add_argument(
        "--corpus", action="store_true", help="train on the run's own (padded) batches, not full-length ones"
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = parser.parse_args()
    quiet_libraries()
    device = torch.cuda.get_device_name() if gpu else "CPU (a check of the script, not the benchmark)"
    rows = "the run's own batches, padded to their longest row" if args.corpus else "full-length random ids"
    print(
        f"device: {device}; batch {args.batch_size} x {args.seq_len} tokens ({rows}); median of {args.steps} steps"
    )
    print(
        f"{'size':<8}{'control':<12}{'compile':<9}{'params M':>9}{'step ms':>10}{'tokens/s':>11}{'MFU':>7}"
        f"{'peak RSS GB':>13}"
    )
    rows = {}
    compile_modes = (False,) if args.no_compile else (False, True)
    for size in args.sizes:
        for compiled in compile_modes:
            for control in ("standard", "equal_step"):
                r = rows[size, control, compiled] = measure(size, control, compiled, args)
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
                print(
                    f"{size:<8}{control:<12}{compiled!s:<9}{r['params_M']:>9.1f}{r['step_ms']:>10.1f}"
                    f"{r['tokens_per_s']:>11.0f}{mfu:>7}{r['peak_rss_gb']:>13.2f}"
                )
        for compiled in compile_modes:
            ratio = (
                rows[size, "equal_step", compiled]["step_ms"] / rows[size, "standard", compiled]["step_ms"]
            )
            print(f"{size}: equal-step / standard step time (compile={compiled}): {ratio:.3f}")


if __name__ == "__main__":
    main()

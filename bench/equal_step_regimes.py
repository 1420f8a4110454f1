"""How equal the equal-step control's steps really are, per regime, read back from the stored weights.

A GPT-2 shaped model (4 blocks, width 128, random weights: the spreads depend on dtypes and shapes, not on
what the weights learnt) takes AdamW steps on random tokens. For every step it prints nothing; at the end,
per regime, the median and largest max/min spread across blocks of ||W_new - W_old|| / ||W_old||:

- float32 parameters with the control: what `ratio_after` re-measures;
- bfloat16 parameters with the control: what rounding leaves of the rescale (why `EqualStep` refuses them);
- bfloat16 parameters, the old bookkeeping: `before x scale`, what the logs used to claim;
- LoRA (rank 8 on every linear layer), without control and with the adapters equalized: the spread of the
  adapters' own ratios and of the effective weights W0 + s*BA (`MergedLoRARatios`); equalizing the adapters
  does not equalize the effective weights, the reason lora+equal_step is refused.

    python bench/equal_step_regimes.py --steps 20
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from locality.controls.lora_ratios import MergedLoRARatios
from locality.controls.update_core import EqualStepCore, spread


def model(dtype: torch.dtype, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=4, n_embd=128, n_head=4, vocab_size=4096, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).to(dtype)


def step(net: GPT2LMHeadModel, opt: torch.optim.Optimizer, generator: torch.Generator) -> None:
    tokens = torch.randint(0, 4096, (8, 64), generator=generator)
    opt.zero_grad()
    net(input_ids=tokens, labels=tokens).loss.float().backward()
    opt.step()


def equalized(dtype: torch.dtype, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(re-measured after spreads, the spreads logged before: before x (target / before) = the target)."""
    net = model(dtype)
    blocks = list(net.transformer.h)
    core = EqualStepCore([list(b.parameters()) for b in blocks], target="mean")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    core.attach(opt)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        step(net, opt, generator)
    history = core.history
    claimed = torch.where(history[:, 0] > 0, history[:, 0].mean(-1, keepdim=True), 0.0)
    return spread(history[:, 1]), spread(claimed)


def lora(steps: int, target: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapter ratios' spreads, merged ratios' spreads) per step; `target` equalizes the adapters' ratios."""
    from peft import LoraConfig, inject_adapter_in_model

    net = model(torch.float32)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]), net)
    for name, p in net.named_parameters():
        p.requires_grad = "lora_" in name
    blocks = list(net.transformer.h)
    adapters = EqualStepCore([[p for p in b.parameters() if p.requires_grad] for b in blocks], target=target)
    merged = MergedLoRARatios(blocks, [f"block_{i:02d}" for i in range(len(blocks))])
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    adapters.attach(opt)
    merged.attach(opt)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        step(net, opt, generator)
    column = 0 if target is None else 1  # the adapters' ratios as the optimizer left them, or as equalized
    return spread(adapters.history[1:, column]), spread(
        merged.history[1:, 0]
    )  # step 1: B = 0, no merged change


def describe(name: str, spreads: torch.Tensor) -> None:
    print(f"{name:58s} median {spreads.median().item():.6f}   max {spreads.max().item():.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"max/min spread of ||dW_l||/||W_l|| across 4 blocks, {args.steps} AdamW steps (lr 1e-3)")
    after32, _ = equalized(torch.float32, args.steps)
    describe("float32 + equal_step, re-measured from stored weights", after32)
    after16, claimed16 = equalized(torch.bfloat16, args.steps)
    describe("bfloat16 + equal_step, re-measured from stored weights", after16)
    describe("bfloat16 + equal_step, as logged before (before x scale)", claimed16)
    adapters, merged = lora(args.steps)
    describe("LoRA r=8, no control: adapter matrices' own ratios", adapters)
    describe("LoRA r=8, no control: effective weights W0 + s*BA", merged)
    adapters, merged = lora(args.steps, target="mean")
    describe("LoRA r=8, adapters equalized: adapter matrices' ratios", adapters)
    describe("LoRA r=8, adapters equalized: effective weights W0 + s*BA", merged)


if __name__ == "__main__":
    main()

"""The empirical NTK of a `LocalityModule` over its objective's outputs, split by block: `ntk_profile`.

Used by `python -m locality.ntk` (locality/ntk.py, which documents the outputs, the parameter sets and the
block selection) and by training runs with `measure.ntk=true` (before any update, on the pretrained weights).
The kernel itself is `locality.measure.ntk` (pure torch).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from torch.func import functional_call

from locality.core.config import NTK_PARAMS
from locality.core.errors import UserError
from locality.measure.ntk import (
    DEFAULT_BUDGET,
    group_contributions,
    kernel_summary,
    ntk_by_group,
    select_groups,
)

PARAMS = NTK_PARAMS  # the rule of measure.ntk_params and ntk.params states them (locality.core.config)


class ObjectiveOutputs(nn.Module):
    """The objective's per-example outputs [N, O] (see the module docstring), as one module for
    `torch.func.functional_call`: its parameters are `model.*` and `objective.*`."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from locality.backbones import no_cache
        from locality.objectives.base import IGNORE, NewHead
        from locality.objectives.clm import CausalLM
        from locality.objectives.cls import SequenceClassification

        ids, mask, objective = batch["input_ids"], batch["attention_mask"], self.objective
        if isinstance(objective, NewHead):  # the objective's own forward of its head (cls, tok)
            logits = objective.logits(self.model, batch)
            if isinstance(objective, SequenceClassification):
                return logits
            labels = batch["labels"]
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, **no_cache(self.model)).logits
            labels = batch["labels"]
            if isinstance(objective, CausalLM):
                logits, labels = logits[:, :-1], labels[:, 1:]
        scored = labels != IGNORE
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return ((logp * scored).sum(1) / scored.sum(1).clamp(min=1)).unsqueeze(1)


def output_kind(objective) -> str:
    from locality.objectives.cls import SequenceClassification

    if isinstance(objective, SequenceClassification):
        return "class logits"
    return "mean target-token log-probability"


def parameter_groups(module, params: str = "all") -> dict[str, list[str]]:
    """Names (in `ObjectiveOutputs`) of the kernel's parameters, by block (block_00, ...) and other part."""
    if params not in PARAMS:
        raise UserError(f"ntk.params={params!r} is not a valid choice; choose one of: {', '.join(PARAMS)}.")
    owner = {}
    for i, block in enumerate(module.blocks):
        for p in block.parameters():
            owner.setdefault(id(p), f"block_{i:02d}")
    for part, sub in module.parts.items():
        for p in sub.parameters():
            owner.setdefault(id(p), part)
    wrapper = ObjectiveOutputs(module.model, module.objective)
    groups: dict[str, list[str]] = {}
    for name, p in wrapper.named_parameters():
        group = owner.get(id(p), "other")
        keep = p.requires_grad and group != "unused"
        if params == "blocks":
            keep = keep and group.startswith("block_")
        elif params == "lora":
            keep = keep and "lora_" in name
        if keep:
            groups.setdefault(group, []).append(name)
    if not groups:
        need = " (add control=lora)" if params == "lora" else ""
        raise UserError(f"ntk.params={params}: no trainable parameter matches{need}.")
    return groups


@contextlib.contextmanager
def evaluation(model: nn.Module, *modules: nn.Module):
    """Eval mode and eager attention for the duration; both restored afterwards."""
    from locality.controls.linearized import use_eager_attention

    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    modes = [(m, m.training) for m in (model, *modules)]
    use_eager_attention(model)
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)
        if attention not in (None, "eager"):
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(attention)
            else:
                config._attn_implementation = attention


def ntk_profile(
    module,
    batch: dict[str, torch.Tensor] | list[dict],
    params: str = "all",
    select: int = 0,
    method: str = "auto",
    memory_budget: int = DEFAULT_BUDGET,
    example_chunk: int = 1,
) -> dict:
    """The kernel over `module`'s objective outputs on one batch (a collated batch or raw examples), split
    by block; a plain dict for results.json. `module`: a LocalityModule (model, objective, blocks, parts)."""
    started = time.perf_counter()
    if isinstance(batch, list):
        batch = module.objective.collate(batch)
    device = next(module.model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    groups = parameter_groups(module, params)
    wrapper = ObjectiveOutputs(module.model, module.objective)
    values = {name: p.detach() for name, p in wrapper.named_parameters()}

    def fn(p, inputs):
        return functional_call(wrapper, p, (inputs,))

    used: dict[str, str] = {}
    with evaluation(module.model, module.objective):
        kernels = ntk_by_group(
            fn,
            values,
            batch,
            groups,
            method=method,
            memory_budget=memory_budget,
            example_chunk=example_chunk,
            methods_used=used,
        )
    total = sum(kernels.values())
    parts = group_contributions(kernels)
    layers = [f"block_{i:02d}" for i in range(len(module.blocks))]
    n, _, n_outputs, _ = total.shape
    result = {
        "params": params,
        "n_examples": n,
        "n_outputs": n_outputs,
        "outputs": output_kind(module.objective),
        "n_kernel_params": sum(values[name].numel() for names in groups.values() for name in names),
        **kernel_summary(total),
        "layers": layers,
        **{
            f"block_{key}": [parts[layer][key] if layer in parts else None for layer in layers]
            for key in ("trace", "trace_share", "lambda_min", "lambda_min_gain")
        },
        "parts": {name: c for name, c in parts.items() if not name.startswith("block_")},
        "methods": used,
    }
    if select:
        blocks = {name: kernels[name] for name in layers if name in kernels}
        others = [k for name, k in kernels.items() if name not in blocks]
        chosen = select_groups(blocks, select, sum(others) if others else None)
        result["select"] = {
            "layers": sorted(int(name.removeprefix("block_")) for name, _ in chosen),
            "order": [name for name, _ in chosen],
            "lambda_min_after": [value for _, value in chosen],
        }
    result["wall_s"] = time.perf_counter() - started
    return result


def format_summary(result: dict) -> str:
    lines = [
        f"NTK at initialization: {result['n_examples']} examples x {result['n_outputs']} outputs "
        f"({result['outputs']}), params={result['params']} ({result['n_kernel_params']:,} parameters)",
        f"  trace {result['trace']:.4g}  lambda_max {result['lambda_max']:.4g}  "
        f"lambda_min {result['lambda_min']:.4g}  condition number {result['condition_number']:.4g}",
        f"  {'layer':<12}{'trace':>12}{'share':>9}{'lambda_min':>13}{'lmin gain':>13}",
    ]
    rows = [(layer, i) for i, layer in enumerate(result["layers"])]
    for layer, i in rows:
        if result["block_trace"][i] is None:
            continue
        lines.append(
            f"  {layer:<12}{result['block_trace'][i]:>12.4g}{result['block_trace_share'][i]:>9.3f}"
            f"{result['block_lambda_min'][i]:>13.4g}{result['block_lambda_min_gain'][i]:>13.4g}"
        )
    for name, c in result["parts"].items():
        lines.append(
            f"  {name:<12}{c['trace']:>12.4g}{c['trace_share']:>9.3f}{c['lambda_min']:>13.4g}"
            f"{c['lambda_min_gain']:>13.4g}"
        )
    if "select" in result:
        lines.append(
            f"  selected (greedy lambda_min): control.lora.layers=[{','.join(map(str, result['select']['layers']))}]"
        )
    return "\n".join(lines)

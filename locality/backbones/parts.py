"""Classify the parameter-owning modules outside the blocks (embeddings, final norm, interleaved, unused) by
where one tiny forward pass runs them."""

from __future__ import annotations

import warnings

import torch
from torch import nn

PART_ORDER = ("embeddings", "final_norm", "interleaved", "unused")


def classify_parts(base: nn.Module, blocks: nn.ModuleList) -> dict[str, list[str]]:
    """Sort the parameter-owning modules of `base` outside `blocks` by what its forward does with them.

    One forward pass of two 4-token sequences (eval mode; parameters are not changed, no gradient is
    stored) with hooks on those modules and on the first and last block, then a walk of the autograd
    graph of the last hidden state (what every objective reads, `base(...)[0]`):

    - `unused`: no parameter of the module reaches the last hidden state (BERT's pooler, whose output no
      objective reads), or the module never runs;
    - `embeddings`: first runs before block 0 (BERT's `embeddings.LayerNorm` too, whatever its name);
    - `final_norm`: first runs after the last block (GPT-2's `ln_f`, OPT's `final_layer_norm`, ...);
    - `interleaved`: runs between the first and the last block without being part of one (rare).

    A used module whose parameters are read without calling it has no position; it is placed by the
    name rule below, as is everything when the probe cannot run (an exotic forward), with a warning.
    """
    block_ids = {id(m) for block in blocks for m in block.modules()}
    candidates = {
        name: module
        for name, module in base.named_modules()
        if id(module) not in block_ids and any(True for _ in module.parameters(recurse=False))
    }
    try:
        first_call, start, end, reached = _probe_forward(base, blocks, candidates)
    except Exception as err:  # any failure of a foreign forward: fall back to names
        warnings.warn(
            f"Could not run a probe forward of {type(base).__name__} ({type(err).__name__}: {err}); "
            "its non-block parts are classified by module names instead.",
            stacklevel=2,
        )
        return _sorted_parts({name: _part_by_name(name, module) for name, module in candidates.items()})
    found = {}
    for name, module in candidates.items():
        if not any(id(p) in reached for p in module.parameters(recurse=False)):
            found[name] = "unused"
        elif name not in first_call:
            found[name] = _part_by_name(name, module)
        elif first_call[name] < start:
            found[name] = "embeddings"
        elif first_call[name] > end:
            found[name] = "final_norm"
        else:
            found[name] = "interleaved"
    return _sorted_parts(found)


def _probe_forward(base: nn.Module, blocks: nn.ModuleList, candidates: dict[str, nn.Module]):
    """(first call index per candidate name, block 0's start index, last block's end index, ids of the
    parameters the last hidden state depends on)."""
    device = next(base.parameters()).device
    vocab = base.get_input_embeddings().num_embeddings
    input_ids = (
        torch.arange(1, 5, device=device).repeat(2, 1) + torch.tensor([[0], [4]], device=device)
    ) % vocab
    config = getattr(base, "config", None)
    use_cache = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
    params = [p for m in candidates.values() for p in m.parameters(recurse=False)]
    grad_flags = [p.requires_grad for p in params]
    modes = {m: m.training for m in base.modules()}
    events: list[str] = []
    first_call: dict[str, int] = {}

    def record(name: str):
        def hook(*_):
            first_call.setdefault(name, len(events))
            events.append(name)

        return hook

    handles = [
        blocks[0].register_forward_pre_hook(record("<start>")),
        blocks[-1].register_forward_hook(record("<end>")),
    ]
    try:
        handles += [module.register_forward_pre_hook(record(name)) for name, module in candidates.items()]
        for p in params:
            p.requires_grad_(True)  # so their use shows in the graph even when frozen
        base.eval()
        with torch.enable_grad():
            hidden = base(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **use_cache)[0]
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, grad_flags, strict=True):
            p.requires_grad_(flag)
        for m, training in modes.items():
            m.training = training
    if "<start>" not in events or "<end>" not in events:
        raise RuntimeError("its blocks did not run as modules")
    if hidden.grad_fn is None:
        raise RuntimeError("its output has no autograd graph (inference mode?)")
    end = len(events) - 1 - events[::-1].index("<end>")
    return first_call, first_call["<start>"], end, _graph_leaves(hidden)


def _graph_leaves(tensor: torch.Tensor) -> set[int]:
    """Ids of the leaf tensors (parameters) the autograd graph of `tensor` reaches (no backward is run)."""
    leaves, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _part_by_name(name: str, module: nn.Module) -> str:
    """The fallback rule: embedding modules (by type or name) are `embeddings`, the rest `final_norm`."""
    return "embeddings" if isinstance(module, nn.Embedding) or "emb" in name.split(".")[-1] else "final_norm"


def _sorted_parts(found: dict[str, str]) -> dict[str, list[str]]:
    return {part: names for part in PART_ORDER if (names := [n for n, p in found.items() if p == part])}

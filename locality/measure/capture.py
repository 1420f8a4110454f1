"""Capture pooled hidden states of every layer on the probe set, with scoped forward hooks.

Layer 0 is the input of the first block (the embedding output) and layer l the output of block l-1,
for every architecture (the residual stream, before any final norm). Hooks live only inside
`capture()` and are removed even when the forward pass raises. Batches are pooled as they stream, so
memory holds [n_probe, d] per layer, never [n_probe, seq, d].

The pre-fine-tuning capture depends only on (weights, probe set, pooling, tokenization): it is cached on
disk under a key of those, and every run of a sweep that starts from the same weights reuses it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from locality.objectives.base import no_cache

POOLINGS = ("mean", "last", "first", "tokens")


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


@contextmanager
def block_hooks(blocks: nn.ModuleList, sink: list[torch.Tensor | None]):
    """Record the input of block 0 and the output of every block into sink[0..L] during forward passes."""

    def pre_hook(module, args, kwargs):
        sink[0] = args[0] if args else kwargs["hidden_states"]

    def make_hook(index: int):
        def hook(module, args, output):
            sink[index] = _hidden(output)
        return hook

    handles = [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [block.register_forward_hook(make_hook(i + 1)) for i, block in enumerate(blocks)]
    try:
        yield sink
    finally:
        for handle in handles:
            handle.remove()


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, how: str, positions: torch.Tensor | None = None):
    """[batch, seq, d] -> [batch, d] (mean/last/first over non-pad tokens) or [rows, d] for `tokens`."""
    hidden = hidden.float()
    if how == "mean":
        m = mask.unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if how == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1).clamp(min=1) - 1]
    if how == "first":
        return hidden[:, 0]
    if how == "tokens":
        rows, cols = positions.unbind(-1)
        return hidden[rows, cols]
    raise ValueError(f"measure.pooling must be one of {POOLINGS}, not {how!r}")


def token_positions(mask: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k random non-pad positions per sequence (with replacement for short ones): [batch*k, 2] (row, col)."""
    lengths = mask.sum(1).clamp(min=1)
    cols = (torch.rand(mask.shape[0], k, generator=generator) * lengths.unsqueeze(1)).long()
    rows = torch.arange(mask.shape[0]).unsqueeze(1).expand(-1, k)
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


@torch.no_grad()
def capture(base: nn.Module, blocks: nn.ModuleList, batches: Iterable[dict], pooling: str = "mean",
            k_tokens: int = 8, seed: int = 0, forward_context=nullcontext) -> list[torch.Tensor]:
    """Pooled float32 features per layer, [L+1] tensors of [n, d] on CPU, for the probe batches.

    The forward runs on the model's device inside `forward_context()` (e.g. the trainer's autocast); hidden
    states are pooled there and only the pooled features are copied to the host.
    """
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    generator = torch.Generator().manual_seed(seed)
    sink: list[torch.Tensor | None] = [None] * (len(blocks) + 1)
    pooled: list[list[torch.Tensor]] = [[] for _ in sink]
    try:
        with block_hooks(blocks, sink):
            for batch in batches:
                mask = batch["attention_mask"].to(device)
                with forward_context():
                    base(input_ids=batch["input_ids"].to(device), attention_mask=mask, **no_cache(base))
                positions = token_positions(mask.cpu(), k_tokens, generator) if pooling == "tokens" else None
                positions = positions.to(device) if positions is not None else None
                for layer, hidden in enumerate(sink):
                    pooled[layer].append(pool_hidden(hidden, mask, pooling, positions).cpu())
    finally:
        base.train(was_training)
    return [torch.cat(chunks) for chunks in pooled]


def weights_fingerprint(module: nn.Module) -> str:
    """A cheap content hash of a model's weights: per tensor its name, shape and a few float64 moments."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            head = flat[:8].double().cpu().tolist() if flat.is_floating_point() else flat[:8].cpu().tolist()
            stats = [flat.double().sum().item(), flat.double().abs().sum().item()] if flat.is_floating_point() else []
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{head}{stats}".encode())
    return digest.hexdigest()


def capture_key(weights: str, probe_texts: list[str], settings: dict) -> str:
    digest = hashlib.sha1(weights.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for text in probe_texts:
        digest.update(hashlib.sha1(text.encode()).digest())
    return digest.hexdigest()[:20]


def load_cached(path: Path) -> list[torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # a truncated or stale cache file is just a miss
        return None


def save_cached(path: Path, features: list[torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")  # never the global RNG: training's dropout uses it
    torch.save(features, tmp)
    tmp.replace(path)

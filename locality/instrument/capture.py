"""Capture pooled hidden states of every layer on the probe set, with scoped forward hooks.

Layer 0 is the input of the first block (the embedding output) and layer l the output of block l-1,
for every architecture (the residual stream, before any final norm). Hooks live only inside
`capture()` and are removed even when the forward pass raises. Batches are pooled as they stream, so
memory holds [n_probe, d] per layer, never [n_probe, seq, d].

The pre-fine-tuning capture depends only on (weights, probe set, pooling, tokenization): it is cached on
disk under a key of those, and every run of a sweep that starts from the same weights reuses it.

`capture_token_change` is the post-fine-tuning capture that also measures `cosine_tokens`, the paper's
change: 1 - cos(h_pre, h_post) of every non-pad probe token. The pre-fine-tuning token states are not
kept (n_tokens x d x (L+1) floats: ~220 MB in fp32 for MiniLM's 512 probes, ~2.6 GB for GPT-2 at 128
tokens, tens of GB for 7B models). Instead each probe batch runs twice on the device, through the
fine-tuned weights and then through a snapshot of the pretrained weights of the base model
(`torch.func.functional_call`), and only per-sequence sums of the token distances (plus token counts)
leave the device. Cost: one extra forward of the probe set (MiniLM, 512 probes, 2 busy CPU cores: the
post-capture took 47 s against 32 s for the pooled capture alone); memory: the host snapshot of the base
model's parameters in their own dtype (MiniLM's 22.7M = 90 MB in fp32; it also serves as weight_rel's
reference, so float32 models keep no second copy), one device copy of it during that pass, and two sets
of one batch's hidden states.
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
from torch.func import functional_call

from locality.backbones import no_cache
from locality.backbones.first_order import first_order
from locality.core.dtensor import is_dtensor
from locality.core.integrity import checksum_matches, sha256_of, write_checksum
from locality.core.pooling import pool
from locality.measure.similarity import token_cosine_sums


def _hidden(output) -> torch.Tensor:
    return first_order(output[0] if isinstance(output, tuple | list) else output)


@contextmanager
def block_hooks(blocks: nn.ModuleList, sink: list[torch.Tensor | None]):
    """Record the input of block 0 and the output of every block into sink[0..L] during forward passes."""

    def pre_hook(module, args, kwargs):
        sink[0] = first_order(args[0] if args else kwargs["hidden_states"])

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


def token_positions(mask: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k random non-pad positions per sequence (with replacement for short ones): [batch*k, 2] (row, col)."""
    lengths = mask.sum(1).clamp(min=1)
    cols = (torch.rand(mask.shape[0], k, generator=generator) * lengths.unsqueeze(1)).long()
    rows = torch.arange(mask.shape[0]).unsqueeze(1).expand(-1, k)
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


@torch.no_grad()
def capture(
    base: nn.Module,
    blocks: nn.ModuleList,
    batches: Iterable[dict],
    pooling: str = "mean",
    k_tokens: int = 8,
    seed: int = 0,
    forward_context=nullcontext,
) -> list[torch.Tensor]:
    """Pooled float32 features per layer, [L+1] tensors of [n, d] on CPU, for the probe batches.

    The forward runs on the model's device inside `forward_context()` (e.g. the trainer's autocast); hidden
    states are pooled there and only the pooled features are copied to the host.
    """
    return _capture(base, blocks, batches, pooling, k_tokens, seed, forward_context)[0]


@torch.no_grad()
def capture_token_change(
    base: nn.Module,
    blocks: nn.ModuleList,
    batches: Iterable[dict],
    pretrained: dict[str, torch.Tensor],
    pooling: str = "mean",
    k_tokens: int = 8,
    seed: int = 0,
    forward_context=nullcontext,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """`capture`'s pooled features of the current weights, plus `cosine_tokens` sums against `pretrained`.

    pretrained: the base model's pretrained parameters by name (`locality.measure.weights.snapshot_parameters`
    before training). Each batch runs through the current weights (pooled as in `capture`, same values) and
    then through `pretrained` (`pretrained_parameters`), both on the model's device inside
    `forward_context()`. Returns (pooled [L+1] x [n, d], sums [n, L+1] float64: per probe sequence the sum
    over its non-pad tokens of 1 - cos(h_pre, h_post) at each layer, counts [n] int64: its non-pad tokens).
    `locality.measure.similarity.token_change(sums, counts)` gives the per-layer mean and its bootstrap.
    """
    return _capture(base, blocks, batches, pooling, k_tokens, seed, forward_context, pretrained)


def pretrained_parameters(base: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pretrained value of every current parameter of `base`, on its device and in its dtype.

    Names are matched to the snapshot's. In-place LoRA (peft) renames an adapted weight to
    `<name>.base_layer.weight` (its pretrained value, frozen) and adds `lora_A`/`lora_B`: with lora_B zero
    the adapter adds nothing, so the forward is the pretrained model's. A parameter with no pretrained
    value raises ValueError naming it.
    """
    out, unknown = {}, []
    for name, param in base.named_parameters():
        key = name.replace(".base_layer", "")
        if key in snapshot:
            out[name] = snapshot[key].to(param.device, param.dtype)
        elif ".lora_B." in name:
            out[name] = torch.zeros_like(param)
        elif ".lora_A." not in name:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"no pretrained value for {len(unknown)} parameter(s) added after the snapshot, e.g. "
            f"{unknown[:3]}: cannot run the pretrained model for cosine_tokens"
        )
    return out


def run_with_weights(base: nn.Module, weights: dict[str, torch.Tensor], inputs: dict) -> None:
    """Run `base(**inputs)` with `weights` (by parameter name) in place of its parameters.

    A plain model runs through `torch.func.functional_call`. An FSDP2 model cannot: its pre-forward
    all-gather sets the gathered parameters over any substitute. There `weights` hold this rank's shards
    (`locality.measure.weights.local_shard`), copied into the parameters' local shards for the forward and
    the current values copied back after it (one extra shard-sized buffer; no rank gathers the model).
    """
    sharded = [(p, weights[name]) for name, p in base.named_parameters() if is_dtensor(p) and name in weights]
    if not sharded:
        functional_call(base, weights, args=(), kwargs=inputs, strict=False)
        return
    local = [p.to_local() for p, _ in sharded]
    current = [t.clone() for t in local]
    torch._foreach_copy_(local, [w for _, w in sharded])
    try:
        base(**inputs)
    finally:
        torch._foreach_copy_(local, current)


def _capture(
    base: nn.Module,
    blocks: nn.ModuleList,
    batches: Iterable[dict],
    pooling: str,
    k_tokens: int,
    seed: int,
    forward_context,
    pretrained: dict[str, torch.Tensor] | None = None,
):
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    generator = torch.Generator().manual_seed(seed)
    sink: list[torch.Tensor | None] = [None] * (len(blocks) + 1)
    pooled: list[list[torch.Tensor]] = [[] for _ in sink]
    sums: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    reference = pretrained_parameters(base, pretrained) if pretrained is not None else None
    try:
        with block_hooks(blocks, sink):
            for batch in batches:
                mask = batch["attention_mask"].to(device)
                inputs = {
                    "input_ids": batch["input_ids"].to(device),
                    "attention_mask": mask,
                    **no_cache(base),
                }
                with forward_context():
                    base(**inputs)
                positions = token_positions(mask.cpu(), k_tokens, generator) if pooling == "tokens" else None
                positions = positions.to(device) if positions is not None else None
                for layer, hidden in enumerate(sink):
                    pooled[layer].append(pool(hidden.float(), mask, pooling, positions).cpu())
                if reference is None:
                    continue
                post = list(sink)
                with forward_context():
                    run_with_weights(base, reference, inputs)
                per_layer = [
                    token_cosine_sums(pre, after, mask) for pre, after in zip(sink, post, strict=True)
                ]
                sums.append(torch.stack(per_layer, dim=1).cpu())
                counts.append(mask.bool().sum(1).cpu())
                del post
    finally:
        base.train(was_training)
        del reference
    features = [torch.cat(chunks) for chunks in pooled]
    if pretrained is None:
        return features, None, None
    return features, torch.cat(sums), torch.cat(counts).long()


def weights_fingerprint(module: nn.Module) -> str:
    """A cheap content hash of a model's weights: per tensor its name, shape and a few float64 moments."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            head = flat[:8].double().cpu().tolist() if flat.is_floating_point() else flat[:8].cpu().tolist()
            stats = (
                [flat.double().sum().item(), flat.double().abs().sum().item()]
                if flat.is_floating_point()
                else []
            )
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{head}{stats}".encode())
    return digest.hexdigest()


def capture_key(weights: str, probe_texts: list[str], settings: dict) -> str:
    digest = hashlib.sha1(weights.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for text in probe_texts:
        digest.update(hashlib.sha1(text.encode()).digest())
    return digest.hexdigest()[:20]


def load_cached(path: Path, expected: tuple[int, int]) -> list[torch.Tensor] | None:
    """A cached capture, or None when there is none or it cannot be trusted (truncated, another shape, not
    finite): the caller then captures again and replaces it."""
    if not path.is_file() or not checksum_matches(path):  # a damaged (or unchecked) entry is captured again
        return None
    try:
        features = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 -- any unreadable file is a miss
        return None
    n_layers, n_probe = expected
    if not (
        isinstance(features, list)
        and len(features) == n_layers
        and all(
            isinstance(f, torch.Tensor) and f.ndim >= 2 and len(f) >= n_probe and f.isfinite().all()
            for f in features
        )
    ):
        return None
    return features


def save_cached(path: Path, features: list[torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")  # never the global RNG: training's dropout uses it
    torch.save(features, tmp)
    digest = sha256_of(tmp)
    tmp.replace(path)
    write_checksum(path, digest)

"""Relative weight change per block, ||W_ft - W_pre|| / ||W_pre||, over each block's parameters together.

Under FSDP2 the blocks' parameters are DTensor shards: `to_local_shards` cuts the (full, host) pretrained
reference to this rank's shards once training starts, and `weight_rel` sums squares over local shards and
adds them across ranks with one all-reduce, so no rank gathers the model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from locality.core.dtensor import is_dtensor, shard_group


def block_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's effective weights by name. LoRA layers (peft) count merged: W + scale * B @ A."""
    state = {
        name.replace(".base_layer", ""): p.detach()
        for name, p in block.named_parameters()
        if "lora_" not in name
    }
    for name, module in block.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    state[f"{name}.weight"] = (
                        state[f"{name}.weight"] + module.get_delta_weight(adapter).detach()
                    )
    return state


def snapshot_blocks(
    blocks: nn.ModuleList, base: nn.Module | None = None, snapshot: dict[str, torch.Tensor] | None = None
) -> list[dict[str, torch.Tensor]]:
    """A CPU float32 copy of every block's effective weights (the pretrained reference).

    With `snapshot` (`snapshot_parameters(base)`, taken at the same weights), the blocks' tensors are read
    from it instead: no second copy when the snapshot is already float32.
    """
    if snapshot is not None and base is not None:
        prefix = {id(m): f"{name}." for name, m in base.named_modules()}
        states = [block_state(b) for b in blocks]
        if all(
            f"{prefix.get(id(b), '?')}{k}" in snapshot
            for b, state in zip(blocks, states, strict=True)
            for k in state
        ):
            return [
                {k: snapshot[f"{prefix[id(b)]}{k}"].float() for k in state}
                for b, state in zip(blocks, states, strict=True)
            ]
    return [{k: v.to("cpu", torch.float32, copy=True) for k, v in block_state(b).items()} for b in blocks]


def snapshot_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter of `module` by name, in its own dtype (shared parameters once)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters()}


@torch.no_grad()
def weight_rel(blocks: nn.ModuleList, reference: list[dict[str, torch.Tensor]]) -> list[float]:
    states = [block_state(block) for block in blocks]
    sums = torch.tensor(
        [
            [
                sum(
                    float((_local(after[k]).double().cpu() - v.double()).pow(2).sum())
                    for k, v in before.items()
                ),
                sum(float(v.double().pow(2).sum()) for v in before.values()),
            ]
            for after, before in zip(states, reference, strict=True)
        ],
        dtype=torch.float64,
    )
    group = shard_group([p for state in states for p in state.values()])
    if group is not None:  # local shards: one all-reduce adds them up across ranks
        device = _local(next(iter(states[0].values()))).device
        sums = sums.to(device)
        dist.all_reduce(sums, group=group)
        sums = sums.cpu()
    return [(delta / norm) ** 0.5 if norm > 0 else float("nan") for delta, norm in sums.tolist()]


def to_local_shards(blocks: nn.ModuleList, reference: list[dict[str, torch.Tensor]]) -> None:
    """Replace, in place, every reference tensor whose block parameter is a DTensor by this rank's shard of it."""
    for block, before in zip(blocks, reference, strict=True):
        state = block_state(block)
        for name, full in before.items():
            if is_dtensor(state[name]):
                before[name] = local_shard(full, state[name])


def local_shard(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's piece of `full` as DTensor `like` holds it (FSDP2 splits with `torch.chunk` per Shard dim)."""
    from torch.distributed.tensor import Shard

    local = full
    coordinate = like.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            chunks = torch.chunk(local, like.device_mesh.size(mesh_dim), dim=placement.dim)
            index = coordinate[mesh_dim]
            local = chunks[index] if index < len(chunks) else local.narrow(placement.dim, 0, 0)
    if local.shape != like.to_local().shape:
        raise ValueError(
            f"cannot cut the pretrained reference {tuple(full.shape)} to this rank's shard "
            f"{tuple(like.to_local().shape)} (placements {like.placements})"
        )
    return local.clone()


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` holds FSDP2 (DTensor) parameters."""
    return any(is_dtensor(p) for p in module.parameters())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor

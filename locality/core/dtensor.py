"""DTensor helpers for FSDP2-sharded parameters, pure torch: is a tensor a shard, and over which process
group must per-layer sums of its shards be all-reduced (`locality.controls.update_core`,
`locality.measure.weights`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed support
    DTensor = Shard = None


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def shard_group(params: Sequence[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group over which the layers' DTensor shards must be summed (None: no DTensors).

    FSDP2 (`fully_shard`) shards each parameter on dim 0 over one mesh dimension; HSDP adds a Replicate
    dimension, over which nothing needs summing. Tensor parallelism (a second Shard dimension) is refused.
    """
    found = {is_dtensor(p) for p in params}
    if found == {False}:
        return None
    if found == {True, False}:
        raise ValueError("EqualStep: the blocks mix DTensor and plain parameters; shard all of them (FSDP2).")
    meshes = {(p.device_mesh, tuple(p.placements)) for p in params}
    if len(meshes) != 1:
        raise ValueError("EqualStep: all block parameters must share one device mesh and placement.")
    mesh, placements = meshes.pop()
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    if len(shard_dims) != 1:
        raise ValueError(
            f"EqualStep supports FSDP2 sharding on one mesh dimension; got placements {placements} "
            "(tensor parallelism is not supported)."
        )
    return mesh.get_group(shard_dims[0])

"""FSDP2 for locality runs: shard the backbone one residual block at a time (`trainer=fsdp`).

`BlockwiseFSDP` is Lightning's `ModelParallelStrategy` (FSDP2, `fully_shard`) with the sharding plan as
arguments; `LocalityModule.configure_model` applies `shard_module` after the controls have rewritten the
model. The plan: every discovered block is one FSDP unit (its parameters are all-gathered for its forward
and freed after), then the base model (embeddings, final norm), the full model (an LM head) and the
objective's own head. Parameters stay float32 (the optimizer's master weights, what equal-step measures and
rescales); `param_dtype=bfloat16` computes in bf16 through FSDP2's `MixedPrecisionPolicy`, with gradients
reduced in `reduce_dtype`. Activation checkpointing is `model.gradient_checkpointing=true`.

Measurement under sharding (`locality.measure.weights.to_local_shards`, `weight_rel`): the pretrained
reference is cut to each rank's shard when training starts, and the blocks' relative weight change is
summed from local shards with one all-reduce; no rank ever gathers the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ShardingPlan:
    param_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    reshard_after_forward: bool = True


class BlockwiseFSDP(ModelParallelStrategy):
    """`ModelParallelStrategy` over data parallelism only (every process one FSDP2 shard), plus the plan."""

    def __init__(
        self,
        param_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
        reduce_dtype: Literal["float32", "bfloat16"] = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.plan = ShardingPlan(param_dtype, reduce_dtype, reshard_after_forward)

    def setup_environment(self) -> None:
        # "auto" means one data-parallel group per node in Lightning; here every process is one shard.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def ties_outside(base: nn.Module, model: nn.Module) -> bool:
    """Whether a parameter of `base` is also used outside it in `model` (an LM head tied to the embedding)."""
    if base is model:
        return False
    inside = {id(p) for p in base.parameters()}
    prefix = next(name for name, m in model.named_modules() if m is base)
    return any(
        id(p) in inside
        for name, p in model.named_parameters(remove_duplicate=False)
        if not name.startswith(prefix + ".")
    )


def shard_module(module, mesh, plan: ShardingPlan | None = None) -> None:
    """`fully_shard` each block, then the base model (with the LM head when it is tied to the input embedding:
    GPT-2, SmolLM2), the full model and the objective's head (if any)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plan = plan or ShardingPlan()
    if "data_parallel" in (mesh.mesh_dim_names or ()):
        mesh = mesh["data_parallel"]
    options = {
        "mesh": mesh,
        "reshard_after_forward": plan.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=DTYPES[plan.param_dtype], reduce_dtype=DTYPES[plan.reduce_dtype]
        ),
    }
    base, model = module.backbone.base, module.model
    tied = ties_outside(base, model)  # read before sharding replaces the parameters
    for block in module.blocks:
        fully_shard(block, **options)
    if base is not model:
        # A tied LM head shares the embedding's parameter, and FSDP2 manages a parameter in one unit: the head
        # joins the base model's unit (one group of two modules, gathered when either runs, as measurement
        # calls the base model on its own).
        fully_shard([base, model.get_output_embeddings()] if tied else base, **options)
    fully_shard(model, **options)
    head = module.objective
    if isinstance(head, nn.Module) and next(head.parameters(), None) is not None:
        fully_shard(head, **options)

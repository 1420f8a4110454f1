"""Two-process (gloo, CPU) worker for the equal-step DDP and FSDP2 tests.

Run as `torchrun --standalone --nproc_per_node=2 equal_step_dist_worker.py OUT_DIR`; each rank writes
OUT_DIR/rank{r}.pt, which the tests read. FSDP2 runs first on a raw process group (the core driving
DTensor shards, compared with an unsharded reference); then Lightning DDP reuses the same group.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.distributed as dist
from equal_step_toy import ResMLP, ToyModule, toy_loader

from locality.controls import EqualStep, EqualStepCore

FSDP_STEPS = 4


def fsdp2(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = ResMLP()
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    core = EqualStepCore([list(b.parameters()) for b in model.blocks])
    ref_core = EqualStepCore([list(b.parameters()) for b in ref.blocks])
    core.attach(opt)
    ref_core.attach(ref_opt)

    calls: list[tuple[int, ...]] = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor: torch.Tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    g = torch.Generator().manual_seed(1)
    per_step = []
    for _ in range(FSDP_STEPS):
        x, y = torch.randn(4 * world, 8, generator=g), torch.randn(4 * world, 1, generator=g)
        mine = slice(4 * rank, 4 * rank + 4)
        nn_mse = torch.nn.functional.mse_loss
        nn_mse(model(x[mine]), y[mine]).backward()
        nn_mse(ref(x), y).backward()
        n = len(calls)
        dist.all_reduce = counting_all_reduce
        try:
            opt.step()
        finally:
            dist.all_reduce = all_reduce
        per_step.append(len(calls) - n)
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()

    full = {name: p.full_tensor() for name, p in model.named_parameters()}  # once, at the end, for the check
    diff = max((full[name] - p).abs().max().item() for name, p in ref.named_parameters())
    return {
        "max_abs_diff": diff,
        "all_reduce_per_step": per_step,
        "all_reduce_shapes": calls,
        "history": core.history,
        "ref_history": ref_core.history,
        "local_numels": [p.to_local().numel() for p in model.blocks[0].parameters()],
    }


class FirstBatch(L.Callback):
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            self.tokens = batch[0].tolist()


def ddp(world: int) -> dict:

    L.seed_everything(0, verbose=False)
    module = ToyModule()
    control = EqualStep()
    trainer = L.Trainer(
        callbacks=[control],
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    first = FirstBatch()
    trainer.callbacks.append(first)
    trainer.fit(module, toy_loader())
    return {
        "params": [p.detach().clone() for p in module.parameters()],
        "history": control.history,
        "world_size": trainer.world_size,
        "first_batch": first.tokens,
    }


def run(rank: int, world: int, out_dir: str) -> None:
    """Both checks on an initialized gloo group; writes OUT_DIR/rank{rank}.pt."""
    torch.set_num_threads(1)
    result = {"fsdp2": fsdp2(rank, world), "ddp": ddp(world)}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def forked(rank: int, world: int, out_dir: str, port: int) -> None:
    """Entry for `torch.multiprocessing.start_processes(..., start_method="fork")`."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0"}
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    run(rank, world, out_dir)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1])

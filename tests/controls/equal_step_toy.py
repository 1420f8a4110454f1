"""Toy models and probes shared by the equal-step tests and their multi-process worker."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Block(nn.Module):
    """Pre-norm residual MLP block; `scale` multiplies its initial weights (unequal ratios on purpose)."""

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            for p in (*self.fc1.parameters(), *self.fc2.parameters()):
                p.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ToyModule(L.LightningModule):
    """Embedding -> residual blocks -> final norm -> head; exposes `.blocks` and `.parts` like LocalityModule."""

    def __init__(
        self,
        dim: int = 16,
        n_blocks: int = 4,
        vocab: int = 32,
        n_classes: int = 4,
        lr: float = 1e-2,
        optimizer: str = "adamw",
        scheduler: bool = False,
        freeze: tuple[int, ...] = (),
        inf_grad_at_step: int | None = None,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, scale=3.0**i) for i in range(n_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)
        self.parts = {"embeddings": self.embed, "final_norm": self.norm, "head": self.head}
        for i in freeze:
            self.blocks[i].requires_grad_(False)
        self.lr, self.optimizer_name, self.scheduler = lr, optimizer, scheduler
        self.inf_grad_at_step = inf_grad_at_step

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        return nn.functional.cross_entropy(self(tokens), labels)

    def on_after_backward(self) -> None:
        if self.inf_grad_at_step is not None and self.trainer.global_step == self.inf_grad_at_step:
            self.head.bias.grad.fill_(float("inf"))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def toy_loader(n: int = 32, batch_size: int = 4, seq: int = 6, vocab: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randint(vocab, (n, seq), generator=g), torch.randint(4, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


class CaptureLogger(Logger):
    """Keeps every `log_metrics` call in memory: `self.records` is a list of (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class RatioTracker(L.Callback):
    """Independent check: each block's actual ||ΔW|| / ||W_old|| per real step, from the weights, in float64."""

    def __init__(self) -> None:
        self.ratios: list[torch.Tensor] = []

    def _weights(self, pl_module: ToyModule) -> list[torch.Tensor]:
        return [
            torch.cat([p.detach().double().flatten() for p in b.parameters() if p.requires_grad])
            for b in pl_module.blocks
            if any(p.requires_grad for p in b.parameters())
        ]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: ToyModule, batch: Any, batch_idx: int
    ) -> None:
        self._before = self._weights(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: ToyModule, *args: Any) -> None:
        ratios = torch.stack(
            [
                (new - old).norm() / old.norm()
                for new, old in zip(self._weights(pl_module), self._before, strict=True)
            ]
        )
        if (ratios > 0).any():
            self.ratios.append(ratios)


class ResMLP(nn.Module):
    """Plain (Lightning-free) residual MLP for the FSDP2 test; each block has a size-1 gate (an empty shard)."""

    def __init__(self, dim: int = 8, n_blocks: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(GatedBlock(dim, scale=2.0**i) for i in range(n_blocks))
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class GatedBlock(Block):
    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__(dim, scale)
        self.gate = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.fc2(torch.relu(self.fc1(self.norm(x))))

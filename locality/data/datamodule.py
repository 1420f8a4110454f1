"""`LocalityDataModule`: the splits of one dataset, batched by the objective's own collate function."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from locality.data.sources import Splits


class LocalityDataModule(L.LightningDataModule):
    """Train/validation batches go through the objective's collate (labels, masking); the probe set is only
    tokenized, so what the depth profile measures never depends on the objective's randomness."""

    def __init__(self, splits: Splits, objective, batch_size: int, eval_batch_size: int, seed: int,
                 num_workers: int = 0):
        super().__init__()
        self.splits = splits
        self.collate = objective.collate
        self.tokenize = objective.tokenize
        self.max_length = objective.max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers

    def _loader(self, examples: list[dict], batch_size: int, shuffle: bool, collate=None) -> DataLoader:
        # Every loader has its own generator: iterating a loader without one draws from the global RNG,
        # so whether the probe capture came from the cache would change the dropout masks of training.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(examples, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=collate or self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits.train, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits.validation, self.eval_batch_size, shuffle=False)

    def init_dataloader(self) -> DataLoader:
        """Training examples in a fixed order: the step-0 objective distance is measured on these."""
        return self._loader(self.splits.train, self.batch_size, shuffle=False)

    def probe_dataloader(self) -> DataLoader:
        return self._loader(self.splits.probe, self.eval_batch_size, shuffle=False, collate=self._probe_batch)

    def _probe_batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return dict(self.tokenize([e["text"] for e in examples]))

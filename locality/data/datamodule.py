"""`LocalityDataModule`: the splits of one dataset, batched by the objective's own collate function.

The training loader is resumable (`ResumableLoader`): Lightning saves its position with the checkpoint, so a
resumed run continues the interrupted epoch where it stopped, with the same order, instead of restarting it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from locality.data.sources import Splits


class EpochSampler(DistributedSampler):
    """Epoch e's order is a permutation drawn from `seed + e` alone (DistributedSampler's own, which also gives
    each rank its share in a multi-process run), so any epoch can be reproduced from its number; the first
    `skip` indices of the next pass are left out (the batches an interrupted run already trained on).

    A DistributedSampler so that Lightning keeps it as it is in a multi-process run (it replaces any other
    sampler by its own). The epoch is set by `ResumableLoader.start` from the passes the loader has made:
    Lightning's `set_epoch` count can differ after a resume at the end of an epoch, so it is ignored.
    """

    def __init__(self, dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Ignored: see the class doc."""

    def start(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip :])


class ResumableLoader(DataLoader):
    """A training DataLoader with a position Lightning saves and restores (`state_dict` / `load_state_dict`):
    the epoch (passes made so far) and how many of its batches were handed to the training loop.

    A pass starts at its first batch, not at `iter()`: Lightning may call `iter()` before it restores the
    position, or twice in a row. Each pass is one epoch, ordered by its `EpochSampler`; after a restore the pass
    skips the batches already trained on (or, when the saved epoch was complete, starts the next epoch). The
    loader's own generator, reseeded per epoch, seeds the workers and keeps the global RNG untouched.
    Batches are counted where the training loop receives them, so workers prefetching ahead do not count.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch handed out
        self._passes = 0
        self._restore: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        if self._restore is not None:  # restored, not yet started: the position is still the saved one
            return dict(self._restore)
        return {"epoch": self.epoch, "batches": self.consumed, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(
                f"the checkpoint's train loader had batch size {state_dict['batch_size']}, this one "
                f"{self.batch_size}: its position cannot be restored."
            )
        self._restore = {
            "epoch": int(state_dict["epoch"]),
            "batches": int(state_dict["batches"]),
            "batch_size": self.batch_size,
        }

    def __iter__(self) -> Iterator:
        return _Pass(self)

    def start(self) -> Iterator:
        """Begin a pass: a new epoch, or the rest of a restored one."""
        if self._restore is not None:
            epoch, skip = self._restore["epoch"], self._restore["batches"]
            self._restore = None
            if skip >= len(self):
                epoch, skip = epoch + 1, 0
        else:
            epoch, skip = (self.epoch + 1 if self._passes else 0), 0
        self._passes += 1
        self.epoch, self.consumed = epoch, skip
        if isinstance(self.sampler, EpochSampler):  # else (a sampler Lightning put in its place): no skipping
            self.sampler.start(epoch, skip * self.batch_size)
            if self.generator is not None:
                self.generator.manual_seed(self.sampler.seed * 1_000_003 + epoch)
        return super().__iter__()


class _Pass:
    """One pass over a `ResumableLoader`, started at its first batch and counting the batches it hands out."""

    def __init__(self, loader: ResumableLoader):
        self.loader = loader
        self.batches: Iterator | None = None

    def __iter__(self) -> _Pass:
        return self

    def __next__(self):
        if self.batches is None:
            self.batches = self.loader.start()
        batch = next(self.batches)
        self.loader.consumed += 1
        return batch


class OwnRandomStream:
    """A collate function (e.g. MLM masking) that draws from a random stream of its own, restarted by `reset`,
    and never from the global one: evaluation draws the same masks every time it runs, and validating between
    training steps leaves the training RNG (dropout, the training batches' masks) where it was, as a resumed
    run, which skips the validation an uninterrupted run did before its checkpoint, needs."""

    def __init__(self, collate, seed: int):
        self.collate = collate
        self.start = torch.Generator().manual_seed(seed).get_state()
        self.state = self.start

    def reset(self) -> None:
        self.state = self.start

    def __call__(self, examples: list[dict]):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.state)
            batch = self.collate(examples)
            self.state = torch.get_rng_state()
        return batch


class EvalLoader(DataLoader):
    """An evaluation loader (validation, step-0 batches, probe set) whose every pass is the same: the collate's
    random stream (`OwnRandomStream`) and the worker seeds restart with each pass."""

    def __iter__(self):
        if isinstance(self.collate_fn, OwnRandomStream):
            self.collate_fn.reset()
        self.generator.manual_seed(self.generator.initial_seed())
        return super().__iter__()


class LocalityDataModule(L.LightningDataModule):
    """Train/validation batches go through the objective's collate (labels, masking); the probe set is only
    tokenized, so what the depth profile measures never depends on the objective's randomness. Only the
    training loader draws from the global RNG (through the collate) and moves on from epoch to epoch; it is
    resumable (`ResumableLoader`). Every other loader repeats itself (`EvalLoader`)."""

    def __init__(
        self,
        splits: Splits,
        objective,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        num_workers: int = 0,
    ):
        super().__init__()
        self.splits = splits
        self.collate = objective.collate
        self.tokenize = objective.tokenize
        self.max_length = objective.max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers

    def _loader(self, examples: list[dict], batch_size: int, collate=None) -> EvalLoader:
        # Every loader has its own generator: iterating a loader without one draws from the global RNG,
        # so whether the probe capture came from the cache would change the dropout masks of training.
        return EvalLoader(
            examples,
            batch_size=batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=OwnRandomStream(collate or self.collate, self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableLoader:
        replicas = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        sampler = EpochSampler(
            self.splits.train,
            self.seed,
            num_replicas=replicas.get("num_replicas", 1),
            rank=replicas.get("rank", 0),
        )
        return ResumableLoader(
            self.splits.train,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits.validation, self.eval_batch_size)

    def init_dataloader(self) -> DataLoader:
        """Training examples in a fixed order: the step-0 objective distance is measured on these."""
        return self._loader(self.splits.train, self.batch_size)

    def probe_dataloader(self) -> DataLoader:
        return self._loader(self.splits.probe, self.eval_batch_size, collate=self._probe_batch)

    def _probe_batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return dict(self.tokenize([e["text"] for e in examples]))

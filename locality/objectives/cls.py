"""Sequence classification with a new head (linear, or a two-layer MLP: `head=mlp`) on pooled final states.

Pooling follows the family unless `objective.pooling` says otherwise: the first token for encoders
([CLS]), the last non-pad token for decoders (the only one that has seen the whole text), the mean for
SSMs and RNNs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torchmetrics
from torch import nn

from locality.backbones import Backbone
from locality.core.errors import UserError
from locality.core.pooling import pool
from locality.objectives.base import FAMILY_POOLING, NewHead, StepOutput, Task

POOLINGS = ("auto", "first", "last", "mean")
HEADS = ("linear", "mlp")


def build_head(kind: str, d_in: int, n_out: int, dropout: float, hidden: int | None = None) -> nn.Sequential:
    """linear: dropout, Linear(d_in, n_out). mlp (Ren et al. 2023's MLP head): dropout, Linear(d_in, hidden),
    GELU, dropout, Linear(hidden, n_out); hidden defaults to d_in. The last module is always the output layer."""
    if kind not in HEADS:
        raise ValueError(f"head={kind!r} is not one of: {', '.join(HEADS)}.")
    if hidden is not None and hidden < 1:
        raise ValueError(f"head_hidden={hidden} must be >= 1 (or null: the hidden size).")
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, n_out))
    hidden = hidden or d_in
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_out)
    )


class SequenceClassification(NewHead):
    name = "cls"
    head_kind = "base"

    def __init__(
        self,
        backbone: Backbone,
        task: Task,
        max_length: int = 64,
        pooling: Literal["auto", "first", "last", "mean"] = "auto",
        head_dropout: float = 0.1,
        head: Literal["linear", "mlp"] = "linear",
        head_hidden: int | None = None,
    ):
        super().__init__(backbone, task, max_length)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of: {', '.join(POOLINGS)}.")
        if not 0 <= head_dropout < 1:
            raise ValueError(f"head_dropout={head_dropout} must be in [0, 1).")
        self.pooling = FAMILY_POOLING[backbone.family] if pooling == "auto" else pooling
        self.n_labels = task.num_labels
        self.head = build_head(head, backbone.hidden_size, self.n_labels, head_dropout, head_hidden)

    @classmethod
    def check_task(cls, task: Task) -> None:
        if task.num_labels < 2:
            raise UserError(
                "objective=cls needs a labelled dataset (data.label_field), e.g. data=stdlib_docs or "
                "data=sst2; this dataset has no labels. Use objective=clm/mlm on unlabelled text."
            )

    @property
    def num_classes(self) -> int:
        return self.n_labels

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenize([e["text"] for e in examples])
        batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    def head_input(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool(hidden, mask, self.pooling)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.logits(model, batch)
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
        return StepOutput(loss, logits.argmax(dim=-1), batch["labels"])

    def metrics(self) -> torchmetrics.MetricCollection:
        collection = super().metrics()
        collection.add_metrics(
            {"f1": torchmetrics.classification.MulticlassF1Score(self.n_labels, average="macro")}
        )
        return collection

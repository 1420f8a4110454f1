"""Classification against a linear teacher on the pretrained features, with a fraction of labels replaced by
noise: the cls arm of the dose-response design, whose distance grows with the noise and nothing else.

Every example's label is a fixed function of its text: the teacher's class argmax(((f_0(x) - mu) / sigma) W_T),
where f_0(x) is the frozen pretrained model's pooled final state (the same pooling the head sees), mu and sigma
its per-feature mean and std over a fixed reference set (the first REFERENCE_TEXTS offline pretraining texts;
without them one direction common to all examples decides most labels), and W_T a standard-normal
[hidden, classes] matrix drawn from `teacher_seed`, except for a `noise` fraction of examples (chosen by a
hash of the token ids) whose label is a hash-chosen class instead. The labels are deterministic (entropy 0), so
the step-0 distance, KL(one-hot || best linear read-out of the frozen features) (`init.kl`), is itself the
excess divergence (`init.kl_excess`): about 0 at noise 0, where the labels are a linear function of those
features, and near ln(classes) at noise 1, where they are unrelated to them. The data set's own labels are not
used; any text data works.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from locality.backbones import Backbone
from locality.core.errors import UserError
from locality.core.pooling import pool
from locality.data.corpus import pretraining_texts
from locality.objectives.base import FrozenCopy, StepOutput, Task
from locality.objectives.cls import SequenceClassification

_HASH_MODULUS = 2_147_483_647  # 2^31 - 1
REFERENCE_TEXTS = 256


class TeacherClassification(SequenceClassification):
    name = "teacher_cls"
    target_entropy = 0.0  # the labels are a fixed function of the text: init.kl is the excess divergence

    def __init__(
        self,
        backbone: Backbone,
        task: Task,
        max_length: int = 64,
        pooling: Literal["auto", "first", "last", "mean"] = "auto",
        head_dropout: float = 0.1,
        head: Literal["linear", "mlp"] = "linear",
        head_hidden: int | None = None,
        classes: int = 8,
        noise: float = 0.0,
        teacher_seed: int = 0,
    ):
        if classes < 2:
            raise UserError(f"objective.classes={classes!r} must be >= 2.")
        if not 0.0 <= noise <= 1.0:
            raise UserError(
                f"objective.noise={noise!r} is the fraction of noisy labels: choose it in [0, 1]."
            )
        teacher_task = Task(tuple(f"class_{i}" for i in range(classes)))
        super().__init__(backbone, teacher_task, max_length, pooling, head_dropout, head, head_hidden)
        self.noise = float(noise)
        generator = torch.Generator().manual_seed(teacher_seed)
        weight = torch.randn(backbone.hidden_size, classes, generator=generator)
        self.register_buffer("teacher_weight", weight, persistent=False)
        self.teacher = FrozenCopy(backbone.model.base_model)
        reference = self.features(self.collate([{"text": t} for t in pretraining_texts()[:REFERENCE_TEXTS]]))
        self.register_buffer("feature_mean", reference.mean(0), persistent=False)
        self.register_buffer("feature_std", reference.std(0).clamp(min=1e-6), persistent=False)

    @classmethod
    def check_task(cls, task: Task) -> None:
        """Any text data: the labels come from the teacher."""

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return self.tokenize([e["text"] for e in examples])

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen pretrained model's pooled final states, float32."""
        return pool(self.teacher(batch)[0], batch["attention_mask"], self.pooling).float()

    def labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's class of every example, a `noise` fraction of them replaced by a hash-chosen class."""
        standardized = (self.features(batch) - self.feature_mean) / self.feature_std
        clean = (standardized @ self.teacher_weight).argmax(-1)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        digest = example_hash(ids, mask)
        flip = (digest % 10_000).double() / 10_000 < self.noise
        return torch.where(flip, (digest // 10_000) % self.n_labels, clean)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        return super().forward(model, {**batch, "labels": self.labels(batch)})


def example_hash(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A deterministic pseudo-random int64 per example from its non-pad token ids (independent of padding)."""
    positions = torch.arange(ids.shape[1], device=ids.device, dtype=torch.int64)
    weights = (positions * 2_654_435_761 + 97) % _HASH_MODULUS
    mixed = ((ids.long() + 1) * weights * mask.long()).remainder(_HASH_MODULUS).sum(-1)
    return (mixed * 48_271).remainder(_HASH_MODULUS)

"""The objective interface: batch preparation, head, loss and task metrics for one fine-tuning objective.

An objective is an `nn.Module` (its new head's parameters, if any, are trained with the backbone):

- `head_kind`: which Hugging Face model class to load ("base", "causal_lm", "masked_lm"); LM objectives
  reuse the checkpoint's pretrained head, the others add a new head on the base model.
- its constructor: `(backbone, task, **options)`; the options are its config keys (`conf/objective/<name>.yaml`
  names the class in `_target_`; `locality.core.components` checks the keys against this signature).
- `check_task(task)` / `check(backbone, task)`: refuse combinations that make no sense, before any training.
- `collate(examples)`: tokenize a list of {"text", "label"?} examples into a batch.
- `forward(model, batch)`: loss plus (predictions, targets) for the metrics.
- `metrics()`: a fresh torchmetrics collection (the module keeps one per stage).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torchmetrics
from torch import nn

from locality.backbones import Backbone, HeadKind, no_cache

IGNORE = -100


@dataclass(frozen=True)
class Task:
    """What an objective needs to know about the data: the labels of a labelled dataset (none for raw text)."""

    label_names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class StepOutput:
    """A step's loss, and what its metrics compare: predicted class indices against `target`. An objective
    gives the indices (`preds`) or the scores they come from (`scores`, [..., classes]); from scores the argmax
    is taken only when a metric reads it (`predicted()`): over a vocabulary it costs ~20 ms a step at 16 x 128
    tokens on one CPU thread (7% of a tiny_gpt2 step), and most training steps log no metric."""

    loss: torch.Tensor
    preds: torch.Tensor | None = None  # class indices, any shape
    target: torch.Tensor | None = None  # the same shape; IGNORE where not scored
    scores: torch.Tensor | None = None  # or the scores: preds = scores.argmax(-1)

    def predicted(self) -> torch.Tensor:
        return self.preds if self.preds is not None else self.scores.argmax(dim=-1)


class FrozenCopy:
    """A frozen copy of a module that an objective uses as a teacher, kept out of the objective's module tree
    (a plain attribute, not a submodule): never trained, not in checkpoints (a resumed run rebuilds it from the
    same pretrained weights), moved to the device of the inputs it is called on."""

    def __init__(self, module: nn.Module):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]):
        ids = batch["input_ids"]
        if next(self.module.parameters()).device != ids.device:
            self.module.to(ids.device)
        return self.module(input_ids=ids, attention_mask=batch["attention_mask"], **no_cache(self.module))


class Objective(nn.Module):
    name: ClassVar[str]
    head_kind: ClassVar[HeadKind] = "base"

    def __init__(self, backbone: Backbone, task: Task, max_length: int = 128):
        super().__init__()
        self.tokenizer = backbone.tokenizer
        self.max_length = max_length

    @classmethod
    def check_family(cls, family: str, config) -> None:
        """Raise UserError if this objective makes no sense for this kind of model (before weights load)."""

    @classmethod
    def check_task(cls, task: Task) -> None:
        """Raise UserError if this objective cannot be trained on this data (its labels alone: checked before
        the run directory exists when the data is built in)."""

    @classmethod
    def check(cls, backbone: Backbone, task: Task) -> None:
        """Raise UserError if this objective cannot be trained on this backbone and data."""
        cls.check_task(task)

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        raise NotImplementedError

    def metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {
                "acc": torchmetrics.classification.MulticlassAccuracy(
                    self.num_classes, average="micro", ignore_index=IGNORE
                ),
            }
        )

    def tokenize(self, texts: list[str], **kwargs) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt", **kwargs
        )


class NewHead(Objective):
    """An objective with a new task head on the base model's last hidden states (cls, tok): `logits` is the
    one forward they share, and what the NTK differentiates (`locality.instrument.ntk_profile`)."""

    head: nn.Module

    def head_input(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the head reads of the last hidden states [batch, tokens, width]: all of them here."""
        return hidden

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache(model)
        )[0]
        features = self.head_input(hidden, batch["attention_mask"])
        return self.head(features.to(self.head[-1].weight.dtype))  # a bf16 backbone feeds a float32 head


class LanguageModeling(Objective):
    """An objective that reuses the checkpoint's own LM head: its classes are the vocabulary."""

    def __init__(self, backbone: Backbone, task: Task, max_length: int = 128):
        super().__init__(backbone, task, max_length)
        self.vocab_size = backbone.model.get_output_embeddings().weight.shape[0]

    @property
    def num_classes(self) -> int:
        return self.vocab_size


FAMILY_POOLING = {"encoder": "first", "decoder": "last", "ssm": "mean", "rnn": "mean"}

"""Token classification with a new linear head: tag every token with the class of the word it belongs to.

Offline, the tags are the word classes of `locality.data.wordclass` (word / capitalized / identifier /
number / punct), derived from the text itself; sub-word tokens take their word's tag, special tokens
and whitespace are ignored in the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from locality.backbones import Backbone
from locality.core.errors import UserError
from locality.data.wordclass import TAGS, tag_spans
from locality.objectives.base import IGNORE, NewHead, StepOutput, Task


class TokenClassification(NewHead):
    name = "tok"
    head_kind = "base"

    def __init__(self, backbone: Backbone, task: Task, max_length: int = 64, head_dropout: float = 0.1):
        super().__init__(backbone, task, max_length)
        if not 0 <= head_dropout < 1:
            raise ValueError(f"head_dropout={head_dropout} must be in [0, 1).")
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(backbone.hidden_size, len(TAGS)))

    @classmethod
    def check(cls, backbone: Backbone, task: Task) -> None:
        if not backbone.tokenizer.is_fast:
            raise UserError(
                f"objective=tok needs a fast tokenizer (offsets), but '{backbone.name}' has a slow one."
            )

    @property
    def num_classes(self) -> int:
        return len(TAGS)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        texts = [e["text"] for e in examples]
        batch = self.tokenize(texts, return_offsets_mapping=True)
        offsets = batch.pop("offset_mapping")
        labels = torch.full_like(batch["input_ids"], IGNORE)
        for i, text in enumerate(texts):
            spans = tag_spans(text)
            j = 0
            for t, (start, end) in enumerate(offsets[i].tolist()):
                if end <= start or batch["attention_mask"][i, t] == 0:
                    continue
                while j < len(spans) and spans[j][1] <= start:
                    j += 1
                if j < len(spans) and spans[j][0] < end:
                    labels[i, t] = spans[j][2]
        batch["labels"] = labels
        return batch

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.logits(model, batch)
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE
        )
        return StepOutput(loss, logits.argmax(dim=-1), batch["labels"])

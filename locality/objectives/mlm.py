"""Masked language modelling with the checkpoint's own MLM head (encoders; BERT's 15% / 80-10-10 masking)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DataCollatorForLanguageModeling

from locality.backbones import Backbone
from locality.core.errors import UserError
from locality.objectives.base import LanguageModeling, StepOutput, Task


class MaskedLM(LanguageModeling):
    name = "mlm"
    head_kind = "masked_lm"

    def __init__(self, backbone: Backbone, task: Task, max_length: int = 128, mask_prob: float = 0.15):
        super().__init__(backbone, task, max_length)
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob={mask_prob} must be in (0, 1).")
        self.masker = DataCollatorForLanguageModeling(self.tokenizer, mlm=True, mlm_probability=mask_prob)

    @classmethod
    def check_family(cls, family: str, config) -> None:
        if family != "encoder":
            raise UserError(
                f"objective=mlm needs a bidirectional encoder, but this {config.model_type} model is a "
                f"{family} model. Use objective=clm (its native objective), cls or tok."
            )

    @classmethod
    def check(cls, backbone: Backbone, task: Task) -> None:
        super().check(backbone, task)
        if backbone.tokenizer.mask_token is None:
            raise UserError(
                f"objective=mlm needs a mask token, but the tokenizer of '{backbone.name}' has none."
            )

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenize([e["text"] for e in examples], return_special_tokens_mask=True)
        return self.masker.torch_call([{k: v[i] for k, v in batch.items()} for i in range(len(examples))])

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        return StepOutput(out.loss, target=batch["labels"], scores=out.logits)

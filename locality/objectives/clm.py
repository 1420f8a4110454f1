"""Causal language modelling with the checkpoint's own LM head (decoders, SSMs, RNNs)."""

from __future__ import annotations

import torch
from torch import nn

from locality.backbones import no_cache
from locality.core.errors import UserError
from locality.objectives.base import IGNORE, LanguageModeling, StepOutput


class CausalLM(LanguageModeling):
    name = "clm"
    head_kind = "causal_lm"

    @classmethod
    def check_family(cls, family: str, config) -> None:
        if family == "encoder":
            raise UserError(
                f"objective={cls.name} needs a causal model, but this {config.model_type} model is a "
                "bidirectional encoder. Use objective=mlm, cls or tok with encoders."
            )

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenize([e["text"] for e in examples])
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        return batch

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            **no_cache(model),
        )
        return StepOutput(out.loss, target=batch["labels"][:, 1:], scores=out.logits[:, :-1])

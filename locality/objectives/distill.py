"""Distillation to a perturbed copy of the pretrained model: an LM objective whose distance is known exactly.

The target at every position is the teacher distribution softmax(z_0 + alpha * xi), where z_0 are the frozen
pretrained model's next-token logits on the same input and xi is a fixed random logit perturbation: a
standard-normal vector over the vocabulary for each of `buckets` classes of the current input token
(token id mod `buckets`), drawn once from `xi_seed` (the same for every run seed, so seeds are replicates).
The loss is the exact KL(teacher || model) per predicted token, averaged. At initialization the model *is* the
pretrained model, so the step-0 loss is KL(teacher || pretrained) itself: a divergence with no entropy floor
(unlike cross-entropy on text, which includes the text's own entropy), 0 at alpha = 0 and growing with alpha
(about alpha^2 / 2 nats while small). `experiment=distance_dose` varies alpha and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from locality.backbones import Backbone, no_cache
from locality.core.errors import UserError
from locality.objectives.base import IGNORE, FrozenCopy, StepOutput, Task
from locality.objectives.clm import CausalLM


class Distill(CausalLM):
    name = "distill"
    head_kind = "causal_lm"
    loss_is_divergence = True  # the loss is KL(target || model): the step-0 loss is the objective distance
    target_entropy = 0.0  # ... and already the excess over the target's entropy (init.kl_excess = init.kl)

    def __init__(
        self,
        backbone: Backbone,
        task: Task,
        max_length: int = 128,
        alpha: float = 1.0,
        buckets: int = 16,
        xi_seed: int = 0,
    ):
        super().__init__(backbone, task, max_length)
        if not (alpha >= 0 and alpha < float("inf")):
            raise UserError(
                f"objective.alpha={alpha!r} must be a finite number >= 0 (the perturbation's scale)."
            )
        if buckets < 1:
            raise UserError(f"objective.buckets={buckets!r} must be >= 1.")
        self.alpha, self.buckets = float(alpha), int(buckets)
        generator = torch.Generator().manual_seed(xi_seed)
        self.register_buffer(
            "xi", torch.randn(self.buckets, self.vocab_size, generator=generator), persistent=False
        )
        self.teacher = FrozenCopy(backbone.model)  # the pretrained model with its LM head

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return self.tokenize([e["text"] for e in examples])

    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log softmax(z_0 + alpha * xi) at every position but the last, float32."""
        z0 = self.teacher(batch).logits[:, :-1]
        shift = self.xi[batch["input_ids"][:, :-1] % self.buckets]
        return torch.log_softmax(z0.float() + self.alpha * shift, dim=-1)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache(model)
        ).logits[:, :-1]
        target = self.teacher_logits(batch)
        scored = batch["attention_mask"][:, 1:].bool()  # positions whose next token exists
        log_p = torch.log_softmax(logits.float(), dim=-1)
        kl = F.kl_div(log_p[scored], target[scored], log_target=True, reduction="none").sum(-1)
        teacher_top = target.argmax(-1).masked_fill(~scored, IGNORE)
        return StepOutput(kl.mean(), target=teacher_top, scores=logits)

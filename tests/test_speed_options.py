"""Options that change only how fast or how lean a step runs: attention implementation, activation checkpointing
(the same gradients), float32 matmul precision."""

from __future__ import annotations

import pytest
import torch

from locality.backbones import load_backbone
from locality.core.config import ModelConf, load_option


def spec(**changes) -> ModelConf:
    return ModelConf(**{**load_option("model", "tiny_gpt2"), "init": "random", **changes})


def gradients(model_spec: ModelConf) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    backbone = load_backbone(model_spec, "causal_lm")
    model = backbone.model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_attention_implementation_is_applied():
    for choice in ("eager", "sdpa"):
        model = load_backbone(spec(attn_implementation=choice), "causal_lm").model
        assert model.config._attn_implementation == choice


def test_activation_checkpointing_changes_no_gradient():
    plain_loss, plain = gradients(spec(attn_implementation="eager"))
    checkpointed = spec(attn_implementation="eager", gradient_checkpointing=True)
    assert load_backbone(checkpointed, "causal_lm").model.is_gradient_checkpointing
    loss, grads = gradients(checkpointed)
    assert loss == pytest.approx(plain_loss, abs=1e-6) and grads.keys() == plain.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_matmul_precision_is_set_by_the_trainer(tmp_path):
    from omegaconf import OmegaConf

    from locality.run.rundir import RunDir
    from locality.run.trainer import build_trainer

    before = torch.get_float32_matmul_precision()
    try:
        cfg = OmegaConf.merge(load_option("trainer", "default"), {"matmul_precision": "high", "max_steps": 1})
        build_trainer(cfg, RunDir(tmp_path), [], False)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_compiled_blocks_train_and_measure_as_the_eager_ones(train):
    """`trainer.compile` compiles each block's forward (aot_eager here: dynamo and AOT autograd without a C++
    build); the capture hooks on the blocks still record, and every number matches the eager run."""
    from torch._dynamo.utils import counters

    run = [
        "model=tiny_gpt2",
        "model.init=random",
        "objective=cls",
        "objective.head_dropout=0.0",
        *[f"+model.config_overrides.{k}=0.0" for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")],
        "seed=21",  # a seed no other test uses
    ]
    torch._dynamo.reset()
    counters.clear()
    eager = train(*run)
    assert counters["stats"]["unique_graphs"] == 0
    compiled = train(*run, "trainer.compile=aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks' forwards went through dynamo
    assert compiled["run"]["name"] != eager["run"]["name"]
    for metric in ("cosine", "cosine_tokens", "cka_debiased", "weight_rel"):
        torch.testing.assert_close(compiled["change"][metric], eager["change"][metric], rtol=1e-4, atol=1e-9)
    assert compiled["final"]["loss"] == pytest.approx(eager["final"]["loss"], rel=1e-5)
    torch._dynamo.reset()

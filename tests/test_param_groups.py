"""One weight-decay rule for every family: decay linear/conv weight matrices, nothing else (issue 7)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from locality.backbones import load_backbone
from locality.core.config import ModelConf, load_option
from locality.data.sources import load_builtin
from locality.objectives import Task, build_objective, objective_class
from locality.run.module import LocalityModule
from locality.run.optim_groups import decay_split

WEIGHT_DECAY = 0.05

# preset: (objective, names that must decay, names that must not), named as in the HF model with its LM head
EXPECTED = {
    "tiny_gpt2": (
        "clm",
        [
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.0.attn.c_proj.weight",
            "transformer.h.3.mlp.c_fc.weight",
        ],
        [
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.h.0.attn.c_attn.bias",
            "transformer.h.0.ln_1.weight",
            "transformer.h.0.ln_1.bias",
            "transformer.ln_f.weight",
        ],
    ),
    "tiny_opt": (
        "clm",
        ["model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.0.fc1.weight"],
        [
            "model.decoder.embed_tokens.weight",
            "model.decoder.embed_positions.weight",
            "model.decoder.final_layer_norm.weight",
            "model.decoder.layers.0.self_attn_layer_norm.weight",
            "model.decoder.layers.0.fc1.bias",
        ],
    ),
    "tiny_pythia": (
        "clm",  # lm_head is Pythia's untied `embed_out` (renamed in transformers 5): a Linear
        [
            "lm_head.weight",
            "gpt_neox.layers.0.attention.query_key_value.weight",
            "gpt_neox.layers.0.mlp.dense_4h_to_h.weight",
        ],
        [
            "gpt_neox.embed_in.weight",
            "gpt_neox.final_layer_norm.weight",
            "gpt_neox.layers.0.input_layernorm.weight",
            "gpt_neox.layers.0.attention.dense.bias",
        ],
    ),
    "tiny_codegen": (
        "clm",
        ["lm_head.weight", "transformer.h.0.attn.qkv_proj.weight", "transformer.h.0.mlp.fc_in.weight"],
        [
            "transformer.wte.weight",
            "lm_head.bias",
            "transformer.ln_f.weight",
            "transformer.h.0.mlp.fc_in.bias",
        ],
    ),
    "tiny_bert": (
        "mlm",
        [
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.0.output.dense.weight",
            "cls.predictions.transform.dense.weight",
        ],
        [
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
            "bert.embeddings.LayerNorm.weight",
            "bert.encoder.layer.0.output.LayerNorm.weight",
            "cls.predictions.bias",
            "cls.predictions.transform.LayerNorm.weight",
        ],
    ),
    "tiny_roberta": (
        "mlm",
        ["roberta.encoder.layer.0.attention.self.key.weight", "lm_head.dense.weight"],
        [
            "roberta.embeddings.word_embeddings.weight",
            "roberta.embeddings.position_embeddings.weight",
            "roberta.embeddings.LayerNorm.weight",
            "lm_head.layer_norm.weight",
            "lm_head.bias",
        ],
    ),
    "tiny_mamba": (
        "clm",
        [
            "backbone.layers.0.mixer.in_proj.weight",
            "backbone.layers.0.mixer.out_proj.weight",
            "backbone.layers.0.mixer.x_proj.weight",
            "backbone.layers.0.mixer.conv1d.weight",
        ],
        [
            "backbone.layers.0.mixer.A_log",
            "backbone.layers.0.mixer.D",
            "backbone.embeddings.weight",
            "backbone.norm_f.weight",
            "backbone.layers.0.norm.weight",
            "backbone.layers.0.mixer.conv1d.bias",
            "backbone.layers.0.mixer.dt_proj.bias",
        ],
    ),
    "tiny_rwkv": (
        "clm",
        ["rwkv.blocks.0.attention.key.weight", "rwkv.blocks.0.feed_forward.value.weight", "head.weight"],
        [
            "rwkv.blocks.0.attention.time_decay",
            "rwkv.blocks.0.attention.time_first",
            "rwkv.blocks.0.attention.time_mix_key",
            "rwkv.blocks.0.attention.time_mix_value",
            "rwkv.blocks.0.feed_forward.time_mix_key",
            "rwkv.blocks.0.pre_ln.weight",
            "rwkv.embeddings.weight",
            "rwkv.ln_out.weight",
        ],
    ),
}


@pytest.fixture(scope="module")
def splits():
    return load_builtin("stdlib_docs", 16, 16)


def build(preset: str, objective: str, splits, controls=()) -> LocalityModule:
    backbone = load_backbone(
        ModelConf(**load_option("model", preset)),
        head=objective_class(load_option("objective", objective), "decoder").head_kind,
    )
    head = build_objective(
        OmegaConf.merge(load_option("objective", objective), {"max_length": 128}),
        backbone,
        Task(tuple(splits.label_names)),
    )
    optim = instantiate(load_option("optim", "adamw"), weight_decay=WEIGHT_DECAY)
    return LocalityModule(backbone, head, optim, controls=controls)


def decay_by_name(module: LocalityModule) -> dict[str, float]:
    """Each trainable parameter (named as in the HF model, or `objective.…`) -> its group's weight decay."""
    groups = module.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert set(ids) == trainable, "every trainable parameter is in exactly one group"
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    return {
        name.removeprefix("model."): decay_of[id(p)]  # every name of a tied parameter
        for name, p in module.named_parameters(remove_duplicate=False)
        if p.requires_grad
    }


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_one_decay_rule_for_every_family(preset, splits):
    objective, decayed, not_decayed = EXPECTED[preset]
    module = build(preset, objective, splits)
    decay = decay_by_name(module)
    assert {n: decay[n] for n in decayed} == dict.fromkeys(decayed, WEIGHT_DECAY)
    assert {n: decay[n] for n in not_decayed} == dict.fromkeys(not_decayed, 0.0)
    # the whole rule, by module type: every norm, embedding and bias is free; exactly the linear weights decay
    for module_name, sub in module.model.named_modules():
        for attr, param in sub.named_parameters(prefix=module_name, recurse=False):
            kind = type(sub).__name__
            if "Norm" in kind or isinstance(sub, nn.Embedding) or attr.endswith("bias"):
                assert decay[attr] == 0.0, attr
            elif isinstance(sub, nn.Linear | nn.Conv1d) or kind == "Conv1D":
                tied = param is module.model.get_input_embeddings().weight
                assert decay[attr] == (0.0 if tied else WEIGHT_DECAY), attr
            else:  # parameters owned by other module types (RWKV time_*, Mamba A_log / D)
                assert decay[attr] == 0.0, attr


def test_tied_lm_head_is_an_embedding(splits):
    module = build("tiny_gpt2", "clm", splits)
    head = module.model.get_output_embeddings().weight
    assert head is module.model.get_input_embeddings().weight
    (no_decay,) = [g for g in module.param_groups() if any(p is head for p in g["params"])]
    assert no_decay["weight_decay"] == 0.0


def test_task_head_follows_the_rule_and_frozen_parameters_are_left_out(splits):
    module = build("tiny_gpt2", "cls", splits)
    module.blocks[0].requires_grad_(False)
    decay = decay_by_name(module)
    assert decay["objective.head.1.weight"] == WEIGHT_DECAY and decay["objective.head.1.bias"] == 0.0
    assert decay["h.1.attn.c_attn.weight"] == WEIGHT_DECAY and decay["wte.weight"] == 0.0
    assert not any(name.startswith("h.0.") for name in decay)


def test_marked_no_weight_decay_and_tie_order():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 10, bias=False)  # registered first, tied to the embedding below
            self.emb = nn.Embedding(10, 4)
            self.emb.weight = self.head.weight
            self.proj = nn.Linear(4, 4)
            self.conv = nn.Conv2d(1, 1, 3)
            self.scale = nn.Parameter(torch.ones(4))

    toy = Toy()
    toy.proj.weight._no_weight_decay = True  # how Mamba marks A_log and D
    decay, no_decay = decay_split(toy)
    assert list(decay) == ["conv.weight"]
    assert sorted(no_decay) == ["conv.bias", "head.weight", "proj.bias", "proj.weight", "scale"]


def test_a_module_with_nothing_left_to_train_is_refused_by_name(splits):
    """Whatever froze it (a custom control, a combination the checks do not know), an optimizer over no
    parameter is a user error naming the controls, not torch's "empty parameter list"."""
    from locality.controls.base import Control
    from locality.core.errors import UserError

    class FreezeAll(Control):
        name = "freeze_all"

        def configure_model(self, module) -> None:
            module.requires_grad_(False)

    module = build("tiny_gpt2", "clm", splits, controls=[FreezeAll()])
    FreezeAll().configure_model(module)
    with pytest.raises(UserError, match=r"Nothing is left to train: the controls \(freeze_all\) froze every"):
        module.param_groups()

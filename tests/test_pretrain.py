"""Offline pretraining of the tiny presets (locality.pretrain): it learns, it is cached under a key that covers
everything that determines it, fine-tuning loads it (base only for new heads), and its text is never fine-tuning
data. Pretraining runs $LOCALITY_PRETRAIN_STEPS steps (tests/conftest.py keeps that small)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from locality.backbones import load_backbone, load_tokenizer
from locality.backbones import pretrained as pretrain_module
from locality.backbones.pretrained import (
    STEPS_ENV,
    cache_key,
    key_material,
    pretrained_checkpoint,
    settings,
)
from locality.core.config import ModelConf, load_option
from locality.core.errors import UserError
from locality.data.corpus import (
    finetuning_docstrings,
    pretraining_texts,
    pydoc_paragraphs,
    stdlib_docstrings,
)
from locality.data.sources import load_builtin
from locality.pretrain import main as pretrain_main


def spec(preset: str, **changes) -> ModelConf:
    return ModelConf(**{**load_option("model", preset), **changes})


def key_of(model: ModelConf, head: str = "causal_lm") -> str:
    return cache_key(key_material(model, load_tokenizer(model, None), head, settings(model)))


def test_pretraining_lowers_heldout_loss(monkeypatch):
    monkeypatch.setenv(STEPS_ENV, "40")
    model = spec("tiny_gpt2")
    model.pretrain.seq_len = 64
    _, info = pretrain_module.pretrain(model, load_tokenizer(model, None), "causal_lm", settings(model))
    assert info["steps"] == len(info["losses"]) == 40
    assert info["heldout_before"] == pytest.approx(
        torch.log(torch.tensor(4096.0)).item(), abs=0.1
    )  # ~ln(vocab)
    assert info["heldout_after"] < info["heldout_before"] - 1.0
    assert sum(info["losses"][-5:]) < sum(info["losses"][:5]) - 5.0


def test_masked_lm_pretraining_masks_15_percent_of_ordinary_tokens():
    tokenizer = load_tokenizer(spec("tiny_bert"), None)
    blocks, _ = pretrain_module.corpus_blocks(tokenizer, 64, masked=True)
    assert (blocks[:, 0] == tokenizer.cls_token_id).all() and (blocks[:, -1] == tokenizer.sep_token_id).all()
    inputs, labels = pretrain_module.mask_tokens(
        blocks[:200], tokenizer, 0.15, torch.Generator().manual_seed(0)
    )
    scored = labels != -100
    special = torch.isin(blocks[:200], torch.tensor(tokenizer.all_special_ids))
    assert not (scored & special).any()
    assert 0.13 < scored.sum() / (~special).sum() < 0.17
    assert 0.75 < (inputs[scored] == tokenizer.mask_token_id).float().mean() < 0.85
    assert torch.equal(inputs[~scored], blocks[:200][~scored])


def test_cache_key_covers_what_determines_the_weights(monkeypatch):
    monkeypatch.delenv(STEPS_ENV)  # the knob replaces model.pretrain.steps
    base = spec("tiny_gpt2")
    key = key_of(base)
    assert key.startswith("gpt2-") and key == key_of(spec("tiny_gpt2"))
    assert key == key_of(spec("tiny_gpt2", name="my_copy"))  # the name is a label, not a determinant
    changed = [
        spec("tiny_gpt2", config_overrides={"n_layer": 3, "n_embd": 64, "n_head": 4, "n_positions": 256}),
        spec("tiny_gpt2", tokenizer="sentence-transformers/all-MiniLM-L6-v2"),
        *(
            spec("tiny_gpt2", pretrain=dataclasses.replace(base.pretrain, **{field: value}))
            for field, value in (("steps", 9), ("lr", 1e-3), ("seed", 1), ("batch_size", 4), ("seq_len", 64))
        ),
    ]
    keys = {key, *(key_of(s) for s in changed), key_of(base, head="masked_lm")}
    assert len(keys) == len(changed) + 2
    monkeypatch.setenv(STEPS_ENV, "7")
    assert key_of(base) not in keys  # the step-count knob is part of the key


def test_second_load_hits_the_cache_and_a_crash_leaves_no_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALITY_CACHE", str(tmp_path))
    model = spec("tiny_gpt2")
    tokenizer = load_tokenizer(model, None)

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt  # killed while writing the entry

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrained_checkpoint(model, tokenizer, "decoder")
    monkeypatch.undo()
    monkeypatch.setenv("LOCALITY_CACHE", str(tmp_path))
    root = tmp_path / "pretrained"

    def entries() -> list[str]:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != ".locks")

    (left,) = entries()
    assert left.startswith(".") and left.endswith(".tmp")  # no entry, only a temp dir

    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first = pretrained_checkpoint(model, tokenizer, "decoder")
    assert torch.equal(torch.get_rng_state(), rng)  # pretraining does not touch the global RNG
    assert first.trained_now and first.info["heldout_after"] < first.info["heldout_before"]
    assert entries() == [first.key]  # the stale temp dir is gone

    def no_training(*_args, **_kwargs):
        raise AssertionError("pretrained again despite a cached checkpoint")

    monkeypatch.setattr(pretrain_module, "pretrain", no_training)
    second = pretrained_checkpoint(model, tokenizer, "decoder")
    assert not second.trained_now and second.path == first.path and second.key == first.key
    backbone = load_backbone(model, head="causal_lm")
    assert backbone.init_from == f"pretrained:{first.key}"


def test_a_damaged_cache_entry_is_pretrained_again(monkeypatch, tmp_path):
    """A flipped bit in a cached model.safetensors (still loads) changed results by up to 4.9 while init_from
    still vouched for it; the entry's checksums now send it back to pretraining."""
    monkeypatch.setenv("LOCALITY_CACHE", str(tmp_path))
    model = spec("tiny_gpt2")
    tokenizer = load_tokenizer(model, None)
    first = pretrained_checkpoint(model, tokenizer, "decoder", log=lambda _: None)
    assert set(first.info["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    weights = first.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x04
    weights.write_bytes(bytes(data))
    said = []
    again = pretrained_checkpoint(model, tokenizer, "decoder", log=said.append)
    assert again.trained_now and again.key == first.key and "failed its checksums" in said[0]
    assert not pretrained_checkpoint(model, tokenizer, "decoder", log=lambda _: None).trained_now


def test_a_damaged_capture_cache_entry_is_a_miss(tmp_path):
    from locality.instrument.capture import load_cached, save_cached

    path = tmp_path / "capture.pt"
    features = [torch.randn(8, 4), torch.randn(8, 4)]
    save_cached(path, features)
    assert all(torch.equal(a, b) for a, b in zip(load_cached(path, (2, 8)), features, strict=True))
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01  # inside the last tensor's data: it would load with one value changed
    path.write_bytes(bytes(data))
    assert load_cached(path, (2, 8)) is None


def test_random_and_pretrained_init_differ_and_say_so():
    pretrained = load_backbone(spec("tiny_gpt2"), head="causal_lm")
    torch.manual_seed(0)
    random = load_backbone(spec("tiny_gpt2", init="random"), head="causal_lm")
    assert pretrained.pretrained and pretrained.init_from.startswith("pretrained:gpt2-")
    assert not random.pretrained and random.init_from == "random"
    weights = dict(random.model.named_parameters())
    assert all(
        not torch.equal(p, weights[name]) for name, p in pretrained.model.named_parameters() if p.ndim == 2
    )


@pytest.mark.parametrize(
    ("preset", "lm_class", "head"),
    [("tiny_bert", AutoModelForMaskedLM, "masked_lm"), ("tiny_pythia", AutoModelForCausalLM, "causal_lm")],
)
def test_new_heads_load_the_base_and_lm_objectives_the_pretrained_head(preset, lm_class, head):
    model = spec(preset)
    key = load_backbone(model, head=head).init_from.removeprefix("pretrained:")
    saved = lm_class.from_pretrained(pretrain_module.cache_root() / key)
    saved_state = saved.state_dict()

    base = load_backbone(model, head="base")  # cls / tok: the base model only
    assert type(base.model) is type(saved.base_model) and base.init_from == f"pretrained:{key}"
    prefix = saved.base_model_prefix + "."
    for name, tensor in base.model.state_dict().items():
        if prefix + name in saved_state:
            assert torch.equal(tensor, saved_state[prefix + name]), name

    with_head = load_backbone(model, head=head)  # clm / mlm: the pretrained LM head too
    for name, tensor in with_head.model.state_dict().items():
        assert torch.equal(tensor, saved_state[name]), name
    head_names = [n for n in saved_state if not n.startswith(prefix)]
    assert head_names  # there is a head, and it was compared above


def test_pretraining_text_is_never_finetuning_data():
    pretraining = set(pretraining_texts())
    splits = load_builtin("stdlib_docs", 128, 256)
    finetuning = [e["text"] for part in (splits.train, splits.validation, splits.probe) for e in part]
    assert pretraining.isdisjoint(finetuning)
    assert pretraining.isdisjoint(doc for _, doc in finetuning_docstrings())
    joined = "\n\0".join(pretraining)
    assert not any(text in joined for text in finetuning[:300])  # nor inside a pretraining text
    # the rule splits the docstrings, it does not drop any: pretraining = pydoc + the rest of the docstrings
    everything = {doc for _, doc in stdlib_docstrings()}
    assert pretraining == set(pydoc_paragraphs()) | (everything - {doc for _, doc in finetuning_docstrings()})
    assert 0.15 < 1 - len(finetuning_docstrings()) / len(everything) < 0.35


def test_invalid_init_is_refused(train):
    with pytest.raises(UserError, match="model.init='nonsense'"):
        spec("tiny_gpt2", init="nonsense")
    with pytest.raises(UserError, match="pretrained, random"):
        train("model=tiny_gpt2", "model.init=nonsense")
    with pytest.raises(UserError, match="model.init=random applies to presets built from a config"):
        spec("minilm", init="random")


def test_cli_pretrains_once_then_reports_the_cache(capsys):
    assert pretrain_main(["model=tiny_opt"]) == 0
    assert pretrain_main(["model=tiny_opt"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "cached (no pretraining)" in out and "init_from: pretrained:opt-" in out
    assert pretrain_main(["model=minilm"]) == 2
    assert pretrain_main([]) == 2


def test_mini_matrix_is_every_family_at_two_sizes_from_pretrained_checkpoints():
    from hydra import compose, initialize_config_dir

    from locality.core.paths import conf_dir
    from locality.plan import plan

    runs = plan(["experiment=mini_matrix"])
    assert len(runs) == 112 and len({r.run_dir for r in runs}) == 112
    assert not [r.problem for r in runs if r.problem]
    small = {
        "tiny_gpt2",
        "tiny_opt",
        "tiny_pythia",
        "tiny_codegen",
        "tiny_bert",
        "tiny_roberta",
        "tiny_mamba",
        "tiny_rwkv",
    }
    models = {r.model for r in runs}
    assert small <= models and len(models - small) == 6 and all(m.endswith("_l") for m in models - small)
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=mini_matrix"], return_hydra_config=True)
    assert cfg.hydra.launcher.n_jobs == 2 and "joblib" in cfg.hydra.launcher._target_
    assert cfg.model.init == "pretrained" and cfg.logger._target_ == "locality.run.loggers.csv_logger"

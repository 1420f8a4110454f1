"""The measurement pipeline inside a real run: capture, cache, step-0 distance, optional analyses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locality.backbones import load_backbone
from locality.core.config import ModelConf, load_option
from locality.instrument.capture import block_hooks, capture
from locality.instrument.drop_top import without_top_blocks


def test_results_follow_the_schema(train):
    r = train("model=tiny_opt", "objective=cls")
    assert r["schema"] == "locality.results/1"
    assert set(r["run"]) == {
        "name",
        "model",
        "family",
        "block_type",
        "scale_band",
        "objective",
        "control",
        "seed",
        "n_params",
        "n_layers",
        "steps",
        "wall_s",
        "init_from",
        "config_hash",
        "setting_hash",
        "sweep",
        "versions",
        "data",
        "resumed_from_steps",
        "did_not_train",
        "stopped_early",
    }
    n = r["run"]["n_layers"]
    assert r["depth"] == [i / n for i in range(n + 1)]
    for metric in ("cosine", "cosine_tokens", "cka_linear", "cka_debiased", "procrustes", "weight_rel"):
        assert len(r["change"][metric]) == n + 1
        assert {"slope", "slope_ci", "slope_per_layer", "steepness", "width", "width_count"} <= set(
            r["profile"][metric]
        )
    assert len(r["init"]["grad_rel"]) == n and all(g > 0 for g in r["init"]["grad_rel"])
    assert {"loss", "acc", "f1", "kl", "kl_norm"} <= set(r["init"]) and {"loss", "acc", "f1"} <= set(
        r["final"]
    )
    assert len(r["features"]["norm_ratio"]) == n + 1


def test_capture_layer_zero_is_the_embedding_output_and_last_is_the_last_block():
    backbone = load_backbone(ModelConf(**load_option("model", "tiny_gpt2")))
    batch = backbone.tokenizer(
        ["one short text", "and a second, longer text here"], padding=True, return_tensors="pt"
    )
    feats = capture(backbone.base, backbone.blocks, [batch], pooling="first")
    assert backbone.base.training  # capture restores the mode it found
    backbone.base.eval()
    with torch.no_grad():
        out = backbone.base(**batch, output_hidden_states=True)
    assert len(feats) == 5
    torch.testing.assert_close(feats[0], out.hidden_states[0][:, 0])  # GPT-2: hidden_states[0] = embeddings
    torch.testing.assert_close(feats[2], out.hidden_states[2][:, 0])
    tokens = capture(backbone.base, backbone.blocks, [batch], pooling="tokens", k_tokens=3)
    assert tokens[0].shape == (6, 64)


def test_hooks_are_removed_even_when_the_forward_raises():
    backbone = load_backbone(ModelConf(**load_option("model", "tiny_gpt2")))
    sink = [None] * 5
    with pytest.raises(RuntimeError, match="boom"), block_hooks(backbone.blocks, sink):
        raise RuntimeError("boom")
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in backbone.blocks)


def test_token_pooling_resamples_whole_sequences(train):
    r = train("model=tiny_gpt2", "objective=cls", "measure.pooling=tokens", "measure.token_positions=4")
    lo, hi = r["profile"]["cosine"]["slope_ci"]
    assert lo < hi


@pytest.mark.slow  # 35 s on 2 cores: a tiny_pythia pretraining and an 8-token-per-probe capture
def test_cross_layer_cka_matrices_and_heatmap(train, tmp_path):
    r = train("model=tiny_pythia", "objective=cls", "measure.cross_layer=true")
    for name in ("pretrained", "finetuned"):
        m = np.asarray(r["cross_layer"][name])
        assert m.shape == (5, 5) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    # the paper's rows: token_positions (8) random non-pad tokens of every probe sequence
    assert (
        r["cross_layer"]["pooling"] == "tokens"
        and r["cross_layer"]["n_rows"] == 8 * r["run"]["data"]["n_probe"]
    )
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "cross_layer_cka.png").stat().st_size > 1000
    assert set(np.load(run_dir / "cross_layer_cka.npz")) == {"pretrained", "finetuned"}


def test_drop_top_k_evaluates_every_k_and_restores_the_model(train):
    r = train("model=tiny_gpt2", "objective=cls", "measure.drop_top_k=2")
    assert [row["k"] for row in r["drop_top_k"]] == [0, 1, 2]
    assert r["drop_top_k"][0]["loss"] == pytest.approx(r["final"]["loss"])
    backbone = load_backbone(ModelConf(**load_option("model", "tiny_gpt2")))
    with without_top_blocks(backbone, 3):
        assert len(backbone.base.h) == 1
    assert len(backbone.base.h) == 4 and backbone.base.h is backbone.blocks


def test_dynamics_captures_during_training(train):
    r = train("model=tiny_gpt2", "objective=clm", "trainer.max_steps=4", "measure.every_n_steps=2")
    assert [entry["step"] for entry in r["dynamics"]] == [2, 4]
    assert all(len(entry["cosine"]) == 5 for entry in r["dynamics"])


def test_hub_dataset_format_from_local_files_through_the_cli(train, tmp_path):
    import pandas as pd

    rows = [
        {"sentence": f"this film is {'great' if i % 2 else 'awful'} ({i})", "label": i % 2, "idx": i}
        for i in range(160)
    ]
    pd.DataFrame(rows[:100]).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(rows[100:]).to_parquet(tmp_path / "validation.parquet")
    r = train(
        "model=tiny_bert",
        "objective=cls",
        "data=sst2",
        "data.path=parquet",
        "data.subset=null",
        f"+data.data_files={{train: {tmp_path}/train.parquet, validation: {tmp_path}/validation.parquet}}",
        "measure.n_probe=32",
        "data.n_validation=16",
    )
    assert r["run"]["steps"] == 2 and r["run"]["data"]["n_validation"] == 16
    assert r["run"]["data"]["label_names"] == ["0", "1"] and 0 <= r["final"]["acc"] <= 1
    assert r["final"]["acc"] * 16 == pytest.approx(
        round(r["final"]["acc"] * 16)
    )  # a count out of 16 examples


def test_saved_model_loads_through_model_hf(train, tmp_path):
    torch.manual_seed(0)
    saved = load_backbone(ModelConf(**load_option("model", "tiny_codegen")), head="causal_lm")
    saved.model.save_pretrained(tmp_path / "ckpt")
    saved.tokenizer.save_pretrained(tmp_path / "ckpt")
    r = train("model=hf", f"model.name_or_path={tmp_path}/ckpt", "objective=clm")
    assert r["run"]["block_type"] == "parallel" and r["run"]["n_layers"] == 4 and r["run"]["model"] == "hf"
    assert r["run"]["init_from"] == f"local:{(tmp_path / 'ckpt').resolve()}"

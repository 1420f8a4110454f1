"""The paper's definitions as first-class results (issue 8 §1): cosine_tokens, width_count, slope_per_layer,
steepness over blocks, init.kl / kl_norm, and intervals that cover (jackknife for the plug-in metrics)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.stats
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from locality.backbones import load_backbone
from locality.core.config import ModelConf, load_option
from locality.data.sources import load_builtin
from locality.instrument.capture import block_hooks, capture, capture_token_change, pretrained_parameters
from locality.instrument.init_distance import fit_linear_probe, objective_distance, target_nll
from locality.measure import (
    bootstrap_indices,
    interval_method,
    jackknife_changes,
    jackknife_groups,
    jackknife_interval,
    layer_changes,
    linear_cka,
    procrustes_distance,
    profile_stats,
    slope_per_layer,
    steepness,
    token_change,
    width_count,
)
from locality.measure.weights import snapshot_blocks, snapshot_parameters
from locality.objectives import Task, build_objective, objective_class
from locality.run.module import LocalityModule

DEPTH = [i / 6 for i in range(7)]


def _spec(preset: str) -> ModelConf:
    """A tiny preset with random init: these tests need a model, not the offline-pretrained checkpoint."""
    spec = load_option("model", preset)
    spec.init = "random"
    return ModelConf(**spec)


# ----------------------------------------------------------------------------------------- cosine_tokens


@pytest.fixture(scope="module")
def gpt2_pair():
    """A tiny GPT-2, its pretrained snapshot, an unchanged copy, and then its weights perturbed ("fine-tuned")."""
    torch.manual_seed(0)
    backbone = load_backbone(_spec("tiny_gpt2"))
    snapshot = snapshot_parameters(backbone.base)
    pretrained = copy.deepcopy(backbone.base)
    with torch.no_grad():
        for i, p in enumerate(backbone.base.parameters()):
            p.add_((0.002 * (1 + i % 3)) * torch.randn_like(p))
    return backbone, snapshot, pretrained


TEXTS = [
    "a b",
    "one short text here",
    "and a second, much longer text with many words in it, to pad the rest",
    "x",
    "def f(x): return x + 1",
    "import os",
]


def _token_states(model, blocks, tokenizer, text):
    sink = [None] * (len(blocks) + 1)
    model.eval()
    with block_hooks(blocks, sink), torch.no_grad():
        model(**tokenizer([text], return_tensors="pt"))
    return [s[0].double() for s in sink]


def test_cosine_tokens_equals_brute_force_per_token_on_right_padded_batches(gpt2_pair):
    backbone, snapshot, pretrained = gpt2_pair
    tok = backbone.tokenizer
    assert tok.padding_side == "right"
    batches = [
        dict(tok(TEXTS[:3], padding=True, return_tensors="pt")),  # different lengths, right-padded
        dict(tok(TEXTS[3:], padding=True, return_tensors="pt")),
    ]
    assert (batches[0]["attention_mask"] == 0).any() and (batches[1]["attention_mask"] == 0).any()
    before = {k: v.clone() for k, v in backbone.base.state_dict().items()}
    pooled, sums, counts = capture_token_change(
        backbone.base, backbone.blocks, batches, snapshot, pooling="mean"
    )
    # the pooled features are capture()'s, and the fine-tuned weights are untouched by the pretrained pass
    for a, b in zip(pooled, capture(backbone.base, backbone.blocks, batches, pooling="mean"), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in backbone.base.state_dict().items())
    assert backbone.base.training  # mode restored

    # brute force: every text alone (no padding), pretrained copy vs fine-tuned, 1 - cos per token
    per_seq, lengths = [], []
    for text in TEXTS:
        pre = _token_states(pretrained, pretrained.h, tok, text)
        post = _token_states(backbone.base, backbone.blocks, tok, text)
        per_seq.append(
            [
                float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).sum())
                for a, b in zip(pre, post, strict=True)
            ]
        )
        lengths.append(pre[0].shape[0])
    per_seq = np.asarray(per_seq)
    assert counts.tolist() == lengths
    np.testing.assert_allclose(sums.numpy(), per_seq, rtol=1e-4, atol=1e-9)
    change = token_change(sums, counts, n_boot=0)
    expected = per_seq.sum(0) / sum(lengths)  # mean over ALL tokens, not a mean of per-sequence means
    np.testing.assert_allclose(change.values, expected, rtol=1e-4)
    assert all(v > 0 for v in change.values)
    assert not np.allclose(expected, (per_seq / np.asarray(lengths)[:, None]).mean(0), rtol=1e-3)


def test_cosine_tokens_is_zero_for_unchanged_weights(gpt2_pair):
    backbone, snapshot, pretrained = gpt2_pair
    batches = [dict(backbone.tokenizer(TEXTS, padding=True, return_tensors="pt"))]
    _, sums, counts = capture_token_change(pretrained, pretrained.h, batches, snapshot)
    assert float(sums.abs().max()) < 1e-6 and counts.sum() > len(TEXTS)


def test_pretrained_parameters_see_through_in_place_lora(gpt2_pair):
    from peft import LoraConfig, inject_adapter_in_model

    _, snapshot, pretrained = gpt2_pair
    adapted = copy.deepcopy(pretrained)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["c_attn"]), adapted)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter
    params = pretrained_parameters(adapted, snapshot)
    assert all(float(v.abs().max()) == 0 for k, v in params.items() if "lora_B" in k)
    batches = [dict(gpt2_pair[0].tokenizer(TEXTS[:2], padding=True, return_tensors="pt"))]
    _, sums, _ = capture_token_change(adapted, adapted.h, batches, snapshot)
    assert float(sums[:, 1:].min()) > 1e-4  # the adapter changed the blocks' outputs
    extra = copy.deepcopy(pretrained)
    extra.register_parameter("new_scale", torch.nn.Parameter(torch.ones(1)))
    with pytest.raises(ValueError, match="no pretrained value"):
        pretrained_parameters(extra, snapshot)


def test_weight_rel_reference_shares_the_parameter_snapshot(gpt2_pair):
    backbone, snapshot, _ = gpt2_pair
    shared = snapshot_blocks(backbone.blocks, backbone.base, snapshot)
    plain = snapshot_blocks(backbone.blocks)
    assert [sorted(b) for b in shared] == [sorted(b) for b in plain]
    key = next(iter(shared[0]))
    assert shared[0][key].data_ptr() == snapshot[f"h.0.{key}"].data_ptr()  # no second float32 copy


def test_cosine_tokens_bootstrap_resamples_whole_sequences():
    g = torch.Generator().manual_seed(3)
    counts = torch.randint(1, 20, (25,), generator=g)
    sums = torch.rand(25, 4, generator=g, dtype=torch.float64) * counts[:, None]
    change = token_change(sums, counts, n_boot=40, seed=7)
    assert change.replicates.shape == (40, 4)
    drawn = bootstrap_indices(25, 40, 7)
    for b in (0, 5, 39):
        rows = drawn[b]
        expected = sums[rows].sum(0) / counts[rows].sum()  # the token-weighted mean of the drawn sequences
        np.testing.assert_allclose(change.replicates[b], expected.numpy(), rtol=1e-12)
    np.testing.assert_allclose(change.values, (sums.sum(0) / counts.sum()).numpy(), rtol=1e-12)


def test_cosine_tokens_replicates_line_up_with_the_other_metrics():
    # one token per sequence whose distance is the pooled cosine: the same draws give the same replicates
    g = torch.Generator().manual_seed(4)
    pre = [torch.randn(30, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    post = [x + 0.3 * torch.randn(30, 6, generator=g, dtype=torch.float64) for x in pre]
    pooled = layer_changes(pre, post, metrics=["cosine"], n_boot=20, seed=5)
    per_example = torch.stack(
        [1 - torch.nn.functional.cosine_similarity(x, y, dim=1) for x, y in zip(pre, post, strict=True)], 1
    )
    tokens = token_change(per_example, torch.ones(30), n_boot=20, seed=5)
    np.testing.assert_allclose(tokens.replicates, pooled["cosine"].replicates, atol=1e-12)
    # token pooling groups rows by sequence: its units are the same 30 sequences, so the same draws
    grouped = layer_changes(
        [x.repeat_interleave(2, 0) for x in pre],
        [y.repeat_interleave(2, 0) for y in post],
        metrics=["cosine"],
        n_boot=20,
        seed=5,
        groups=torch.arange(30).repeat_interleave(2),
    )
    np.testing.assert_allclose(tokens.replicates, grouped["cosine"].replicates, atol=1e-12)


def test_token_change_validates_its_inputs():
    with pytest.raises(ValueError, match="one token count per sequence"):
        token_change(torch.ones(4, 3), torch.ones(5))
    with pytest.raises(ValueError, match="cosine_tokens needs per-token states"):
        layer_changes([torch.ones(4, 2)], [torch.ones(4, 2)], metrics=["cosine_tokens"])


# ----------------------------------------------------------------------------------- profile statistics


def test_width_count_on_a_known_profile():
    profile = [0.0, 0.02, 0.05, 0.11, 0.2, 0.35, 0.5]
    assert width_count(profile, 0.1) == 4
    assert width_count(profile, 0.2) == 2  # strictly above the threshold
    assert width_count(profile, 0.6) == 0
    assert width_count([None, 0.3, float("nan"), 0.05], 0.1) == 1  # undefined layers are not counted
    assert width_count([None, None]) is None
    stats = profile_stats(DEPTH, profile, width_threshold=0.1)
    assert stats["width_count"] == 4 and stats["width_threshold"] == 0.1
    assert stats["width"] == pytest.approx(2 / 7)  # >= 0.25: layers 5, 6


def test_slope_per_layer_is_the_slope_against_the_layer_index():
    values = [0.1 + 0.03 * layer for layer in range(7)]
    assert slope_per_layer(values) == pytest.approx(0.03, abs=1e-14)
    stats = profile_stats(DEPTH, values)
    assert stats["slope"] == pytest.approx(0.18, abs=1e-14)  # = 6 layers * 0.03 per unit depth
    assert stats["slope_per_layer"] == pytest.approx(stats["slope"] / 6, abs=1e-14)
    assert slope_per_layer([None, 1.0, 3.0, 5.0]) == pytest.approx(2.0)  # layer 0 undefined (weight_rel)


def test_steepness_over_blocks_is_insensitive_to_the_floor_when_layer_zero_barely_changes():
    blocks = [0.01 * math.exp(0.5 * layer) for layer in range(1, 7)]  # e^3 growth over depth 1/6..1
    profile = [1e-9, *blocks]  # embeddings ~ unchanged, as after fine-tuning
    rates = [steepness(DEPTH, profile, floor=f) for f in (1e-2, 1e-3, 1e-6)]
    assert rates == pytest.approx([3.0, 3.0, 3.0], abs=1e-12)
    old = [steepness(DEPTH, profile, floor=f, blocks_only=False) for f in (1e-2, 1e-6)]
    assert old[1] - old[0] > 3  # the former all-layer fit moved with the floor
    assert profile_stats(DEPTH, profile)["steepness"] == pytest.approx(3.0, abs=1e-12)
    # a block with zero change keeps the floor: finite, and then it does depend on it
    assert math.isfinite(steepness(DEPTH, [0.0, 0.0, *blocks[1:]]))


# ------------------------------------------------------------------------------------ jackknife intervals


def test_jackknife_interval_by_hand():
    depth = [0.0, 0.5, 1.0]
    values = [0.0, 0.5, 1.0]  # slope 1
    loo_slopes = np.array([0.90, 1.00, 0.95, 1.05])
    leave_out = np.stack([[0.0, 0.5 * s, s] for s in loo_slopes])
    (lo, hi), corrected = jackknife_interval(depth, values, leave_out, ci=0.9)
    pseudo = 4 * 1.0 - 3 * loo_slopes
    t_95_3 = scipy.stats.t.ppf(0.95, 3)
    assert t_95_3 == pytest.approx(2.3533634, abs=1e-6)  # tabulated
    half = t_95_3 * pseudo.std(ddof=1) / 2
    assert corrected == pytest.approx(pseudo.mean(), abs=1e-12)
    assert [lo, hi] == pytest.approx([pseudo.mean() - half, pseudo.mean() + half], abs=1e-12)
    stats = profile_stats(depth, values, method="jackknife", jackknife=leave_out, ci=0.9)
    assert stats["slope"] == pytest.approx(1.0) and stats["slope_jackknife"] == pytest.approx(pseudo.mean())
    assert stats["ci_method"] == "jackknife" and stats["slope_ci"] == pytest.approx([lo, hi])
    with pytest.raises(ValueError, match="jackknife"):
        profile_stats(depth, values, method="jackknife")


def test_jackknife_changes_equal_recomputing_without_each_group():
    g = torch.Generator().manual_seed(8)
    pre = [torch.randn(40, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    post = [
        x @ torch.randn(5, 5, generator=g, dtype=torch.float64)
        + 0.5 * torch.randn(40, 5, generator=g, dtype=torch.float64)
        for x in pre
    ]
    out = jackknife_changes(pre, post, ["cka_linear", "procrustes", "cosine"], n_groups=8, seed=2)
    group = jackknife_groups(40, 8, 2)
    assert sorted(torch.bincount(group).tolist()) == [5] * 8
    for metric, fn in (
        ("cka_linear", lambda a, b: 1 - linear_cka(a, b)),
        ("procrustes", procrustes_distance),
    ):
        assert out[metric].shape == (8, 2)
        for k in range(8):
            keep = group != k
            for layer in range(2):
                assert out[metric][k, layer] == pytest.approx(
                    fn(pre[layer][keep], post[layer][keep]), abs=1e-10
                )
    grouped = jackknife_changes(pre, post, ["cka_linear"], n_groups=4, seed=2, groups=torch.arange(40) // 2)
    pairs = jackknife_groups(20, 4, 2)
    keep = pairs.repeat_interleave(2) != 0  # whole groups of rows (e.g. a sequence's tokens) leave together
    assert grouped["cka_linear"][0, 1] == pytest.approx(
        1 - linear_cka(pre[1][keep], post[1][keep]), abs=1e-10
    )


def test_jackknife_interval_covers_the_large_n_slope_of_a_plugin_metric():
    # n >> d: linear CKA change grows with depth; its plug-in bias is upward (~d/n), and the jackknife
    # removes it. Over a few replicates the jackknife interval covers the large-n slope.
    def sample(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        pre = [x] * 4
        post = [
            x + (0.3 + 0.4 * layer) * torch.randn(n, 6, generator=g, dtype=torch.float64)
            for layer in range(4)
        ]
        return pre, post

    depth = [0, 1 / 3, 2 / 3, 1]
    truth = profile_stats(depth, [1 - linear_cka(x, y) for x, y in zip(*sample(40000, 0), strict=True)])[
        "slope"
    ]
    covered = 0
    for seed in range(1, 9):
        pre, post = sample(120, seed)
        point = layer_changes(pre, post, metrics=["cka_linear"], n_boot=0)["cka_linear"].values
        loo = jackknife_changes(pre, post, ["cka_linear"], n_groups=20, seed=seed)["cka_linear"]
        stats = profile_stats(depth, point, method="jackknife", jackknife=loo)
        covered += stats["slope_ci"][0] <= truth <= stats["slope_ci"][1]
    assert covered >= 6


def test_no_interval_for_plugin_metrics_when_d_exceeds_a_quarter_of_n():
    assert interval_method("cka_linear", 512, 128) == ("jackknife", None)
    method, note = interval_method("procrustes", 512, 384)
    assert method is None and "d=384 > n/4=128" in note
    assert interval_method("cka_debiased", 512, 384) == ("basic", None)
    assert interval_method("cosine_tokens", 64, 384, bootstrap="percentile") == ("percentile", None)
    assert interval_method("cka_linear", 512, 384, plugin="bootstrap") == ("basic", None)
    values = [0.1 * layer for layer in range(7)]
    stats = profile_stats(DEPTH, values, np.tile(values, (20, 1)), method=None, ci_note=note)
    assert stats["slope_ci"] is None and stats["ci_method"] is None and stats["ci_note"] == note


# ------------------------------------------------------------------------------------------------ init.kl


def test_target_nll_is_minus_mean_log_p_of_the_target():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    target = torch.tensor([[0, 1, -100]])
    total, n = target_nll(logits, target)
    assert n == 2 and total == pytest.approx(-math.log(0.5) - math.log(0.8), abs=1e-6)
    # causal LM: logits at t predict target position t of the (already shifted) targets
    total, n = target_nll(logits, torch.tensor([[2, 0]]), shift=True)
    assert n == 2 and total == pytest.approx(-math.log(0.25) - math.log(0.1), abs=1e-6)


def test_probe_of_uninformative_features_predicts_the_training_class_frequencies():
    # constant features: the best linear read-out is the prior of the training labels, so the held-out
    # KL(onehot || p) = -mean log freq_train(y) (a vanishing penalty: the bias is penalised too)
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    probe = fit_linear_probe(torch.ones(10, 4), y, 3, l2=1e-9, max_iter=2000)
    y_eval = torch.tensor([0, 1, 2, 2])
    nll = float(torch.nn.functional.cross_entropy(probe(torch.ones(4, 4)), y_eval))
    expected = -(math.log(0.6) + math.log(0.3) + 2 * math.log(0.1)) / 4
    assert nll == pytest.approx(expected, abs=1e-6)


def test_a_class_absent_from_the_probe_training_rows_keeps_a_finite_bias():
    # unpenalised, the absent class's bias runs to -inf and the KL depends on where the iteration cap stops it
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3  # class 3 of 4 never appears
    X = torch.randn(60, 5, generator=g, dtype=torch.float64) + 2 * torch.nn.functional.one_hot(y, 5)
    fits = [fit_linear_probe(X, y, 4, l2=0.01, max_iter=cap) for cap in (50, 2000)]
    assert all(torch.isfinite(f.bias).all() and f.bias[3] > -5 for f in fits)
    held = torch.tensor([0, 1, 2, 3])
    kls = [float(torch.nn.functional.cross_entropy(f(X[:4]), held)) for f in fits]
    assert kls[0] == pytest.approx(kls[1], abs=1e-6)


def test_probe_of_separable_features_is_near_zero_kl():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    X = torch.randn(200, 3, generator=g, dtype=torch.float64)
    X[:, 0] += 8 * (2 * y - 1)
    probe = fit_linear_probe(X, y, 2)
    assert float(torch.nn.functional.cross_entropy(probe(X), y)) < 0.05


def test_probe_fit_reaches_the_regularized_optimum():
    """The fitted weights zero the gradient of mean CE + l2/2 ||W||^2 (checked by autograd, independent of the
    analytic gradient the fit uses), and no run of torch's own L-BFGS finds a lower objective."""
    from locality.instrument.init_distance import _lbfgs

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (120,), generator=g)
    X = torch.randn(5, 8, generator=g, dtype=torch.float64)[y] + torch.randn(
        120, 8, generator=g, dtype=torch.float64
    )
    l2 = 0.01

    def objective(W):
        return torch.nn.functional.cross_entropy(X @ W[:-1] + W[-1], y) + 0.5 * l2 * W.square().sum()

    W = _lbfgs(X, y, 5, l2, max_iter=500).requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(W), W)
    assert grad.abs().max() < 1e-6
    V = torch.zeros_like(W).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [V], max_iter=1000, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = objective(V)
        loss.backward()
        return loss

    opt.step(closure)
    assert float(objective(W)) <= float(objective(V)) + 1e-10


@pytest.fixture(scope="module")
def splits():
    return load_builtin("stdlib_docs", 48, 16)


def _module(preset, objective, splits):
    torch.manual_seed(0)
    cls = objective_class(load_option("objective", objective), "decoder")
    backbone = load_backbone(_spec(preset), head=cls.head_kind)
    head = build_objective(
        OmegaConf.merge(load_option("objective", objective), {"max_length": 32}),
        backbone,
        Task(tuple(splits.label_names)),
    )
    return LocalityModule(backbone, head, instantiate(load_option("optim", "adamw"))), head


def test_lm_kl_is_the_cross_entropy_of_the_pretrained_head(splits):
    module, objective = _module("tiny_gpt2", "clm", splits)
    batch = objective.collate(splits.train[:8])
    r = objective_distance(module, [batch])
    assert r["kl_source"] == "lm" and r["kl_n"] == int((batch["labels"][:, 1:] != -100).sum())
    assert r["kl"] == pytest.approx(r["loss"], rel=1e-5)  # one batch: the same token-mean cross-entropy
    vocab = module.model.get_output_embeddings().weight.shape[0]
    assert r["kl_norm"] == pytest.approx(r["kl"] / math.log(vocab), rel=1e-12)


def test_new_head_kl_is_a_linear_probe_on_held_out_examples(splits):
    module, objective = _module("tiny_gpt2", "cls", splits)
    train = [objective.collate(splits.train[i : i + 16]) for i in range(0, 64, 16)]
    held = [objective.collate(splits.validation)]
    r = objective_distance(module, train[:1], probe_train=train, probe_eval=held)
    assert r["kl_source"] == "linear_probe" and r["kl_n"] == len(splits.validation)
    assert r["kl_probe_train_n"] == 64 and r["kl"] > 0
    assert r["kl_norm"] == pytest.approx(r["kl"] / math.log(objective.num_classes), rel=1e-12)
    assert objective_distance(module, train[:1])["kl"] is None  # no probe data: no value, not a random head's


# ----------------------------------------------------------------------------------------------- a real run


def test_a_run_reports_the_paper_definitions(train):
    from locality.instrument.report import format_profile

    # tiny GPT-2: d = 64; token pooling gives 128 probe sequences x 4 rows = 512 rows >= 4d, so the plug-in
    # metrics get a jackknife over groups of whole sequences
    r = train(
        "model=tiny_gpt2",
        "model.init=random",
        "objective=cls",
        "measure.n_probe=128",
        "measure.ci=0.9",
        "measure.pooling=tokens",
        "measure.token_positions=4",
    )
    n = r["run"]["n_layers"]
    assert list(r["change"])[:2] == ["cosine", "cosine_tokens"] and len(r["change"]["cosine_tokens"]) == n + 1
    assert all(v >= 0 for v in r["change"]["cosine_tokens"])
    tokens = r["profile"]["cosine_tokens"]
    assert tokens["ci_method"] == "basic" and tokens["slope_ci"][0] < tokens["slope_ci"][1]
    assert tokens["slope_per_layer"] == pytest.approx(tokens["slope"] / n, rel=1e-9)
    for metric in ("cka_linear", "procrustes"):
        stats = r["profile"][metric]
        assert stats["ci_method"] == "jackknife" and stats["slope_ci"] is not None
        assert math.isfinite(stats["slope_jackknife"])
    assert r["profile"]["cka_debiased"]["ci_method"] == "basic"
    weight = r["profile"]["weight_rel"]
    threshold = weight["width_threshold"]
    assert weight["slope_ci"] is None
    assert weight["width_count"] == sum(v > threshold for v in r["change"]["weight_rel"] if v is not None)
    assert r["init"]["kl_source"] == "linear_probe" and r["init"]["kl"] > 0
    labels = len(r["run"]["data"]["label_names"])
    assert r["init"]["kl_norm"] == pytest.approx(r["init"]["kl"] / math.log(labels), rel=1e-12)
    text = format_profile(r)
    assert "cosine_tokens" in text and "90% CI" in text and "95%" not in text and "jackknife" in text

    small = train(
        "model=tiny_gpt2", "model.init=random", "objective=clm", "measure.n_probe=64"
    )  # d = 64 > 64/4: no interval
    for metric in ("cka_linear", "procrustes"):
        assert (
            small["profile"][metric]["slope_ci"] is None
            and "d=64 > n/4=16" in small["profile"][metric]["ci_note"]
        )
    assert small["init"]["kl_source"] == "lm" and small["init"]["kl_norm"] > 0
    assert "no interval" in format_profile(small)


def test_the_run_report_never_prints_a_real_value_as_zero():
    from locality.instrument.report import _fmt, _signed

    assert _signed(4.4e-18, 9).strip() == "+4.40e-18" and _signed(0.0118, 9).strip() == "+0.0118"
    assert _fmt(3.2e-5).strip() == "3.2e-05" and _fmt(0.0).strip() == "0.0000" and _fmt(None).strip() == "-"

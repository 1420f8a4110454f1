"""The empirical NTK against a brute-force per-example Jacobian (float64), additivity over a partition of the
parameters, symmetry and PSD, both computation paths, and the spectrum / selection helpers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import double_gpt2
from torch import nn
from torch.func import functional_call

from locality.measure.ntk import (
    condition_number,
    eigenvalues,
    empirical_ntk,
    flatten_kernel,
    group_contributions,
    kernel_summary,
    ntk_by_group,
    select_groups,
)


def brute_force_ntk(fn, params, inputs) -> torch.Tensor:
    """J J^T from one autograd.grad per (example, output), each example run alone."""
    names = list(params)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    rows = []
    n = (inputs if isinstance(inputs, torch.Tensor) else inputs["input_ids"]).shape[0]
    for i in range(n):
        x = (
            inputs[i : i + 1]
            if isinstance(inputs, torch.Tensor)
            else {k: v[i : i + 1] for k, v in inputs.items()}
        )
        out = fn(leaves, x)[0]
        for a in range(out.shape[0]):
            grads = torch.autograd.grad(
                out[a], [leaves[k] for k in names], retain_graph=True, allow_unused=True
            )
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(leaves[k])).reshape(-1)
                        for g, k in zip(grads, names, strict=True)
                    ]
                )
            )
    jac = torch.stack(rows).double()
    o = out.shape[0]
    return jac @ jac.T, o


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.GELU(), nn.Linear(7, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(p, x):
        return functional_call(model, p, (x,))

    return fn, params, torch.randn(6, 5, dtype=torch.float64)


@pytest.fixture(scope="module")
def tiny_gpt2():
    model = double_gpt2()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids = torch.randint(0, 40, (4, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding must not leak across examples

    def fn(p, batch):  # the last token's first 3 logits: O = 3
        out = functional_call(
            model,
            p,
            (),
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False},
        )
        return out.logits[:, -1, :3]

    return fn, params, {"input_ids": ids, "attention_mask": mask}


def check_against_brute_force(fn, params, inputs, **kwargs):
    kernel = empirical_ntk(fn, params, inputs, **kwargs)
    reference, o = brute_force_ntk(fn, params, inputs)
    n = kernel.shape[0]
    assert kernel.shape == (n, n, o, o) and kernel.dtype == torch.float64
    torch.testing.assert_close(
        flatten_kernel(kernel), reference, rtol=1e-10, atol=1e-10 * reference.abs().max()
    )
    return kernel


@pytest.mark.parametrize("method", ["jacobian", "vp", "auto"])
def test_mlp_matches_brute_force(mlp, method):
    fn, params, x = mlp
    check_against_brute_force(fn, params, x, method=method)


def test_mlp_chunking_does_not_change_the_kernel(mlp):
    fn, params, x = mlp
    whole = empirical_ntk(fn, params, x, method="jacobian", example_chunk=6)
    # a budget of one tensor at a time, examples two at a time, in both paths
    for method in ("jacobian", "vp"):
        chunked = empirical_ntk(fn, params, x, method=method, memory_budget=8 * 6 * 3 * 8, example_chunk=2)
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["jacobian", "vp"])
def test_tiny_gpt2_matches_brute_force(tiny_gpt2, method):
    fn, params, batch = tiny_gpt2
    kernel = check_against_brute_force(fn, params, batch, method=method)
    eigs = eigenvalues(kernel)
    assert eigs[0] >= -1e-10 * eigs[-1]  # PSD
    torch.testing.assert_close(kernel, kernel.permute(1, 0, 3, 2))  # K[i,j,a,b] = K[j,i,b,a]


def test_kernel_is_additive_over_a_partition(tiny_gpt2):
    fn, params, batch = tiny_gpt2
    groups = {"embeddings": [], "h.0": [], "h.1": [], "rest": []}
    for name in params:
        key = next((g for g in ("h.0", "h.1") if f".{g}." in name), None)
        groups[key or ("embeddings" if ".wte." in name or ".wpe." in name else "rest")].append(name)
    used = {}
    parts = ntk_by_group(fn, params, batch, groups, methods_used=used)
    whole = empirical_ntk(fn, params, batch)
    torch.testing.assert_close(sum(parts.values()), whole, rtol=1e-10, atol=1e-12 * whole.abs().max())
    assert set(used) == set(groups) and set(used.values()) <= {"jacobian", "vp"}
    for kernel in parts.values():  # each group's kernel is PSD on its own
        eigs = eigenvalues(kernel)
        assert eigs[0] >= -1e-10 * max(float(eigs[-1]), 1e-300)
    contributions = group_contributions(parts)
    assert math.isclose(sum(c["trace_share"] for c in contributions.values()), 1.0, rel_tol=1e-12)
    assert all(c["lambda_min_gain"] >= -1e-10 for c in contributions.values())


def test_auto_rule_picks_vp_when_a_tensor_does_not_fit(mlp):
    fn, params, x = mlp
    used = {}
    ntk_by_group(fn, params, x, {"all": list(params)}, memory_budget=10**9, methods_used=used)
    assert used == {"all": "jacobian"}
    ntk_by_group(fn, params, x, {"all": list(params)}, memory_budget=100, methods_used=used)
    assert used == {"all": "vp"}


def test_spectrum_helpers_on_a_known_kernel():
    # K = diag(1, 2) (x) I for N = 2 examples, O = 1 output: eigenvalues 1, 2; condition number 2; trace 3
    kernel = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)).reshape(2, 2, 1, 1)
    summary = kernel_summary(kernel)
    assert summary["eigenvalues"] == pytest.approx([1.0, 2.0])
    assert summary["condition_number"] == pytest.approx(2.0) and summary["trace"] == pytest.approx(3.0)
    assert condition_number(torch.tensor([0.0, 1.0], dtype=torch.float64)) == math.inf


def test_flatten_orders_rows_by_example_then_output():
    kernel = torch.arange(2 * 2 * 3 * 3, dtype=torch.float64).reshape(2, 2, 3, 3)
    flat = flatten_kernel(kernel)
    assert flat[1 * 3 + 2, 0 * 3 + 1] == kernel[1, 0, 2, 1]


def test_greedy_selection_maximizes_lambda_min():
    e = torch.eye(3, dtype=torch.float64)

    def as_kernel(m):
        return m.reshape(3, 1, 3, 1).permute(0, 2, 1, 3)

    # every block alone is singular (lambda_min 0): the first pick goes to the largest trace ("a"); then "b"
    # completes the rank (lambda_min 1) and "c" would not (lambda_min 0)
    kernels = {
        "a": as_kernel(10 * torch.outer(e[0], e[0])),
        "b": as_kernel(torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))),
        "c": as_kernel(torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))),
    }
    chosen = select_groups(kernels, 2)
    assert [name for name, _ in chosen] == ["a", "b"]
    assert [gain for _, gain in chosen] == pytest.approx([0.0, 1.0], abs=1e-12)

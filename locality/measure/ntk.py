"""The empirical neural tangent kernel of any model, per parameter group, and its spectrum (pure torch).

`empirical_ntk(fn, params, inputs)` returns K[i, j, a, b] = sum_p df_a(x_i)/dp * df_b(x_j)/dp over the
parameters in `params` only, where `fn(params, inputs) -> Tensor[N, O]` (e.g. a `torch.func.functional_call`
of a model) maps N examples to O outputs each: the symmetric J J^T, never the sign-kernel J sign(J)^T.
Outputs of example i must depend on example i alone (eval mode: no dropout, no batch statistics).

K is additive over a partition of the parameters (K = sum_g K_g), so `ntk_by_group` computes the
contribution of every group of a partition (e.g. one per block) and their sum is the whole kernel.

Two ways to compute one group's kernel, chosen per group by cost (`method="auto"`):

- **Jacobian contraction** (`"jacobian"`): the rows J[(i, a), :] of every example, from vmapped
  vector-Jacobian products, then K = J J^T. Holds N*O*P_c numbers for a chunk of P_c parameters; the group's
  parameters are split into chunks whose Jacobian fits `memory_budget` bytes, and each chunk repeats the N
  forward and N*O backward passes. Cost ~ n_chunks * N * (1 + 2*O) single-example forward passes.
- **NTK-vector products** (`"vp"`): for each output (j, b), u = J(x_j)^T e_b (a vjp), then J(x_i) u for all
  i at once (a jvp over the N examples): one column of K. Holds at most `memory_budget` bytes of
  parameter-sized vectors; needs forward-mode AD (eager attention in transformers). Cost ~ N * (1 + 2*O)
  + 2 * N^2 * O single-example forward passes.

The rule: Jacobian contraction when every single tensor's Jacobian fits the budget and the chunk count is at
most N + 1 (where the two cost estimates cross), NTK-vector products otherwise. Examples go through `fn`
`example_chunk` at a time (vjps are vmapped over those examples' outputs).

Kernels come back in float64 (each chunk's product in the parameters' dtype, summed in float64).
Spectrum helpers flatten K to the (N*O) x (N*O) matrix, rows ordered (i, a).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.func import jvp, vjp, vmap

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
Fn = Callable[[dict[str, torch.Tensor], Inputs], torch.Tensor]
METHODS = ("auto", "jacobian", "vp")
DEFAULT_BUDGET = 2**30  # bytes


def empirical_ntk(
    fn: Fn,
    params: Mapping[str, torch.Tensor],
    inputs: Inputs,
    *,
    method: str = "auto",
    memory_budget: int = DEFAULT_BUDGET,
    example_chunk: int = 1,
) -> torch.Tensor:
    """K[i, j, a, b] = <df_a(x_i)/dtheta, df_b(x_j)/dtheta> over `params`: Tensor[N, N, O, O] in float64."""
    groups = {"all": list(params)}
    return ntk_by_group(
        fn, params, inputs, groups, method=method, memory_budget=memory_budget, example_chunk=example_chunk
    )["all"]


def ntk_by_group(
    fn: Fn,
    params: Mapping[str, torch.Tensor],
    inputs: Inputs,
    groups: Mapping[str, Sequence[str]],
    *,
    method: str = "auto",
    memory_budget: int = DEFAULT_BUDGET,
    example_chunk: int = 1,
    methods_used: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """The kernel of each group of parameter names ({group: Tensor[N, N, O, O]}); parameters of `params`
    outside every group are held fixed. For a partition of `params` the kernels sum to `empirical_ntk`.
    `methods_used`, if given, receives the method chosen for each group."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if memory_budget < 1 or example_chunk < 1:
        raise ValueError("memory_budget and example_chunk must be >= 1")
    n = _n_examples(inputs)
    fixed = {name: p.detach() for name, p in params.items()}
    with torch.no_grad():
        n_outputs = fn(fixed, _take(inputs, slice(0, 1))).shape[1]
    kernels = {}
    for group, names in groups.items():
        unknown = [name for name in names if name not in params]
        if unknown:
            raise KeyError(f"group {group!r} names parameters not in params: {unknown[:3]}")
        chosen = _choose(method, [fixed[name] for name in names], n, n_outputs, memory_budget)
        if methods_used is not None:
            methods_used[group] = chosen
        compute = _jacobian_kernel if chosen == "jacobian" else _vp_kernel
        flat = compute(fn, fixed, list(names), inputs, n, n_outputs, memory_budget, example_chunk)
        kernels[group] = unflatten_kernel(flat, n, n_outputs)
    return kernels


def _choose(method: str, tensors: list[torch.Tensor], n: int, n_outputs: int, budget: int) -> str:
    if method != "auto":
        return method
    per_param = n * n_outputs * (tensors[0].element_size() if tensors else 4)
    if any(t.numel() * per_param > budget for t in tensors):
        return "vp"
    chunks = math.ceil(sum(t.numel() for t in tensors) * per_param / budget)
    return "jacobian" if chunks <= n + 1 else "vp"


def _restricted(fn: Fn, fixed: dict[str, torch.Tensor]) -> Callable:
    """fn as a function of a subset of the parameters, the others held at their values."""
    return lambda sub, x: fn({**fixed, **sub}, x)


def _basis(n_rows: int, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n_rows, dtype=like.dtype, device=like.device).reshape(n_rows, *shape)


def _jacobian_kernel(fn, fixed, names, inputs, n, n_outputs, budget, example_chunk) -> torch.Tensor:
    f = _restricted(fn, fixed)
    per_param = n * n_outputs * (fixed[names[0]].element_size() if names else 4)
    kernel = torch.zeros(n * n_outputs, n * n_outputs, dtype=torch.float64)
    for chunk in _param_chunks(names, fixed, max(1, budget // per_param)):
        sub = {name: fixed[name] for name in chunk}
        rows = []
        for start in range(0, n, example_chunk):
            x = _take(inputs, slice(start, start + example_chunk))
            out, vjp_fn = vjp(lambda s, x=x: f(s, x), sub)
            (grads,) = vmap(vjp_fn)(_basis(out.numel(), tuple(out.shape), out))
            rows.append(torch.cat([g.reshape(out.numel(), -1) for g in grads.values()], dim=1))
        jac = torch.cat(rows)  # [N*O, P_chunk], rows (i, a)
        kernel += (jac @ jac.T).to(device="cpu", dtype=torch.float64)
    return kernel


def _vp_kernel(fn, fixed, names, inputs, n, n_outputs, budget, example_chunk) -> torch.Tensor:
    f = _restricted(fn, fixed)
    sub = {name: fixed[name] for name in names}
    size = sum(t.numel() * t.element_size() for t in sub.values())
    per_call = max(1, budget // max(size, 1))  # parameter-sized vectors held at once
    columns = []
    for start in range(0, n, example_chunk):
        x = _take(inputs, slice(start, start + example_chunk))
        out, vjp_fn = vjp(lambda s, x=x: f(s, x), sub)
        basis = _basis(out.numel(), tuple(out.shape), out)
        for k in range(0, out.numel(), per_call):
            (u,) = vmap(vjp_fn)(basis[k : k + per_call])  # J(x_j)^T e_b for each (j, b)
            ju = vmap(lambda t: jvp(lambda s: f(s, inputs), (sub,), (t,))[1])(u)  # [c, N, O]
            columns.append(ju.reshape(ju.shape[0], -1).to(device="cpu", dtype=torch.float64))
    return torch.cat(columns).T.contiguous()  # column (j, b) holds K[(i, a), (j, b)]


def _param_chunks(names: list[str], tensors: Mapping[str, torch.Tensor], max_params: int) -> list[list[str]]:
    """Consecutive names whose total size stays within max_params (a larger tensor forms its own chunk)."""
    chunks: list[list[str]] = []
    size = 0
    for name in names:
        numel = tensors[name].numel()
        if not chunks or size + numel > max_params:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += numel
    return chunks


def _n_examples(inputs: Inputs) -> int:
    return (inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))).shape[0]


def _take(inputs: Inputs, rows: slice) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs[rows]
    return {key: value[rows] for key, value in inputs.items()}


# ---- spectrum ---------------------------------------------------------------------------------------------


def flatten_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """[N, N, O, O] -> the (N*O) x (N*O) matrix with rows and columns ordered (example, output)."""
    n, _, o, _ = kernel.shape
    return kernel.permute(0, 2, 1, 3).reshape(n * o, n * o)


def unflatten_kernel(flat: torch.Tensor, n: int, n_outputs: int) -> torch.Tensor:
    return flat.reshape(n, n_outputs, n, n_outputs).permute(0, 2, 1, 3).contiguous()


def eigenvalues(kernel: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the flattened kernel (symmetrized), ascending, in float64."""
    flat = flatten_kernel(kernel).double()
    return torch.linalg.eigvalsh((flat + flat.T) / 2)


def condition_number(eigs: torch.Tensor) -> float:
    """lambda_max / lambda_min; inf when lambda_min is zero within rounding (a singular kernel)."""
    top, bottom = float(eigs[-1]), float(eigs[0])
    if bottom <= top * len(eigs) * torch.finfo(torch.float64).eps:
        return math.inf
    return top / bottom


def kernel_summary(kernel: torch.Tensor) -> dict:
    """Eigenvalues (ascending), trace, lambda_min, lambda_max and condition number of one kernel."""
    eigs = eigenvalues(kernel)
    return {
        "eigenvalues": eigs.tolist(),
        "trace": float(flatten_kernel(kernel).double().trace()),
        "lambda_min": float(eigs[0]),
        "lambda_max": float(eigs[-1]),
        "condition_number": condition_number(eigs),
    }


def lambda_min(kernel: torch.Tensor) -> float:
    return float(eigenvalues(kernel)[0])


def group_contributions(kernels: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Per group of a partition: its kernel's trace and share of the total trace, its own lambda_min, and its
    lambda_min gain = lambda_min(K) - lambda_min(K - K_g): how much the group raises the smallest eigenvalue
    of the whole kernel K = sum_g K_g given all the others (>= 0 by Weyl's inequality, K_g being PSD)."""
    total = sum(kernels.values())
    total_trace = float(flatten_kernel(total).trace())
    base = lambda_min(total)
    out = {}
    for name, k in kernels.items():
        trace = float(flatten_kernel(k).trace())
        out[name] = {
            "trace": trace,
            "trace_share": trace / total_trace if total_trace > 0 else math.nan,
            "lambda_min": lambda_min(k),
            "lambda_min_gain": base - lambda_min(total - k),
        }
    return out


def select_groups(
    kernels: Mapping[str, torch.Tensor], k: int, base: torch.Tensor | None = None
) -> list[tuple[str, float]]:
    """Greedy forward selection of k groups: each step adds the group whose kernel raises lambda_min of
    (base + the groups chosen so far) the most, ties to the larger trace. `base` is the kernel of what
    trains anyway (e.g. a new task head); None for zero. Returns [(group, lambda_min after adding it)]."""
    chosen: list[tuple[str, float]] = []
    current = base
    remaining = dict(kernels)
    for _ in range(min(k, len(remaining))):
        scored = {
            name: (lambda_min(kg if current is None else current + kg), float(flatten_kernel(kg).trace()))
            for name, kg in remaining.items()
        }
        best = max(scored, key=lambda name: scored[name])
        chosen.append((best, scored[best][0]))
        picked = remaining.pop(best)
        current = picked if current is None else current + picked
    return chosen

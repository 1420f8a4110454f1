"""Training-free objective distance: how far the objective is from what the model already does, at step 0.

Measured before any update, in eval mode (no dropout):
- the objective's loss and task accuracy on a fixed set of training batches, and for objectives with a new
  head (cls, tok) the random head's `energy` = mean ||e_y - p(x)||_2 (Ren et al. 2023;
  `locality.measure.head_energy`) from the same forward passes (None for LM objectives);
- the per-block relative gradient magnitude ||g_l|| / ||W_l|| on the same batches — the gradient-flow
  profile that the equal-step control removes;
- the paper's distance, `kl` = KL(target distribution || pretrained predictive distribution) in nats,
  averaged over scored targets, and `kl_norm` = kl / ln K (K classes; 1 = as far as the uniform guess
  is from a one-hot target). The targets are one-hot labels (the next or masked token, the class, the
  tag), whose entropy is 0, so KL(onehot_y || p) = -log p_y: the mean negative log-likelihood of the
  target under the predictive distribution, computed from its logits.
  - LM objectives (clm, mlm: `head_kind` causal_lm / masked_lm) reuse the checkpoint's pretrained head,
    so p is the pretrained model's own prediction of each scored token (K = vocabulary size), measured
    in the same forward passes as the loss. With one batch it equals the loss (the loss is the same
    cross-entropy); over several it weights every scored token equally, the loss every batch.
  - Objectives with a new, randomly initialised head (cls, tok) would measure the random head, which
    says nothing about the backbone. p is instead the best linear read-out of the frozen pretrained
    features, exactly the features that head sees (cls: the objective's pooling of the last hidden
    state; tok: every scored token's last hidden state): a multinomial logistic-regression probe
    (`fit_linear_probe`), fitted on the first `measure.kl_probe_train` training examples and evaluated
    on the held-out validation split; K = the objective's number of classes.
  - Objectives whose target is a known distribution (`loss_is_divergence`: objective=distill) have a loss
    that is KL(target || model) itself, so at step 0 `kl` is the loss (`kl_source` "exact"). Cross-entropy
    against observed tokens has an entropy floor (the text's own entropy: pretraining text scores ~0.7 of
    ln V against the pretrained model); this KL has none.
  - `kl_excess`, for objectives that know their target's entropy (`target_entropy`: distill, whose loss is
    already the KL, and teacher_cls, whose labels are a fixed function of the text): the excess divergence,
    the cross-entropy at step 0 minus the target's own entropy (the least any model could reach).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from locality.measure.head_energy import head_energy, head_passes, scored_rows
from locality.measure.similarity import single_threaded_torch
from locality.objectives.base import IGNORE

LM_HEADS = ("causal_lm", "masked_lm")
PROBE_L2 = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge grid for the probe, chosen by 2-fold CV on its training set


def objective_distance(
    module,
    batches: list[dict],
    forward_context=nullcontext,
    probe_train: list[dict] | None = None,
    probe_eval: list[dict] | None = None,
) -> dict:
    """{"loss", "<metric>"..., "energy", "kl", "kl_norm", "kl_source", "kl_n", "grad_rel": [per block]} at
    the module's current weights; grads are cleared after.

    LM objectives: kl over the scored tokens of `batches`. Objectives with a new head: kl of a linear probe
    fitted on `probe_train` batches and evaluated on `probe_eval` batches (both needed; else kl is None).
    Forwards run on the module's device inside `forward_context()` (the trainer's precision), backwards
    outside it, as in training.
    """
    model_mode = module.training
    module.eval()
    module.zero_grad(set_to_none=True)
    metrics = module.objective.metrics().to(module.device)
    lm = getattr(module.objective, "head_kind", "base") in LM_HEADS
    head = getattr(module.objective, "head", None)
    total, nll, scored, n_classes = 0.0, 0.0, 0, None
    head_logits, head_targets = [], []
    try:
        for batch in batches:
            batch = {k: v.to(module.device) for k, v in batch.items()}
            with (
                _last_logits(module.model if lm else None) as logits,
                _last_logits(head) as head_out,
                forward_context(),
            ):
                out = module(batch)
            (out.loss.float() / len(batches)).backward()
            total += float(out.loss.detach())
            metrics.update(out.predicted(), out.target)
            if head_out:
                z, y = scored_rows(head_out[-1], out.target)
                head_logits.append(z.cpu())
                head_targets.append(y.cpu())
            if lm:
                batch_nll, batch_scored = target_nll(
                    logits[-1], out.target, shift=module.objective.head_kind == "causal_lm"
                )
                nll, scored, n_classes = nll + batch_nll, scored + batch_scored, logits[-1].shape[-1]
        result = {"loss": total / len(batches), **{k: float(v) for k, v in metrics.compute().items()}}
        result["grad_rel"] = [_grad_rel(block) for block in module.blocks]
        result["energy"] = (
            head_energy(torch.cat(head_logits), torch.cat(head_targets)) if head_logits else None
        )
    finally:
        module.zero_grad(set_to_none=True)
        module.train(model_mode)
    if getattr(module.objective, "loss_is_divergence", False):  # the loss is KL(target || model) itself
        result.update(_kl(result["loss"], n_classes, "exact", scored))
    elif lm:
        result.update(_kl(nll / scored if scored else math.nan, n_classes, "lm", scored))
    elif getattr(module.objective, "head", None) is not None and probe_train and probe_eval:
        result.update(probe_kl(module, probe_train, probe_eval, forward_context))
    else:
        result.update({"kl": None, "kl_norm": None, "kl_source": None, "kl_n": 0})
    floor = getattr(module.objective, "target_entropy", None)  # known for objectives built for the dose test
    if floor is not None and result["kl"] is not None:
        result["kl_excess"] = result["kl"] - floor  # cross-entropy at step 0 minus the target's own entropy
    return result


def target_nll(logits: torch.Tensor, target: torch.Tensor, shift: bool = False) -> tuple[float, int]:
    """(sum over scored targets of -log p_y, number scored) from logits [..., K] and targets (IGNORE = not
    scored). shift: causal LM, where logits[:, t] predicts target position t (targets already shifted)."""
    logits = logits.detach()
    if shift:
        logits = logits[:, :-1]
    keep = target != IGNORE
    if not keep.any():
        return 0.0, 0
    rows, labels = keep.nonzero(as_tuple=True), target[keep]
    total = 0.0
    for start in range(0, labels.numel(), 1024):  # [1024, K] float32 at a time, not [n_scored, K]
        chunk = tuple(r[start : start + 1024] for r in rows)
        picked = logits[chunk].float()
        total += float(
            torch.nn.functional.cross_entropy(picked, labels[start : start + 1024], reduction="sum")
        )
    return total, int(labels.numel())


def probe_kl(
    module, train_batches: list[dict], eval_batches: list[dict], forward_context=nullcontext
) -> dict:
    """KL(onehot || linear probe) on held-out examples, the probe fitted on frozen head-input features."""
    X, y, groups = head_features(module, train_batches, forward_context)
    X_eval, y_eval, _ = head_features(module, eval_batches, forward_context)
    K = module.objective.num_classes
    probe = fit_linear_probe(X, y, K, groups=groups, device=module.device)
    X_eval, y_eval = X_eval.to(probe.weight.device), y_eval.to(probe.weight.device)
    nll = float(torch.nn.functional.cross_entropy(probe(X_eval), y_eval, reduction="mean"))
    return {
        **_kl(nll, K, "linear_probe", int(y_eval.numel())),
        "kl_probe_l2": probe.l2,
        "kl_probe_train_n": int(y.numel()),
    }


def head_features(module, batches: list[dict], forward_context=nullcontext) -> tuple[torch.Tensor, ...]:
    """What the objective's head sees, per scored target: (features [m, d] float64 CPU, labels [m],
    example index [m]), through the module's own forward (`head_passes` with the head's inputs), eval mode."""
    feats, labels, examples, offset = [], [], [], 0
    for f, t in head_passes(module, batches, forward_context, inputs=True):
        index = torch.arange(offset, offset + t.shape[0], device=t.device)
        offset += t.shape[0]
        index = index.view(-1, *([1] * (t.dim() - 1))).expand_as(t)
        keep = t != IGNORE
        feats.append(f.reshape(*t.shape, f.shape[-1])[keep].double().cpu())
        labels.append(t[keep].cpu())
        examples.append(index[keep].cpu())
    return torch.cat(feats), torch.cat(labels), torch.cat(examples)


class LinearProbe:
    """A fitted multinomial logistic regression on standardized features: probe(X) -> logits [m, K]."""

    def __init__(
        self, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, l2: float
    ):
        self.mean, self.scale, self.weight, self.bias, self.l2 = mean, scale, weight, bias, l2

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        return ((X.double() - self.mean) / self.scale) @ self.weight + self.bias


def fit_linear_probe(
    X: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    l2: float | None = None,
    groups: torch.Tensor | None = None,
    max_iter: int = 300,
    device: str | torch.device = "cpu",
) -> LinearProbe:
    """Multinomial logistic regression, float64 L-BFGS (deterministic), on features standardized with the
    training mean and std. Minimises mean cross-entropy + l2/2 (||W||^2 + ||b||^2): the bias is penalised too,
    so a class absent from the training rows keeps a finite bias and the fit a unique optimum. l2=None picks
    it from PROBE_L2 by 2-fold cross-validation over `groups` (e.g. the example each token belongs to;
    None = every row its own; folds = a seeded random half of the groups), fitting the largest l2 first and warm-starting the next. Runs on `device`
    (the module's: CUDA for large d and many token rows), the CPU single-threaded.
    """
    X, y = X.to(device, torch.float64), y.to(device, torch.long)
    if X.device.type != "cpu":
        return _fit(X, y, n_classes, l2, groups, max_iter)
    with single_threaded_torch():  # on 2 shared cores, 2-thread small GEMMs ran ~40x slower (measured)
        return _fit(X, y, n_classes, l2, groups, max_iter)


def _fit(
    X: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    l2: float | None,
    groups: torch.Tensor | None,
    max_iter: int,
) -> LinearProbe:
    mean, scale = X.mean(0), X.std(0, unbiased=False)
    scale = torch.where(
        scale > 1e-9 * scale.max().clamp(min=1e-300), scale, torch.ones_like(scale)
    )  # constant: 0
    Z = (X - mean) / scale
    if l2 is None:
        units = torch.arange(len(y)) if groups is None else torch.unique(groups.cpu(), return_inverse=True)[1]
        n_units = int(units.max()) + 1
        half = torch.randperm(n_units, generator=torch.Generator().manual_seed(0))[: n_units // 2]
        fold = (
            torch.zeros(n_units, dtype=torch.long).index_fill_(0, half, 1)[units].to(y.device)
        )  # seeded halves
        cv = {}
        for k in (0, 1):
            train, held = fold != k, fold == k
            if train.sum() == 0 or held.sum() == 0:
                continue
            W = None
            for lam in sorted(PROBE_L2, reverse=True):
                W = _lbfgs(Z[train], y[train], n_classes, lam, max_iter, W)
                logits = Z[held] @ W[:-1] + W[-1]
                cv[lam] = cv.get(lam, 0.0) + float(
                    torch.nn.functional.cross_entropy(logits, y[held], reduction="sum")
                )
        l2 = min(cv, key=cv.get) if cv else PROBE_L2[len(PROBE_L2) // 2]
    W = _lbfgs(Z, y, n_classes, l2, max_iter)
    return LinearProbe(mean, scale, W[:-1], W[-1], l2)


def _lbfgs(
    Z: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    l2: float,
    max_iter: int,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """[d+1, K] weights (last row = bias) minimising mean CE + l2/2 ||W||^2 (the bias too: a class absent from
    the training rows would otherwise send its bias to -inf, and the fit would stop wherever the iteration cap
    falls): SciPy's L-BFGS-B driving an
    analytic loss and gradient computed by torch on Z's device (float64). Against torch.optim.LBFGS with
    autograd, the same optimum ~30x faster on small probes, where Python overhead per evaluation dominated
    (bench/measure_cost.py; the mini matrix's step-0 distance went from ~3 s to ~0.3 s per run)."""
    from scipy.optimize import minimize

    n, d = Z.shape
    onehot = torch.nn.functional.one_hot(y, n_classes).to(Z.dtype)

    def loss_and_grad(flat):
        W = torch.from_numpy(flat).to(Z.device).view(d + 1, n_classes)
        logp = torch.log_softmax(Z @ W[:-1] + W[-1], dim=1)
        loss = -(onehot * logp).sum() / n + 0.5 * l2 * W.square().sum()
        residual = (logp.exp() - onehot) / n
        grad = torch.cat([Z.T @ residual, residual.sum(0, keepdim=True)]) + l2 * W
        return float(loss), grad.cpu().numpy().ravel()

    x0 = (start if start is not None else Z.new_zeros(d + 1, n_classes)).cpu().numpy().ravel()
    result = minimize(
        loss_and_grad,
        x0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "maxcor": 20, "gtol": 1e-7, "ftol": 1e-13},
    )
    return torch.from_numpy(result.x).to(Z.device).view(d + 1, n_classes)


def _kl(kl: float, n_classes: int | None, source: str, n: int) -> dict:
    norm = kl / math.log(n_classes) if n_classes and n_classes > 1 and math.isfinite(kl) else None
    return {"kl": kl, "kl_norm": norm, "kl_source": source, "kl_n": n}


@contextmanager
def _last_logits(model: nn.Module | None):
    """Collect `model`'s forward outputs (a tensor, or their `.logits`) into a list (detached); nothing when model
    is None."""
    store: list[torch.Tensor] = []
    if model is None:
        yield store
        return

    def hook(_, __, output):
        logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
        if logits is None and isinstance(output, tuple | list):
            logits = output[0]
        store.append(logits.detach())

    handle = model.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _grad_rel(block: nn.Module) -> float | None:
    params = [p for p in block.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return None
    grad = torch.stack([p.grad.detach().double().pow(2).sum() for p in params]).sum().sqrt()
    weight = torch.stack([p.detach().double().pow(2).sum() for p in params]).sum().sqrt()
    return float(grad / weight) if weight > 0 else None

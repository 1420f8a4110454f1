"""Tests of the equal-step control: the pure-torch core against a float64 reference, the Lightning
callback through accumulation / fp16 / bf16 / clipping / schedulers, and DDP and FSDP2 on two CPU
processes (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.multiprocessing as mp
from equal_step_toy import CaptureLogger, RatioTracker, ToyModule, toy_loader
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from locality.controls import EqualStep, EqualStepCore
from locality.controls.update_ratios import UpdateRatioMonitor, collect_layers

HERE = Path(__file__).parent


def fit(
    module: ToyModule, callbacks: list, steps: int = 6, n: int = 32, **trainer_kwargs
) -> tuple[L.Trainer, CaptureLogger]:
    logger = CaptureLogger()
    trainer_kwargs.setdefault("max_steps", steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, toy_loader(n=n))
    return trainer, logger


def assert_equal_ratios(ratios: torch.Tensor, rtol: float) -> None:
    """Every row (one step) has the same ratio in every layer, up to rtol."""
    assert (ratios > 0).all()
    spread = ratios.max(-1).values / ratios.min(-1).values - 1
    assert spread.max().item() < rtol, spread


def spreads(ratios: torch.Tensor) -> torch.Tensor:
    return ratios.max(-1).values / ratios.min(-1).values


# 1. Lightning: equalized after every step; monitor mode measures the same thing and changes nothing.


def test_lightning_run_equalizes_every_step_and_logs() -> None:
    L.seed_everything(0, verbose=False)
    control, tracker = EqualStep(), RatioTracker()
    trainer, logger = fit(ToyModule(), [control, tracker])

    assert control.layer_names == [f"block_{i:02d}" for i in range(4)]
    assert control.steps == trainer.global_step == 6
    history = control.history
    assert history.shape == (6, 2, 4)
    assert_equal_ratios(history[:, 1], rtol=1e-6)
    assert spreads(history[:, 0]).min() > 3  # the blocks' own steps are far from equal
    # independent check from the weights themselves (float64; fp32 rounding of W limits it to ~1e-6)
    actual = torch.stack(tracker.ratios)
    assert actual.shape == (6, 4)
    assert_equal_ratios(actual, rtol=2e-5)
    torch.testing.assert_close(actual, history[:, 1].double(), rtol=1e-4, atol=0)

    logged = [(step, m) for step, m in logger.records if "equal_step/spread_after" in m]
    assert [step for step, _ in logged] == list(range(6))  # Lightning's logger steps 0..5 = global steps 1..6
    keys = {f"equal_step/ratio_{w}/block_{i:02d}" for w in ("before", "after") for i in range(4)}
    for (_, metrics), row in zip(logged, history, strict=True):
        assert keys | {"equal_step/spread_before", "equal_step/spread_after"} <= metrics.keys()
        after = torch.tensor([metrics[f"equal_step/ratio_after/block_{i:02d}"] for i in range(4)])
        before = torch.tensor([metrics[f"equal_step/ratio_before/block_{i:02d}"] for i in range(4)])
        assert_equal_ratios(after[None], rtol=1e-6)
        torch.testing.assert_close(before, row[0])
        assert metrics["equal_step/spread_after"] == pytest.approx(1, abs=1e-6)
        assert metrics["equal_step/spread_before"] == pytest.approx(spreads(row[0]).item(), rel=1e-6)
    assert not trainer.optimizers[0]._optimizer_step_pre_hooks  # hooks removed in teardown
    assert not trainer.optimizers[0]._optimizer_step_post_hooks


def test_monitor_measures_without_changing_anything() -> None:
    L.seed_everything(0, verbose=False)
    plain = ToyModule()
    fit(plain, [])
    L.seed_everything(0, verbose=False)
    monitored, monitor, tracker = ToyModule(), UpdateRatioMonitor(), RatioTracker()
    _, logger = fit(monitored, [monitor, tracker])

    for p, q in zip(plain.parameters(), monitored.parameters(), strict=True):
        assert torch.equal(p, q)
    history = monitor.history
    assert torch.equal(history[:, 0], history[:, 1])
    torch.testing.assert_close(history[:, 0].double(), torch.stack(tracker.ratios), rtol=1e-5, atol=0)
    assert spreads(history[:, 0]).min() > 3
    logged = [m for _, m in logger.records if "update_ratio/spread" in m]
    assert len(logged) == 6
    assert {f"update_ratio/block_{i:02d}" for i in range(4)} <= logged[0].keys()
    assert not any(k.startswith("equal_step/") for m in logged for k in m)


def test_include_parts_and_target_none() -> None:
    L.seed_everything(0, verbose=False)
    control = EqualStep(target=None, include=["head", "embeddings"])
    fit(ToyModule(freeze=(1,)), [control], steps=2)
    assert control.layer_names == ["embeddings", "block_00", "block_02", "block_03", "head"]
    assert torch.equal(control.history[:, 0], control.history[:, 1])

    L.seed_everything(0, verbose=False)
    control = EqualStep(include=["embeddings", "final_norm", "head"])
    fit(ToyModule(), [control], steps=3)
    assert control.layer_names[0] == "embeddings" and control.layer_names[-2:] == ["final_norm", "head"]
    assert_equal_ratios(control.history[:, 1], rtol=2e-5)  # re-measured from the stored float32 weights


class StartAt(L.Callback):
    def __init__(self, control: EqualStep, step: int) -> None:
        self.control, self.step = control, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.control.enabled = trainer.global_step >= self.step


def test_enabled_switches_between_steps_and_summary() -> None:
    L.seed_everything(0, verbose=False)
    control, tracker = EqualStep(), RatioTracker()
    fit(ToyModule(), [control, StartAt(control, 2), tracker], steps=6)
    assert control.steps == 4
    actual = torch.stack(tracker.ratios)
    assert spreads(actual[:2]).min() > 3
    assert_equal_ratios(actual[2:], rtol=2e-5)
    summary = control.summary()
    assert summary["steps"] == 4 and summary["layers"] == control.layer_names
    assert summary["spread_after_median"] == pytest.approx(1, abs=1e-6)
    assert summary["spread_before_median"] > 3


def test_bad_arguments() -> None:
    for bad in ("avg", 0.0, -1.0, True):
        with pytest.raises(ValueError, match="target"):
            EqualStep(target=bad)
    with pytest.raises(ValueError, match="unknown parts"):
        EqualStep(include=["lm_head"])
    with pytest.warns(UserWarning, match="final_norm"):
        names, _ = collect_layers(Toy(), include=["final_norm"])
    assert names[0] == "block_00"
    with pytest.raises(ValueError, match="blocks"):
        collect_layers(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="snapshot"):
        EqualStepCore([[nn.Parameter(torch.ones(2))]]).update()


# 2. The core against a per-tensor float64 reference.


class Toy(nn.Module):
    """Blocks: normal, frozen, zero update (unused in the loss), partly frozen, normal; tied embed/head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(5))
        self.blocks[1].requires_grad_(False)
        self.blocks[3][0].bias.requires_grad_(False)
        self.embed = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6)
        self.head.weight = self.embed.weight
        self.parts = {"embeddings": self.embed, "head": self.head}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for i, block in enumerate(self.blocks):
            if i != 2:
                x = x + (i + 1) * block(x)
        return self.head(x).sum()


def frozen_params(model: Toy) -> list[torch.Tensor]:
    return [*model.blocks[1].parameters(), model.blocks[3][0].bias]


def reference(
    old: list[list[torch.Tensor]], new: list[list[torch.Tensor]], target: str | float
) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Plain loop in float64: the expected W after control, and the ratios before."""
    ratios = []
    for o, n in zip(old, new, strict=True):
        d2 = sum(float(((b.double() - a.double()) ** 2).sum()) for a, b in zip(o, n, strict=True))
        w2 = sum(float((a.double() ** 2).sum()) for a in o)
        ratios.append(d2**0.5 / w2**0.5)
    moved = sorted(r for r in ratios if r > 0)
    k = len(moved)
    r_star = {
        "mean": sum(moved) / k,
        "max": max(moved),
        "median": (moved[(k - 1) // 2] + moved[k // 2]) / 2,
    }.get(target, target)
    expected = []
    for o, n, r in zip(old, new, ratios, strict=True):
        s = r_star / r if r > 0 else 1.0
        expected.append([a.double() + s * (b.double() - a.double()) for a, b in zip(o, n, strict=True)])
    return expected, torch.tensor(ratios, dtype=torch.float64)


@pytest.mark.parametrize("target", ["mean", "median", "max", 0.05])
def test_core_matches_float64_reference(target: str | float) -> None:
    torch.manual_seed(0)
    model = Toy()
    names, layers = collect_layers(model, include=["embeddings", "head"])
    block_names = ["block_00", "block_02", "block_03", "block_04"]  # frozen block_01 dropped
    assert names == ["embeddings", *block_names, "head"]
    assert layers[-1] == [model.head.bias]  # the tied weight belongs to the embeddings only
    core = EqualStepCore(layers, target=target, names=names)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).backward()
        old = [[p.detach().clone() for p in ps] for ps in layers]
        frozen = [p.detach().clone() for p in frozen_params(model)]
        core.snapshot()
        opt.step()
        new = [[p.detach().clone() for p in ps] for ps in layers]
        core.update()
        expected, ratios = reference(old, new, target)
        torch.testing.assert_close(core.ratio_before.double(), ratios, rtol=1e-5, atol=0)
        for ps, exp in zip(layers, expected, strict=True):
            for p, e in zip(ps, exp, strict=True):
                # fp32 rounding: a few ulp of the tensor's largest entry (the step itself is ~1e4x larger)
                torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-6 * e.abs().max().item())
        zero = names.index("block_02")
        assert core.ratio_before[zero] == 0 and core.ratio_after[zero] == 0
        assert all(torch.equal(a, b) for a, b in zip(old[zero], layers[zero], strict=True))  # left alone
        assert torch.isfinite(core.ratio_after).all()
        after = core.ratio_after[ratios > 0]
        r_star = target if isinstance(target, float) else after[0].item()
        torch.testing.assert_close(after, torch.full_like(after, r_star), rtol=1e-6, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(frozen, frozen_params(model), strict=True))
    assert core.history.shape == (3, 2, 6) and core.steps == 3


def test_core_attach_and_nothing_moved() -> None:
    w = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))]
    core = EqualStepCore([[w[0]], [w[1]]], target="median")
    opt = torch.optim.SGD(w, lr=0.1)
    handles = core.attach(opt)
    opt.step()  # no gradients: nothing moves, no NaN, still one controlled step
    assert core.steps == 1 and torch.equal(core.ratio_after, torch.zeros(2))
    assert torch.equal(w[0], torch.ones(3))
    for h in handles:
        h.remove()
    opt.step()
    assert core.steps == 1


# 3. Gradient accumulation.


def test_accumulation_controls_only_real_steps() -> None:
    L.seed_everything(0, verbose=False)
    control, tracker = EqualStep(), RatioTracker()
    trainer, logger = fit(
        ToyModule(), [control, tracker], steps=-1, n=28, max_epochs=1, accumulate_grad_batches=3
    )
    assert trainer.global_step == 3  # 7 batches, windows of 3: 3 + 3 + 1
    assert control.steps == 3 and control.history.shape[0] == 3
    assert len(tracker.ratios) == 3
    assert_equal_ratios(torch.stack(tracker.ratios), rtol=2e-5)
    assert sum("equal_step/spread_after" in m for _, m in logger.records) == 3


# 4. fp16 (GradScaler skips a step) and bf16-mixed.


def test_fp16_step_skipped_by_scaler_is_left_alone() -> None:
    L.seed_everything(0, verbose=False)
    control, tracker = EqualStep(), RatioTracker()
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer, logger = fit(ToyModule(inf_grad_at_step=2), [control, tracker], steps=5, plugins=[fp16])
    assert trainer.global_step == 5  # Lightning counts the skipped step
    assert control.steps == 4  # the post-hook did not fire for it
    assert len(tracker.ratios) == 4  # and the weights did not move on it
    assert_equal_ratios(torch.stack(tracker.ratios), rtol=2e-5)
    logged_steps = [step for step, m in logger.records if "equal_step/spread_after" in m]
    assert logged_steps == [0, 1, 3, 4]  # nothing logged for the skipped step (global step 3)


def test_bf16_mixed() -> None:
    L.seed_everything(0, verbose=False)
    control, tracker = EqualStep(), RatioTracker()
    fit(ToyModule(), [control, tracker], steps=4, precision="bf16-mixed")
    assert control.steps == 4
    assert_equal_ratios(control.history[:, 1], rtol=2e-5)  # re-measured from the stored float32 weights
    assert_equal_ratios(torch.stack(tracker.ratios), rtol=2e-5)


# 5. Gradient clipping and an LR schedule.


def test_clipping_and_scheduler() -> None:
    L.seed_everything(0, verbose=False)
    control, tracker = EqualStep(target="median"), RatioTracker()
    module = ToyModule(optimizer="sgd", lr=2.0, scheduler=True)
    trainer, _ = fit(module, [control, tracker], steps=4, gradient_clip_val=0.05)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2.0 * 0.5**4)
    assert_equal_ratios(torch.stack(tracker.ratios), rtol=2e-5)
    assert_equal_ratios(control.history[:, 1], rtol=2e-5)  # re-measured from the stored float32 weights
    assert spreads(control.history[:, 0]).min() > 3


# 6 and 7. Two processes (gloo): Lightning DDP, and FSDP2 shards driven by the core.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Fork two ranks from this process (imports already paid; no Lightning launcher, no sys.argv re-exec)."""
    import equal_step_dist_worker as worker

    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(
        worker.forked, args=(2, str(out), _free_port()), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("two-process worker timed out")
    return _load(out)


def check_ddp(ranks: list[dict]) -> None:
    a, b = (r["ddp"] for r in ranks)
    assert a["world_size"] == b["world_size"] == 2
    assert a["first_batch"] != b["first_batch"]  # each rank saw its own data
    for p, q in zip(a["params"], b["params"], strict=True):
        assert torch.equal(p, q)
    assert a["history"].shape == (4, 2, 4)
    assert torch.equal(a["history"], b["history"])
    assert_equal_ratios(a["history"][:, 1], rtol=1e-6)
    assert spreads(a["history"][:, 0]).min() > 3


def check_fsdp2(ranks: list[dict]) -> None:
    for r in ranks:
        f = r["fsdp2"]
        assert f["max_abs_diff"] < 1e-5  # gathered FSDP2 params == unsharded equal-step run
        assert f["all_reduce_per_step"] == [2, 2, 2, 2]  # two collectives per step, nothing gathered:
        # the stacked [3, n_layers] sums of squares (W_old, ΔW, gradient), then the re-measured ||W_final - W_old||
        assert f["all_reduce_shapes"] == [(3, 3), (1, 3)] * 4
        torch.testing.assert_close(f["history"], f["ref_history"], rtol=1e-5, atol=0)
        assert_equal_ratios(f["history"][:, 1], rtol=1e-6)
    assert ranks[1]["fsdp2"]["local_numels"][0] == 0  # the size-1 gate: an empty shard on rank 1


def test_ddp_two_processes(two_ranks: list[dict]) -> None:
    check_ddp(two_ranks)


def test_fsdp2_two_processes(two_ranks: list[dict]) -> None:
    check_fsdp2(two_ranks)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path) -> None:
    """The same worker under torchrun (TorchElastic environment), as a user would launch it (~25 s)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run(
        [*cmd, str(HERE / "equal_step_dist_worker.py"), str(tmp_path)], check=True, env=env, timeout=300
    )
    ranks = _load(tmp_path)
    check_ddp(ranks)
    check_fsdp2(ranks)


# 7. Regimes where the promise could break: low precision, zero gradients, weight decay.


def _core_step(core: EqualStepCore, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).backward()
    core.snapshot()
    opt.step()
    core.update()


def test_after_ratios_are_re_measured_from_the_stored_weights() -> None:
    """In bfloat16 the rescale is undone by rounding; `ratio_after` says so instead of echoing the target."""
    spreads_by_dtype = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Toy().to(dtype)
        names, layers = collect_layers(model)
        core = EqualStepCore(layers, target="mean", names=names)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        x = torch.randn(4, 6, dtype=dtype)
        old = [[p.detach().double().clone() for p in ps] for ps in layers]
        _core_step(core, model, opt, x)
        stored = torch.tensor(
            [
                sum(((p.detach().double() - o) ** 2).sum() for p, o in zip(ps, os_, strict=True)).sqrt()
                / sum((o**2).sum() for o in os_).sqrt()
                for ps, os_ in zip(layers, old, strict=True)
            ]
        )
        moved = core.ratio_after > 0
        torch.testing.assert_close(core.ratio_after[moved].double(), stored[moved], rtol=1e-2, atol=0)
        spreads_by_dtype[dtype] = (core.ratio_after[moved].max() / core.ratio_after[moved].min()).item()
    assert spreads_by_dtype[torch.float32] < 1 + 1e-4
    assert spreads_by_dtype[torch.bfloat16] > 1.01  # rounding to 8 bits of mantissa: far from equal


def test_low_precision_block_parameters_are_refused() -> None:
    L.seed_everything(0, verbose=False)
    with pytest.raises(ValueError, match=r"bfloat16 block parameters.*model.dtype=float32"):
        fit(ToyModule().to(torch.bfloat16), [EqualStep()], steps=1)
    control = UpdateRatioMonitor()  # measuring alone changes nothing, so it works in any dtype
    fit(ToyModule().to(torch.bfloat16), [control], steps=1)
    assert control.steps == 1


def test_a_block_without_gradient_is_left_alone_under_weight_decay() -> None:
    """block_02's output is multiplied by 0: its gradient is exactly zero and AdamW moves it by decay alone (and,
    after the first step, by momentum). Scaling that to the target would shrink or shake it."""

    class ZeroPath(Toy):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)
            for i, block in enumerate(self.blocks):
                x = x + (0.0 if i == 2 else i + 1) * block(x)
            return self.head(x).sum()

    torch.manual_seed(0)
    model = ZeroPath()
    names, layers = collect_layers(model)
    core = EqualStepCore(layers, target="mean", names=names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    zero = names.index("block_02")
    before = [p.detach().clone() for p in layers[zero]]
    _core_step(core, model, opt, torch.randn(4, 6))
    decayed = [b * (1 - 1e-2 * 0.1) for b in before]  # what AdamW did to it on step 1: decay only
    assert all(torch.allclose(p, d, rtol=0, atol=1e-7) for p, d in zip(layers[zero], decayed, strict=True))
    for _ in range(3):
        assert all(p.grad is not None and not p.grad.any() for p in layers[zero])
        assert core.ratio_before[zero] == 0 and core.ratio_after[zero] == 0
        after = core.ratio_after[core.ratio_after > 0]
        assert len(after) == len(names) - 1 and after.max() / after.min() < 1 + 1e-4
        _core_step(core, model, opt, torch.randn(4, 6))


def test_unscaled_decay_equalizes_the_gradient_part_and_applies_decay_as_adamw() -> None:
    torch.manual_seed(0)
    model = Toy()
    names, layers = collect_layers(model)
    lr, wd = 1e-2, 0.5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
    core = EqualStepCore(layers, target="mean", names=names)
    core.use_decay_from(opt)
    old = [[p.detach().double().clone() for p in ps] for ps in layers]
    _core_step(core, model, opt, torch.randn(4, 6))
    moved = [i for i, name in enumerate(names) if name != "block_02"]
    # W_final = (W_old + s ΔW_grad)(1 - lr wd): undo the decay, and the gradient parts have equal ratios
    grad_part = torch.tensor(
        [
            sum(
                ((p.detach().double() / (1 - lr * wd) - o) ** 2).sum()
                for p, o in zip(layers[i], old[i], strict=True)
            ).sqrt()
            / sum((o**2).sum() for o in old[i]).sqrt()
            for i in moved
        ]
    )
    assert grad_part.max() / grad_part.min() < 1 + 1e-4
    torch.testing.assert_close(grad_part, core.ratio_after[moved].double(), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="AdamW"):
        core.use_decay_from(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="decay"):
        EqualStep(decay="sometimes")


def test_summary_reports_the_largest_re_measured_spread_and_the_first_update_ratios() -> None:
    L.seed_everything(0, verbose=False)
    control = EqualStep()
    fit(ToyModule(), [control], steps=6)
    summary = control.summary()
    assert 1 <= summary["spread_after_max"] < 1 + 1e-4 and summary["decay"] == "scaled"
    assert summary["spread_after_max"] >= summary["spread_after_median"]
    first = control.first_update_ratios()
    assert len(first) == 5 and all(len(step) == 4 for step in first)  # 5 steps x 4 blocks, parts excluded
    torch.testing.assert_close(torch.tensor(first), control.history[:5, 0])


class MergedWeightTracker(L.Callback):
    """Reads every block's effective weights (LoRA merged: `block_state`) around each step."""

    def __init__(self) -> None:
        self.ratios: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from locality.measure.weights import block_state

        self._before = [{k: v.clone() for k, v in block_state(b).items()} for b in pl_module.blocks]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from locality.measure.weights import block_state

        self.ratios.append(
            [
                (
                    sum(((after[k] - v) ** 2).sum() for k, v in before.items())
                    / sum((v**2).sum() for v in before.values())
                )
                .sqrt()
                .item()
                for before, after in zip(
                    self._before, (block_state(b) for b in pl_module.blocks), strict=True
                )
            ]
        )


def test_lora_runs_log_the_ratios_of_the_merged_weights_and_equal_step_refuses_them() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    def lora_toy() -> ToyModule:
        module = ToyModule()
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]), module)
        for name, p in module.named_parameters():
            p.requires_grad = "lora_" in name or name.startswith("head")
        return module

    L.seed_everything(0, verbose=False)
    monitor, tracker = UpdateRatioMonitor(), MergedWeightTracker()
    fit(lora_toy(), [monitor, tracker], steps=4)
    measured = monitor.history[:, 0]
    assert measured.shape == (4, 4) and (measured > 0).all()  # B = 0 at first, yet the merged weights move
    torch.testing.assert_close(measured, torch.tensor(tracker.ratios), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="effective weights"):
        fit(lora_toy(), [EqualStep()], steps=1)

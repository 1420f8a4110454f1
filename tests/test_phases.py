"""Through the CLI: each silent phase of a run says once, in order, how long it took; the terminal carries no
epoch counter for a step-based run, no W&B deprecation warning, and each no-interval note once."""

from __future__ import annotations

import re

from tests.test_train_cli import FAST, cli

PHASES = [
    "pre-capture of 64 probe sequences",
    "step 0 (the objective distance at initialization)",
    "NTK at initialization on 4 examples",
    "post-capture of 64 probe sequences",
    "metrics and intervals (50 bootstrap replicates)",
]


def test_each_silent_phase_prints_one_timed_line_in_order(tmp_path):
    proc = cli(
        "model=tiny_gpt2",
        "objective=clm",
        *FAST,
        "trainer.max_steps=4",
        "trainer.enable_progress_bar=true",
        "logger=wandb",
        "measure.ntk=true",
        "measure.ntk_examples=4",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("locality: ")]
    found = [
        next((i for i, line in enumerate(lines) if line.startswith(f"locality: {p}")), None) for p in PHASES
    ]
    assert None not in found and found == sorted(found), lines
    for phase in PHASES:
        assert sum(line.startswith(f"locality: {phase}") for line in lines) == 1, lines
    assert all(re.search(r": \d+\.\d s( \(.+\))?$", lines[i]) for i in found), lines
    everything = proc.stdout + proc.stderr
    assert "step: 100%" in proc.stdout and "4/4" in proc.stdout  # one bar over the optimizer steps
    assert "Epoch" not in everything and "anonymous" not in everything
    # d = 64 > n/4 = 16: cka_linear has no interval, said once (under the profile table), not again as a warning
    assert everything.count("cka_linear: no interval") == 1

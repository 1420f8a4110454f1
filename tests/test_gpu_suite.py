"""bench/gpu_suite.py's dry run: every GPU figure at a tiny size on the CPU, so the suite cannot rot before the
first GPU arrives. Not a measurement: the report says so in every figure's result."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("loop_overhead", "equal_step_124m", "mfu_355m_eager", "mfu_355m_compile", "fsdp", "smollm2_step")
DRY_RUN = "dry-run (not a measurement)"


def test_the_dry_run_reports_every_figure_with_a_value_or_a_reason(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # the same dry run with or without a GPU
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["schema"] == "locality.gpu_suite/1" and report["dry_run"] is True
    assert report["device"]["name"] and report["device"]["figures_on"] == "cpu"
    assert {"torch", "transformers", "lightning"} <= set(report["versions"])
    assert list(report["figures"]) == list(FIGURES)
    for key, figure in report["figures"].items():
        assert figure["error"] is None, (key, figure.get("traceback"))
        if figure["status"] == "skipped":
            assert figure["skip_reason"], key
        else:
            assert figure["status"] == DRY_RUN, (key, figure["status"])
            assert isinstance(figure["value"], float) and math.isfinite(figure["value"]), key
    skipped = {k for k, f in report["figures"].items() if f["status"] == "skipped"}
    assert skipped <= {"smollm2_step"}  # only the figure whose package may be absent
    assert report["figures"]["fsdp"]["details"]["every_layer"] is True

    table = (out / "gpu_suite.md").read_text()
    assert "Not a measurement" in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(FIGURES)
    for row in rows:
        assert DRY_RUN in row or "skipped" in row, row

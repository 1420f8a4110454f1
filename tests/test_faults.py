"""Faults during a run lose nothing: a NaN stops training before a checkpoint stores it, every failure
leaves failed.json and never results.json, W&B trouble never kills a run, files keep the user's umask."""

from __future__ import annotations

import json
import math
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from locality.controls.base import Control
from locality.run.faults import NonFiniteLoss


class NaNAfter(Control):
    """Adds a NaN to the loss from optimizer step `at` on: a run whose loss diverges."""

    name = "nan_after"

    def __init__(self, at: int):
        self.at = at

    def penalty(self, module):
        if module.trainer.global_step >= self.at:
            return torch.tensor(float("nan"), device=module.device)
        return None


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(train, tmp_path):
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        train(
            "model=tiny_gpt2",
            "objective=clm",
            "logger=csv",
            "trainer.max_steps=8",
            "trainer.ckpt_every_n_steps=2",
            "+control.nan_after._target_=test_faults.NaNAfter",
            "+control.nan_after.at=2",
        )
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "results.json").exists()
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["step"] == 3 and "NonFiniteLoss" in failed["reason"] and "Traceback" in failed["traceback"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())
    assert "checkpoints/last.ckpt holds the last finite weights" in failed["reason"]


def test_a_non_finite_loss_before_any_checkpoint_does_not_claim_one(train, tmp_path):
    with pytest.raises(NonFiniteLoss, match="no checkpoint had been written yet"):
        train(
            "model=tiny_gpt2",
            "objective=clm",
            "trainer.max_steps=8",
            "trainer.ckpt_every_n_steps=4",
            "+control.nan_after._target_=test_faults.NaNAfter",
            "+control.nan_after.at=0",
        )
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not list((run_dir / "checkpoints").glob("*.ckpt"))


class RaiseAt(Control):
    name = "raise_at"

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at:
            raise RuntimeError("disk on fire")


def test_any_failure_writes_failed_json_and_a_success_clears_it(train, tmp_path):
    args = [
        "model=tiny_gpt2",
        "objective=clm",
        "logger=none",
        "trainer.max_steps=3",
        "+control.raise_at._target_=test_faults.RaiseAt",
        "+control.raise_at.at=2",
    ]
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(*args)
    (run_dir,) = (tmp_path / "runs").iterdir()
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed == failed | {"step": 2, "type": "RuntimeError", "reason": "RuntimeError: disk on fire"}
    results = train(*args[:-1], "+control.raise_at.at=99")  # another config: its own directory
    assert results["run"]["steps"] == 3
    assert not (tmp_path / "runs" / results["run"]["name"] / "failed.json").exists()


def test_a_full_disk_mid_run_is_one_clear_error_and_keeps_the_last_checkpoint(train, tmp_path, monkeypatch):
    """The third checkpoint write fails with ENOSPC: the run stops with a paragraph, the second stays loadable."""
    import errno

    from lightning.fabric.plugins.io import torch_io

    from locality.core.errors import UserError

    real_save, writes = torch_io._atomic_save, []

    def filling_disk(checkpoint, path):
        writes.append(path)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", filling_disk)
    with pytest.raises(UserError) as stopped:
        train(
            "model=tiny_gpt2",
            "objective=clm",
            "logger=none",
            "trainer.max_steps=6",
            "trainer.ckpt_every_n_steps=1",
        )
    (run_dir,) = (tmp_path / "runs").iterdir()
    message = " ".join(str(stopped.value).split())
    assert message.startswith(
        "The run stopped at step 3 because the checkpoint of step 3 could not be written"
    )
    assert f"The checkpoint of step 2 is kept ({run_dir / 'checkpoints' / 'last.ckpt'})" in message
    assert "pending.ckpt" not in message  # the temporary file is not what the user keeps
    assert not (run_dir / "results.json").exists()
    assert "No space left on device" in json.loads((run_dir / "failed.json").read_text())["reason"]
    kept = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert kept["global_step"] == 2  # the write that failed replaced nothing
    monkeypatch.setattr(torch_io, "_atomic_save", real_save)  # space freed: the same command resumes
    results = train(
        "model=tiny_gpt2",
        "objective=clm",
        "logger=none",
        "trainer.max_steps=6",
        "trainer.ckpt_every_n_steps=1",
    )
    assert results["run"]["steps"] == 6 and results["run"]["resumed_from_steps"] == [2]


def test_results_json_has_the_users_umask(train, tmp_path):
    old = os.umask(0o022)
    try:
        results = train("model=tiny_gpt2", "objective=cls", "logger=none")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "runs" / results["run"]["name"] / "results.json").stat().st_mode)
    assert mode == 0o644


@pytest.mark.parametrize("api_key", [None, "x" * 40], ids=["no-api-key", "key-but-no-network"])
def test_wandb_failures_fall_back_to_csv_within_seconds(train, tmp_path, monkeypatch, capsys, api_key):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    if api_key:
        monkeypatch.setenv("WANDB_API_KEY", api_key)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    start = time.perf_counter()
    results = train("model=tiny_gpt2", "objective=cls", "logger=wandb", "logger.offline=false")
    elapsed = time.perf_counter() - start
    assert math.isfinite(results["profile"]["cosine"]["slope"])
    assert "W&B is unavailable" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / results["run"]["name"]
    assert (run_dir / "csv" / "metrics.csv").is_file() and (run_dir / "results.json").is_file()
    assert elapsed < 60


def test_ctrl_c_says_where_the_checkpoint_is_and_marks_the_run_interrupted(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "locality.train", "model=tiny_gpt2", "objective=clm", "logger=none"]
    command += ["measure=fast", "trainer.max_steps=100000", "trainer.ckpt_every_n_steps=2"]
    command += ["trainer.enable_progress_bar=false", "objective.max_length=32", "data.batch_size=4"]
    env = {**os.environ, "LOCALITY_OUTPUTS": str(tmp_path)}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("runs/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert proc.returncode == 130, stderr[-2000:]
    named = stderr.split("the last checkpoint is ")[1].split(". Relaunch")[0]
    # last.ckpt, or previous.ckpt when the signal lands while a new checkpoint is being put in place
    assert (
        named in {str(run_dir / "checkpoints" / n) for n in ("last.ckpt", "previous.ckpt")}
        and Path(named).is_file()
    )
    assert "Relaunch the same command to resume from it." in stderr and "Traceback" not in stderr
    failed = json.loads((run_dir / "failed.json").read_text())
    assert (
        failed["reason"] == "interrupted" and failed["step"] >= 2 and not (run_dir / "results.json").exists()
    )

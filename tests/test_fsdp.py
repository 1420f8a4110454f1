"""FSDP2 end to end through the CLI: `trainer=fsdp` on 2 CPU processes (gloo) inside a Hydra multirun job.

The sharded run trains with the equal-step control (its re-measured after-control spread stays within 1e-5
of 1), measures on sharded weights (weight_rel from local shards and one all-reduce; cosine_tokens with this
rank's pretrained shards swapped in), writes one results.json, and agrees with the same run on one process
with the same global batch (2 x 4 = 8). Its checkpoints are folders of shards; a relaunch resumes from one.
Refusals of what sharding does not support are checked before any work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locality.run.rundir import checkpoint_step

NO_DROPOUT = [f"+model.config_overrides.{k}=0.0" for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
RUN = [
    "model=tiny_gpt2",
    "objective=cls",
    "objective.head_dropout=0.0",
    *NO_DROPOUT,
    "control=equal_step",
    "measure=fast",
    "logger=csv",
    "trainer.max_steps=6",
    "trainer.ckpt_every_n_steps=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.deterministic=true",
    "data.eval_batch_size=32",
    "data.n_validation=16",
    "objective.max_length=32",
]
SHARDED = [
    "trainer=fsdp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.strategy.param_dtype=float32",  # to compare with a float32 run on one process
    "data.batch_size=4",  # per process: a global batch of 8
]
PROFILE_TOLERANCE = 1e-4  # relative, per layer (measured: <= 1.8e-6; float32 sums in another order)


def cli(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "locality.train", *args],
        cwd=cwd,
        env={**os.environ, "LOCALITY_OUTPUTS": str(cwd / "outputs"), "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def close(a: list, b: list, tolerance: float) -> bool:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None]
    return all(abs(x - y) <= tolerance * max(abs(x), abs(y), 1e-12) for x, y in pairs)


@pytest.mark.slow
def test_sharded_run_in_a_sweep_matches_one_process_and_resumes_from_shards(tmp_path):
    sweep = cli("-m", *RUN, *SHARDED, "seed=0", "sweep_name=fsdp", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    outputs = tmp_path / "outputs"
    found = list(outputs.rglob("results.json"))
    assert len(found) == 1 and found[0].parent.parent == outputs / "sweeps" / "fsdp", found
    assert not (outputs / "runs").exists()  # the second process ran this job, not a sweep or a run of its own
    assert sweep.stdout.count("Depth profile of") == 1
    sharded = json.loads(found[0].read_text())
    summary = sharded["controls"]["equal_step"]
    assert sharded["run"]["steps"] == 6 and summary["steps"] == 6
    assert abs(summary["spread_after_max"] - 1) < 1e-5, summary

    checkpoints = found[0].parent / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "previous.ckpt"]
    assert (checkpoints / "last.ckpt").is_dir() and len(
        list((checkpoints / "last.ckpt").glob("*.distcp"))
    ) == 2
    assert checkpoint_step(checkpoints / "last.ckpt")[0] == 6
    assert checkpoint_step(checkpoints / "previous.ckpt")[0] == 3

    single = cli(*RUN, "data.batch_size=8", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-4000:]
    one = json.loads(next((outputs / "runs").rglob("results.json")).read_text())
    assert one["run"]["name"] != sharded["run"]["name"]
    for metric in ("cosine", "cosine_tokens", "cka_debiased", "euclidean", "weight_rel"):
        assert close(sharded["change"][metric], one["change"][metric], PROFILE_TOLERANCE), (
            metric,
            sharded["change"][metric],
            one["change"][metric],
        )
    assert min(sharded["change"]["cosine_tokens"][1:]) > 0  # the pretrained weights did run (not ~0)
    assert abs(sharded["final"]["loss"] - one["final"]["loss"]) < 1e-3

    # interrupted after step 3: only the checkpoint of step 3 is left, and no results.json
    (found[0]).unlink()
    shutil.rmtree(checkpoints / "last.ckpt")
    (checkpoints / "previous.ckpt").rename(checkpoints / "last.ckpt")
    again = cli("-m", *RUN, *SHARDED, "seed=0", "sweep_name=fsdp", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    resumed = json.loads(found[0].read_text())
    assert resumed["run"]["resumed_from_steps"] == [3] and resumed["run"]["steps"] == 6
    for metric in ("cosine", "weight_rel"):
        assert close(resumed["change"][metric], sharded["change"][metric], 1e-4), metric
    assert abs(resumed["controls"]["equal_step"]["spread_after_max"] - 1) < 1e-5


def test_what_sharding_does_not_support_is_refused_before_any_work(tmp_path):
    """All at once, in one paragraph, from the config alone (the CLI path to exit 2 is tests/test_checks.py's)."""
    from locality.core.config import compose_train
    from locality.core.errors import UserError
    from locality.run.checks import preflight, validate

    refused = ["control=l2sp", "measure.ntk=true", "measure.drop_top_k=1", "model.dtype=bfloat16"]
    cfg = validate(compose_train([*RUN, *SHARDED, *refused, f"outputs_root={tmp_path}"]))
    with pytest.raises(UserError) as error:
        preflight(cfg)
    message = " ".join(str(error.value).split())
    assert "trainer=fsdp" in message and "Supported there" in message
    for named in ("control l2sp", "measure.ntk=true", "measure.drop_top_k", "model.dtype=bfloat16"):
        assert named in message, named
    assert preflight(validate(compose_train([*RUN, *SHARDED, f"outputs_root={tmp_path}"]))).controls


def fake_shard(rank: int, world: int, local_rows: int):
    """What `local_shard` reads of a DTensor: its placements, mesh coordinate and size, local shape."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Shard

    mesh = SimpleNamespace(get_coordinate=lambda: [rank], size=lambda dim: world)
    return SimpleNamespace(
        placements=(Shard(0),), device_mesh=mesh, to_local=lambda: torch.empty(local_rows, 3)
    )


def test_the_pretrained_reference_is_cut_to_the_shard_fsdp2_holds():
    """`local_shard` takes the rows torch.chunk gives each rank, as FSDP2's Shard(0) does (uneven sizes too)."""
    from locality.measure.weights import local_shard

    full = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)
    assert torch.equal(local_shard(full, fake_shard(0, 2, 4)), full[:4])
    assert torch.equal(local_shard(full, fake_shard(1, 2, 3)), full[4:])
    assert local_shard(full, fake_shard(3, 4, 1)).shape == (1, 3)  # chunks of 2, 2, 2, 1
    with pytest.raises(ValueError, match="cannot cut"):
        local_shard(full, fake_shard(0, 2, 3))


@pytest.mark.slow
def test_torchrun_starts_the_processes_of_a_sharded_run(tmp_path):
    """torchrun instead of Lightning: each process runs the command; rank zero alone writes and prints."""
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "-m",
            "locality.train",
            *RUN,
            *SHARDED,
            "trainer.max_steps=3",
        ],
        cwd=tmp_path,
        env={**os.environ, "LOCALITY_OUTPUTS": str(tmp_path / "outputs"), "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (found,) = (tmp_path / "outputs").rglob("results.json")
    assert proc.stdout.count("Depth profile of") == 1
    results = json.loads(found.read_text())
    assert results["run"]["steps"] == 3
    assert abs(results["controls"]["equal_step"]["spread_after_max"] - 1) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("model", "tied"), [("tiny_gpt2", True), ("tiny_pythia", False)])
def test_causal_lm_shards_with_a_tied_and_an_untied_head(tmp_path, model, tied):
    """GPT-2's LM head is the input embedding (one FSDP unit with it); Pythia's embed_out is its own weight."""
    from transformers import AutoConfig

    from locality.core.config import load_option

    spec = load_option("model", model)
    assert AutoConfig.for_model(spec.arch, **spec.config_overrides).tie_word_embeddings == tied
    command = [sys.executable, "-m", "locality.train", f"model={model}", "objective=clm", *RUN[3:], *SHARDED]
    proc = subprocess.run(
        [*command, "trainer.max_steps=3"],
        env={**os.environ, "LOCALITY_OUTPUTS": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (found,) = tmp_path.rglob("results.json")
    results = json.loads(found.read_text())
    assert results["run"]["steps"] == 3 and results["run"]["objective"] == "clm"
    assert abs(results["controls"]["equal_step"]["spread_after_max"] - 1) < 1e-5


def test_a_tied_lm_head_is_detected_for_the_sharding_plan():
    import torch

    from locality.backbones import load_backbone
    from locality.core.config import ModelConf, load_option
    from locality.run.sharding import ties_outside

    for name, tied in (("tiny_gpt2", True), ("tiny_pythia", False)):
        spec = ModelConf(**{**load_option("model", name), "init": "random"})
        torch.manual_seed(0)
        backbone = load_backbone(spec, head="causal_lm")
        assert ties_outside(backbone.base, backbone.model) is tied
        assert not ties_outside(backbone.base, backbone.base)

"""Resume equals uninterrupted: the data position, RNG states, control histories and logs survive a kill.

In-process with a toy module (fast): batches, random draws, weights and the equal-step history of a run that
was interrupted and resumed equal those of an uninterrupted run, mid-epoch and at an epoch's end. Then the
real CLI in subprocesses: a run SIGKILLed after its first checkpoint and relaunched writes the same
results.json as an uninterrupted one; a damaged last.ckpt is reported in one paragraph.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import FAST as TRAIN_FAST
from lightning.pytorch.loggers import Logger
from torch import nn

from locality.controls import EqualStep
from locality.data.datamodule import LocalityDataModule, ResumableLoader
from locality.run.resume import AppendingCSVLogger, KeepPreviousCheckpoint, RunState

# ---------------------------------------------------------------------------------------------- in-process


class Toy(L.LightningModule):
    """Two residual blocks with dropout; records which examples every training step saw."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.3), nn.Tanh()) for _ in range(2)
        )
        self.head = nn.Linear(16, 3)
        self.parts = {"embeddings": self.embed, "head": self.head}
        self.seen: list[list[int]] = []

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["idx"].tolist())
        loss = nn.functional.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch["x"]), batch["y"]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def collate(examples):
    """Draws from the global RNG, as MLM masking does: the resumed run must draw the same numbers."""
    x = torch.stack([e["x"] for e in examples])
    return {
        "x": x + 0.1 * torch.rand_like(x),
        "y": torch.tensor([e["y"] for e in examples]),
        "idx": torch.tensor([e["idx"] for e in examples]),
    }


def toy_data(n_train: int) -> LocalityDataModule:
    g = torch.Generator().manual_seed(1)
    examples = [{"x": torch.randn(8, generator=g), "y": i % 3, "idx": i} for i in range(n_train + 8)]
    splits = SimpleNamespace(train=examples[:n_train], validation=examples[n_train:], probe=[])
    objective = SimpleNamespace(collate=collate, tokenize=None, max_length=8)
    return LocalityDataModule(splits, objective, batch_size=4, eval_batch_size=8, seed=0)


class Killed(Exception):
    pass


class Stop(L.Callback):
    """Stops training abruptly after step `at` (before that step's checkpoint)."""

    def __init__(self, at: int | None):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.at is not None and trainer.global_step >= self.at:
            raise Killed


def fit(
    tmp_path: Path,
    n_train: int,
    stop_at: int | None = None,
    max_steps: int = 25,
    watch: Logger | None = None,
    extra: tuple[L.Callback, ...] = (),
):
    L.seed_everything(0, verbose=False)
    module, state, control = Toy(), RunState(), EqualStep()
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        logger=[*([watch] if watch else []), AppendingCSVLogger(tmp_path, name="csv", version="")],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        accelerator="cpu",
        devices=1,
        callbacks=[
            control,
            Stop(stop_at),
            state,
            *extra,
            KeepPreviousCheckpoint(
                dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=5
            ),
        ],
    )
    last = tmp_path / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=toy_data(n_train), ckpt_path=str(last) if last.is_file() else None)
    return module, control, state, trainer


def logged_steps(run: Path) -> list[int]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


class KillWatch(Logger):
    """Listed before the CSV logger: every time Lightning logs, it looks at what a kill at that moment would
    leave on disk (the step of last.ckpt, the training steps in metrics.csv)."""

    def __init__(self, run: Path):
        super().__init__()
        self.run, self.views, self._seen = run, [], None

    name = version = "watch"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        last = self.run / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return
        if self._seen is None or self._seen[0] != last.stat().st_mtime_ns:
            self._seen = last.stat().st_mtime_ns, torch.load(last, weights_only=False)["global_step"]
        on_disk = logged_steps(self.run) if (self.run / "csv" / "metrics.csv").is_file() else []
        self.views.append((self._seen[1], on_disk))


class AtFitEnd(L.Callback):
    """The step of the last.ckpt on disk when `on_fit_end` starts (where the end-of-run measurement runs)."""

    def __init__(self, run: Path):
        self.run, self.step = run, None

    def on_fit_end(self, trainer, pl_module):
        self.step = torch.load(self.run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


def test_last_ckpt_is_never_ahead_of_the_metrics_on_disk(tmp_path):
    """A step's checkpoint is saved before Lightning logs that step's training row: a kill right after
    last.ckpt appeared lost rows that the relaunch never logs again (found by CI's kill-and-relaunch test)."""
    watch, at_fit_end = KillWatch(tmp_path), AtFitEnd(tmp_path)
    fit(tmp_path, 44, watch=watch, extra=(at_fit_end,))
    assert {step for step, _ in watch.views} >= {5, 10, 15, 20}
    behind = [(step, steps) for step, steps in watch.views if steps[:step] != list(range(step))]
    assert behind == [], f"last.ckpt at step {behind[0][0]} while metrics.csv holds steps {behind[0][1]}"
    assert logged_steps(tmp_path) == list(range(25))
    assert not (tmp_path / "checkpoints" / "pending.ckpt").exists()
    assert at_fit_end.step == 25  # in place before the end-of-run work: a kill there resumes at the end


@pytest.mark.parametrize(("n_train", "where"), [(44, "mid-epoch"), (40, "at an epoch's end")])
def test_a_resumed_fit_equals_an_uninterrupted_one(tmp_path, n_train, where):
    """Epochs of 11 or 10 batches, checkpoints every 5 steps, stopped at step 13: resumed from step 10 (inside
    epoch 0, or its last batch); the resumed run crosses epoch ends (and validations) to step 25."""
    whole, whole_control, whole_state, _ = fit(tmp_path / "whole", n_train)
    run = tmp_path / "resumed"
    with pytest.raises(Killed):
        fit(run, n_train, stop_at=13)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "previous.ckpt").is_file()
    resumed, control, state, trainer = fit(run, n_train)

    assert (
        trainer.global_step == 25
        and state.resumed_from_steps == [10]
        and whole_state.resumed_from_steps == []
    )
    assert resumed.seen == whole.seen[10:], f"the resumed run ({where}) saw other batches"
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # bit-identical: same batches, same collate draws, same dropout masks
    assert control.steps == whole_control.steps == 25
    assert torch.equal(control.history, whole_control.history)
    assert control.summary() == whole_control.summary()
    assert state.wall_s > state.earlier_s > 0
    assert logged_steps(run) == logged_steps(tmp_path / "whole") == list(range(25))


def test_the_loader_position_survives_a_state_dict_round_trip():
    data = toy_data(44)
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    epoch0 = [b["idx"].tolist() for b in loader]
    epoch1 = [b["idx"].tolist() for b in loader]
    assert len(epoch0) == len(epoch1) == 11 and epoch0 != epoch1
    assert sorted(sum(epoch0, [])) == list(range(44))
    it = iter(loader)
    first = [next(it)["idx"].tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["batches"] == 3

    remaining = [b["idx"].tolist() for b in it]

    other = toy_data(44).train_dataloader()  # a fresh process: restore the position, then iterate
    other.load_state_dict(state)
    rest = [b["idx"].tolist() for b in other]
    assert rest == remaining and len(rest) == 8 and other.state_dict()["epoch"] == 2
    assert sorted(sum(first + rest, [])) == list(range(44))  # together, one whole epoch
    complete = toy_data(44).train_dataloader()
    complete.load_state_dict({"epoch": 0, "batches": 11})  # saved on the last batch of epoch 0: epoch 1 next
    assert [b["idx"].tolist() for b in complete] == epoch1


# ----------------------------------------------------------------------------------------------- the CLI

ARGS = [
    "model=tiny_gpt2",
    "model.init=random",
    "objective=cls",
    "control=equal_step",
    "measure=fast",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=40",
    "trainer.ckpt_every_n_steps=10",
    "trainer.log_every_n_steps=5",
    "measure.every_n_steps=10",
    "measure.kl_probe_train=0",
    "data=sst2",
    "data.name=local",
    "data.path=json",
    "data.subset=null",
    "data.text_field=text",
    "data.probe_split=null",
    "data.n_validation=16",
    "data.batch_size=4",
    "objective.max_length=32",
]
TIMING_KEYS = {"wall_s", "timings", "versions", "resumed_from_steps"}
WORDS = "the a model layer depth change python list dict value error file read write loop call return".split()


def local_data(folder: Path) -> str:
    """44 training examples (epochs of 11 batches: a 40-step run crosses three epoch ends and validations),
    and 80 held-out ones for the probe set (64) and validation (16)."""
    folder.mkdir()
    files = {}
    for split, n in (("train", 44), ("validation", 80)):
        rows = [
            {
                "text": f"{split} {i}: "
                + " ".join(WORDS[(i * k + len(split)) % len(WORDS)] for k in range(3, 12)),
                "label": i % 3,
            }
            for i in range(n)
        ]
        (folder / f"{split}.json").write_text("\n".join(json.dumps(r) for r in rows))
        files[split] = str(folder / f"{split}.json")
    return f"data.data_files={{train:{files['train']},validation:{files['validation']}}}"


def launch(out: Path, *extra: str, wait: bool = True):
    env = {**os.environ, "LOCALITY_OUTPUTS": str(out), "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "locality.train", *ARGS, *extra]
    if not wait:  # output to nowhere: a full pipe would stall the run
        return subprocess.Popen(
            cmd, cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


def numeric_leaves(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in TIMING_KEYS:
                yield from numeric_leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numeric_leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def run_dir(out: Path) -> Path:
    (found,) = (out / "runs").iterdir()
    return found


def metrics_rows(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_killed_and_relaunched_run_writes_the_results_of_an_uninterrupted_one(tmp_path):
    data = local_data(tmp_path / "data")
    whole = launch(tmp_path / "whole", data)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    proc = launch(out, data, wait=False)
    deadline = time.monotonic() + 300
    while not list(out.glob("runs/*/checkpoints/last.ckpt")):  # the first checkpoint: step 10 of 40
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = run_dir(out)
    assert not (run / "results.json").exists(), "the run finished before it was killed"
    again = launch(out, data)
    assert again.returncode == 0, again.stderr[-3000:]

    a = json.loads((run_dir(tmp_path / "whole") / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert a["run"]["resumed_from_steps"] == [] and b["run"]["resumed_from_steps"]
    assert b["run"]["steps"] == 40 and b["controls"]["equal_step"]["steps"] == 40 and len(b["dynamics"]) == 4
    leaves_a, leaves_b = dict(numeric_leaves(a)), dict(numeric_leaves(b))
    assert leaves_a.keys() == leaves_b.keys()
    numbers = [k for k, v in leaves_a.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    assert all(leaves_a[k] == leaves_b[k] for k in leaves_a.keys() - numbers)
    gaps = {k: abs(leaves_a[k] - leaves_b[k]) for k in numbers if leaves_b[k] is not None}
    assert [k for k in numbers if leaves_b[k] is None] == [] and len(numbers) > 200
    worst = max(gaps, key=gaps.get)
    print(
        f"resume: {len(numbers)} numbers, max |difference| = {gaps[worst]:.3g} ({worst}), "
        f"resumed from {b['run']['resumed_from_steps']}"
    )
    assert gaps[worst] <= 1e-6, {k: (leaves_a[k], leaves_b[k]) for k, g in gaps.items() if g > 1e-6}
    # one metrics.csv with every row of the uninterrupted run's, in order (train, equal-step, dynamics, val)
    rows = metrics_rows(run)
    assert rows == metrics_rows(run_dir(tmp_path / "whole"))
    assert [int(r["step"]) for r in rows if "train/loss" in r] == list(range(4, 40, 5))


def test_a_damaged_checkpoint_is_reported_with_the_way_out(train, tmp_path):
    """A cut-short last.ckpt: the relaunch exits 2 before loading anything, with one paragraph naming
    previous.ckpt and force=true; both ways out work."""
    args = [
        "model=tiny_gpt2",
        "model.init=random",
        "trainer.max_steps=4",
        "trainer.ckpt_every_n_steps=2",
        "logger=csv",
        "measure.kl_probe_train=0",
        "measure.n_boot=40",
        "measure.n_boot_procrustes=0",
    ]
    train(*args)
    run = run_dir(tmp_path)
    last, previous = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "previous.ckpt"
    assert last.is_file() and previous.is_file()

    def damage():
        (run / "results.json").unlink()  # as if killed while writing the step-4 checkpoint
        data = last.read_bytes()
        last.write_bytes(data[: len(data) // 2])

    damage()
    env = {**os.environ, "LOCALITY_OUTPUTS": str(tmp_path), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "locality.train", *TRAIN_FAST, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = " ".join(proc.stderr.split())
    assert "Traceback" not in message and "last.ckpt cannot be used" in message, message
    assert "previous.ckpt, step 2" in message and "mv " in message and "force=true" in message, message
    assert "Loading" not in proc.stdout and "block" not in proc.stdout  # stopped before the model was built

    os.replace(previous, last)  # the first way out the message names
    assert train(*args)["run"]["resumed_from_steps"] == [2]

    damage()
    results = train(*args, "force=true")  # the second
    assert results["run"]["resumed_from_steps"] == [] and results["run"]["steps"] == 4


def test_a_checkpoint_changed_on_disk_is_refused_by_its_checksum(train, tmp_path):
    """A bit flipped in last.ckpt (same size, still loads) resumed silently and flipped a slope's sign; now the
    relaunch is refused with the way out, and previous.ckpt, which still matches, is offered."""
    from locality.core.errors import UserError

    args = ["model=tiny_gpt2", "model.init=random", "trainer.max_steps=4", "trainer.ckpt_every_n_steps=2"]
    args += ["measure.kl_probe_train=0", "measure.n_boot=40", "measure.n_boot_procrustes=0"]
    train(*args)
    run = run_dir(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    assert (run / "checkpoints" / "last.ckpt.sha256").is_file()
    (run / "results.json").unlink()  # as if killed after the last checkpoint
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x10
    last.write_bytes(bytes(data))
    torch.load(last, weights_only=False, map_location="cpu")  # the damage is invisible to the loader
    with pytest.raises(UserError, match=r"match no checksum .*previous.ckpt, step 2"):
        train(*args)

"""Extending locality without touching it: an objective, a control, an optimizer and a logger, each one .py and
one .yaml written outside the package (README, "Extending"), picked by name on the command line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

OBJECTIVE = '''
"""Word-count parity: is the number of words even? A new objective with its own head."""
import torch
from torch import nn

from locality.backbones import no_cache
from locality.objectives import Objective, StepOutput
from locality.core.pooling import pool


class WordParity(Objective):
    name = "parity"
    head_kind = "base"

    def __init__(self, backbone, task, max_length: int = 32, hidden: int = 8):
        super().__init__(backbone, task, max_length)
        self.head = nn.Sequential(nn.Linear(backbone.hidden_size, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    @property
    def num_classes(self) -> int:
        return 2

    def collate(self, examples):
        batch = self.tokenize([e["text"] for e in examples])
        batch["labels"] = torch.tensor([len(e["text"].split()) % 2 for e in examples])
        return batch

    def forward(self, model, batch):
        hidden = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache(model)
        )[0]
        logits = self.head(pool(hidden, batch["attention_mask"], "mean"))
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        return StepOutput(loss, logits.argmax(-1), batch["labels"])
'''

CONTROL = '''
"""Freeze every block but the top one, written against the control protocol only."""
from locality.controls import Control


class TopBlockOnly(Control):
    name = "top_only"

    def __init__(self, head_lr_scale: float = 1.0):
        if head_lr_scale <= 0:
            raise ValueError(f"head_lr_scale must be > 0, got {head_lr_scale}")
        self.head_lr_scale = head_lr_scale
        self.frozen = []

    def configure_model(self, module):
        for i, block in enumerate(module.blocks[:-1]):
            block.requires_grad_(False)
            self.frozen.append(i)

    def param_groups(self, module, groups):
        head = {id(p) for p in module.parts["head"].parameters()}
        lr = module.optimizer_settings["lr"]
        out = []
        for group in groups:
            for params, scale in (
                ([p for p in group["params"] if id(p) in head], self.head_lr_scale),
                ([p for p in group["params"] if id(p) not in head], 1.0),
            ):
                out.append({**group, "params": params, "lr": lr * scale})
        return out

    def summary(self):
        return {"frozen_blocks": self.frozen, "head_lr_scale": self.head_lr_scale}
'''

LOGGER = '''
"""Metrics to a plain CSV next to the run (Lightning's CSVLogger), under a directory name of our choosing."""
from lightning.pytorch.loggers import CSVLogger


def plain_csv(info, folder: str = "plain"):
    return CSVLogger(save_dir=info.run.path, name=folder, version="")
'''

YAMLS = {
    "objective/parity.yaml": """
        _target_: toy_ext.objective.WordParity
        name: parity
        max_length: 32
        hidden: 8
    """,
    "control/top_only.yaml": """
        top_only:
          _target_: toy_ext.control.TopBlockOnly
          head_lr_scale: 10.0
    """,
    "optim/rmsprop.yaml": """
        _target_: torch.optim.RMSprop
        _partial_: true
        lr: 1.0e-3
        weight_decay: 0.0
        momentum: 0.0
    """,
    "logger/plain_csv.yaml": """
        _target_: toy_ext.logger.plain_csv
        folder: plain
    """,
}


def write_extension(root: Path) -> Path:
    package = root / "toy_ext"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in (("objective", OBJECTIVE), ("control", CONTROL), ("logger", LOGGER)):
        (package / f"{name}.py").write_text(source)
    conf = root / "conf"
    for relative, text in YAMLS.items():
        (conf / relative).parent.mkdir(parents=True, exist_ok=True)
        (conf / relative).write_text(textwrap.dedent(text).lstrip())
    return conf


def run_cli(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "LOCALITY_OUTPUTS": str(root / "outputs")}
    return subprocess.run(
        [sys.executable, "-m", "locality.train", *overrides],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_objective_control_optimizer_and_logger_from_files_outside_the_package(tmp_path):
    conf = write_extension(tmp_path)
    proc = run_cli(
        tmp_path,
        f"hydra.searchpath=[file://{conf}]",
        "model=tiny_gpt2",
        "objective=parity",
        "control=top_only",
        "optim=rmsprop",
        "logger=plain_csv",
        "trainer=smoke",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "measure=fast",
        "data.batch_size=4",
        "data.n_validation=16",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    assert run.name.startswith("tiny_gpt2-parity-top_only-s0-")
    results = json.loads((run / "results.json").read_text())
    assert results["run"]["objective"] == "parity" and 0 <= results["final"]["acc"] <= 1
    assert results["controls"]["top_only"] == {"frozen_blocks": [0, 1, 2], "head_lr_scale": 10.0}
    assert results["change"]["weight_rel"][1:4] == [0.0, 0.0, 0.0] and results["change"]["weight_rel"][4] > 0
    rows = list(csv.DictReader((run / "plain" / "metrics.csv").open()))
    assert sum(1 for r in rows if r.get("train/loss")) == 3
    config = (run / "config.yaml").read_text()
    assert "torch.optim.RMSprop" in config and "toy_ext.objective.WordParity" in config


def test_an_extension_is_checked_like_a_builtin_before_any_work(tmp_path):
    conf = write_extension(tmp_path)
    search = f"hydra.searchpath=[file://{conf}]"
    refused = {
        "objective.hidden=wide": "objective.hidden='wide' is invalid: it must be an integer.",
        "+objective.depth=3": "objective has no argument(s) ['depth']; WordParity takes: max_length, hidden.",
        "control.top_only.head_lr_scale=-1": "control.top_only: head_lr_scale must be > 0, got -1",
        "+optim.nesterov=true": "optim has no argument(s) ['nesterov']; RMSprop takes:",
    }
    for override, message in refused.items():
        proc = run_cli(
            tmp_path,
            search,
            "model=tiny_gpt2",
            "objective=parity",
            "control=top_only",
            "optim=rmsprop",
            override,
        )
        assert proc.returncode == 2, (override, proc.stderr[-2000:])
        assert message in " ".join(proc.stderr.split()), (override, proc.stderr[-2000:])
    assert not (tmp_path / "outputs" / "runs").exists()

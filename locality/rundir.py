"""The run directory contract: config.yaml, results.json (written atomically, last), checkpoints/, wandb/.

A run directory's name is derived from its resolved config (see `locality.identity`), so re-launching the
same run or sweep finds its earlier work: a complete run (results.json present) is skipped, an
interrupted one resumes from checkpoints/last.ckpt. A directory whose config.yaml differs from the current
config in a result-changing key is refused, never skipped or resumed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from locality.errors import UserError
from locality.identity import changed_keys

SCHEMA = "locality.results/1"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def complete(self) -> bool:
        return self.results_path.is_file()

    def last_checkpoint(self) -> str | None:
        last = self.checkpoints / "last.ckpt"
        return str(last) if last.is_file() else None

    def start_over(self) -> None:
        """Forget a previous attempt (force=true): its results and checkpoints must not be resumed."""
        self.results_path.unlink(missing_ok=True)
        for checkpoint in self.checkpoints.glob("*.ckpt"):
            checkpoint.unlink()

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def refuse_other_config(self, cfg: DictConfig) -> None:
        """A directory holding another config's work is never skipped or resumed by this one."""
        if not self.config_path.is_file():
            return
        saved = OmegaConf.load(self.config_path)
        current = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        differ = changed_keys(saved, current)
        if differ:
            shown = ", ".join(f"{k} ({_get(saved, k)!r} there, {_get(current, k)!r} now)" for k in differ[:8])
            raise UserError(
                f"{self.path} holds a run of another config: {shown}"
                f"{' and more' if len(differ) > 8 else ''}. It is neither skipped nor resumed. Launch without "
                "hydra.run.dir so the run gets its own directory, or add force=true to start over there.")

    def save_config(self, cfg: DictConfig) -> None:
        OmegaConf.save(cfg, self.path / "config.yaml", resolve=True)

    def read_results(self) -> dict:
        return json.loads(self.results_path.read_text())

    def write_results(self, results: dict[str, Any]) -> None:
        """Write results.json atomically: its presence alone means the run completed."""
        if results.get("schema") != SCHEMA:
            raise ValueError(f"results must carry schema {SCHEMA!r}")
        write_json_atomic(self.results_path, results)


def _get(cfg: DictConfig, dotted: str):
    return OmegaConf.select(cfg, dotted, default="<missing>")


def write_json_atomic(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(_finite(payload), f, indent=1)
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value

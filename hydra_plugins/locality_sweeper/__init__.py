"""`MatrixSweeper`: Hydra's basic sweeper over a union of cartesian blocks, that runs every job to the end.

Hydra finds sweepers only under the `hydra_plugins` namespace package; the expansion itself lives in
`locality.run.sweep`, shared with `python -m locality.plan`. Unlike the basic sweeper, a failed job does not hide
the others: every job runs, and the sweep ends with a table of every failed run (its directory and error)
and a non-zero exit.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from omegaconf import OmegaConf

from locality.run.sweep import expand, override_lists

log = logging.getLogger(__name__)


class SweepFailed(HydraException):
    """Some runs of the sweep failed; each is listed above with its error."""


class MatrixSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
        matrix: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.matrix = matrix or []

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        common = override_lists(parser.parse_overrides([*self._parse_config(), *arguments]))
        jobs = expand(OmegaConf.to_container(OmegaConf.create(self.matrix)) if self.matrix else None, common)
        self.overrides = list(self.split_overrides_to_chunks(jobs, self.max_batch_size))

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns, failed, index = [], [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=index)
            index += len(batch)
            returns.append(results)
            failed += [r for r in results if r.status == JobStatus.FAILED]
        if failed:
            print(failure_table(failed, total=index), file=sys.stderr)
            raise SweepFailed(f"{len(failed)} of {index} runs failed (listed above); the others completed.")
        return returns


def failure_table(failed: list[JobReturn], total: int) -> str:
    lines = [f"\n{len(failed)} of {total} runs failed:", f"{'run directory':<60} error", "-" * 100]
    for result in failed:
        output_dir = result.hydra_cfg.hydra.runtime.output_dir if result.hydra_cfg else "?"
        error = result._return_value  # the exception the job raised
        message = " ".join(f"{type(error).__name__}: {error}".split())
        lines.append(f"{output_dir:<60} {message[:200]}")
    return "\n".join(lines)

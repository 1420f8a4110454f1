"""Multi-process runs started from a Hydra command: the other processes must run this job, not the sweep.

Lightning starts the other processes of a multi-process run (DDP, FSDP2) by re-running the command line with
`hydra.run.dir` set to Hydra's run directory. Inside a multirun job that command line is the whole sweep
(`-m` and every swept value) and the run directory is not the job's, so each child would run the sweep.
`children_run_this_job` rewrites both, before `trainer.fit`, to this job's overrides and output directory:
the children then compose exactly this job's config in a single run. Processes started by a cluster
(torchrun, SLURM tasks through the submitit launcher) run the job's own function and need nothing.
"""

from __future__ import annotations

import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write


def children_run_this_job() -> None:
    """In a multirun job: the command line Lightning re-runs becomes this job's overrides, in its directory."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra.overrides.task]
    with read_write(hydra), open_dict(hydra):
        hydra.run.dir = hydra.runtime.output_dir

"""Multi-process runs started from a Hydra command: the other processes must run this job, not the sweep.

Lightning starts the other processes of a multi-process run (DDP, FSDP2) by re-running the command line with
`hydra.run.dir` set to Hydra's run directory. Inside a multirun job that command line is the whole sweep
(`-m` and every swept value) and the run directory is not the job's, so each child would run the sweep.
`children_run_this_job` rewrites both, around `trainer.fit`, to this job's overrides and output directory:
the children then compose exactly this job's config in a single run. Processes started by a cluster
(torchrun, SLURM tasks through the submitit launcher) run the job's own function and need nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write


@contextmanager
def children_run_this_job() -> Iterator[None]:
    """In a multirun job, for the duration of `trainer.fit`: the command line Lightning re-runs for the other
    processes is this job's overrides, in this job's directory. Both are put back after."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        yield
        return
    argv, run_dir = sys.argv, hydra.run.dir
    sys.argv = [sys.argv[0], *hydra.overrides.task]
    with read_write(hydra), open_dict(hydra):
        hydra.run.dir = hydra.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra), open_dict(hydra):
            hydra.run.dir = run_dir

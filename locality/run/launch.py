"""Multi-process runs started from a Hydra command: the other processes must run this job, not the sweep.

Lightning starts the other processes of a multi-process run (DDP, FSDP2) by re-running the command line with
`hydra.run.dir` set to Hydra's run directory. Inside a multirun job that command line is the whole sweep
(`-m` and every swept value) and the run directory is not the job's, so each child would run the sweep.
`children_run_this_job` rewrites both, around `trainer.fit`, to this job's overrides and output directory:
the children then compose exactly this job's config in a single run. Lightning re-runs `python -m <the main
module>`; in a launcher's worker process the main module is the launcher's (submitit's `submitit.core._submit`
under `hydra/launcher=submitit_local`), so for as long as it runs the main module reads as `locality.train`.
Processes started by a cluster (torchrun, SLURM tasks through the submitit launcher) run the job's own
function and need nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

ENTRY = "locality.train"  # the module a run's other processes run


@contextmanager
def children_run_this_job() -> Iterator[None]:
    """In a multirun job, for the duration of `trainer.fit`: the command line Lightning re-runs for the other
    processes is `python -m locality.train` with this job's overrides, in this job's directory. All is put
    back after."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        yield
        return
    main = sys.modules["__main__"]
    argv, run_dir, spec = sys.argv, hydra.run.dir, getattr(main, "__spec__", None)
    sys.argv = [sys.argv[0], *hydra.overrides.task]
    if spec is not None and spec.name != ENTRY:  # a launcher's worker, started as its own module
        main.__spec__ = importlib.util.find_spec(ENTRY)
    with read_write(hydra), open_dict(hydra):
        hydra.run.dir = hydra.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        if spec is not None:
            main.__spec__ = spec
        with read_write(hydra), open_dict(hydra):
            hydra.run.dir = run_dir

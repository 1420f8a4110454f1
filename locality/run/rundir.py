"""The run directory contract: config.yaml, results.json (written atomically, last), checkpoints/, wandb/,
and failed.json when a run fails.

A run directory's name is derived from its resolved config (see `locality.core.identity`), so re-launching the
same run or sweep finds its earlier work: a complete run (results.json present) is skipped, an
interrupted one resumes from checkpoints/last.ckpt. A directory whose config.yaml differs from the current
config in a result-changing key is refused, never skipped or resumed.
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from locality.core.errors import UserError
from locality.core.identity import changed_keys
from locality.core.integrity import SUFFIX, sha256_of, write_json_atomic
from locality.core.results import Results, ResultsError, check_results, read_results


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
        """The checkpoint a relaunch resumes from: last.ckpt, or previous.ckpt (the one before it, kept by
        `locality.run.resume.KeepPreviousCheckpoint`) when the run was killed while writing a new last.ckpt."""
        for name in ("last.ckpt", "previous.ckpt"):
            if (self.checkpoints / name).exists():  # a file, or a folder of shards (FSDP2)
                return str(self.checkpoints / name)
        return None

    def check_checkpoint(self) -> None:
        """Before anything is loaded: a checkpoint that cannot be read is reported with the way out (UserError)
        instead of PyTorch's zip error on every relaunch."""
        path = self.last_checkpoint()
        if path is None:
            return
        step, problem = checkpoint_step(Path(path))
        if problem is None:
            problem = self._checksum_problem(Path(path))
        if problem is None:
            if Path(path).name != "last.ckpt":
                print(
                    f"locality: resuming from {path} (step {step}): the run was interrupted while writing "
                    "last.ckpt.",
                    file=sys.stderr,
                )
            return
        previous = self.checkpoints / "previous.ckpt"
        previous_step = (
            checkpoint_step(previous)[0]
            if Path(path) != previous and previous.is_file() and self._checksum_problem(previous) is None
            else None
        )
        if previous_step is not None:
            way = (
                f"To resume from the checkpoint kept before it (previous.ckpt, step {previous_step}), put it in "
                f"its place (mv {previous} {path}) and relaunch the same command; or add force=true to start "
                "the run over."
            )
        else:
            way = "No earlier checkpoint is readable: add force=true to start the run over."
        cause = (
            "a file changed after it was written cannot be trusted (a flipped bit still loads)"
            if "checksum" in problem
            else "it was probably cut short while being written (the process killed, the disk full, an "
            "interrupted copy)"
        )
        raise UserError(
            f"The run's checkpoint {path} cannot be used ({problem}), so the run cannot resume from it: {cause}. {way}"
        )

    def _checksum_problem(self, path: Path) -> str | None:
        """A checkpoint file must match a checksum written with a checkpoint of this run (last's or previous's:
        `mv previous.ckpt last.ckpt`, the way out offered, keeps it valid). Shard folders and checkpoints from
        before checksums are not checked."""
        recorded = {p.read_text().strip() for p in self.checkpoints.glob(f"*.ckpt{SUFFIX}")} - {""}
        if not path.is_file() or not recorded or sha256_of(path) in recorded:
            return None
        return "its contents match no checksum written with this run's checkpoints: the file changed on disk"

    @property
    def failed_path(self) -> Path:
        return self.path / "failed.json"

    def write_failure(self, error: BaseException, step: int | None, reason: str | None = None) -> None:
        """failed.json: why (`reason`, else the error) and at which step the run stopped, with the traceback;
        never a results.json."""
        reason = reason or " ".join(f"{type(error).__name__}: {error}".split())
        trace = "".join(traceback.format_exception(error))
        write_json_atomic(
            self.failed_path,
            {"reason": reason, "step": step, "type": type(error).__name__, "traceback": trace},
        )

    @contextmanager
    def exclusive(self):
        """Hold this directory for one process (a lock file, released when the process ends, however it ends):
        two launches of one config would both train it and write over each other's checkpoints and metrics."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.path / ".lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(
                f"Another process is running {self.path} now (it holds {lock.lock_file}). Wait for it to finish "
                "(relaunching then skips or resumes it), or stop it first."
            ) from None
        try:
            yield
        finally:
            lock.release()

    def drop_checkpoints(self) -> None:
        """Delete the checkpoints and their checksums (trainer.keep_checkpoint=none, once results.json exists)."""
        for checkpoint in self.checkpoints.glob("*.ckpt"):
            remove_checkpoint(checkpoint)
        for checksum in self.checkpoints.glob(f"*.ckpt{SUFFIX}"):
            checksum.unlink()

    def start_over(self) -> None:
        """Forget a previous attempt (force=true): its results and checkpoints must not be resumed."""
        if self.results_path.is_dir() and not self.results_path.is_symlink():
            shutil.rmtree(self.results_path)
        else:
            self.results_path.unlink(missing_ok=True)
        self.drop_checkpoints()

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def refuse_other_config(self, cfg: DictConfig) -> None:
        """A directory holding another config's work is never skipped or resumed by this one."""
        if not self.config_path.is_file():
            return
        saved = self.read_config()
        current = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        differ = changed_keys(saved, current)
        if differ:
            shown = ", ".join(f"{k} ({_get(saved, k)!r} there, {_get(current, k)!r} now)" for k in differ[:8])
            raise UserError(
                f"{self.path} holds a run of another config: {shown}"
                f"{' and more' if len(differ) > 8 else ''}. It is neither skipped nor resumed. Launch without "
                "hydra.run.dir so the run gets its own directory, or add force=true to start over there."
            )

    def read_config(self) -> DictConfig:
        """The config.yaml a run wrote here (OmegaConf's loader: YAML's safe loader, no object construction);
        UserError with the way out when it is damaged, never a traceback."""
        try:
            saved = OmegaConf.load(self.config_path)
        except Exception as err:  # noqa: BLE001 -- any parse or read failure means the same to the user
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        else:
            if isinstance(saved, DictConfig):
                return saved
            reason = f"it holds a {type(saved).__name__}, not a mapping of settings"
        raise UserError(
            f"{self.config_path} is damaged ({reason}), so it cannot tell which config ran in {self.path}. "
            "Nothing there is resumed or skipped: add force=true to start that run over, or move the directory "
            "aside."
        )

    def save_config(self, cfg: DictConfig) -> None:
        OmegaConf.save(cfg, self.path / "config.yaml", resolve=True)

    def read_results(self) -> Results:
        return read_results(self.results_path)

    def finished_results(self) -> Results | None:
        """The results of a finished run here, or None if there is none; UserError with the way out when
        results.json is damaged (truncated, not this schema, a directory), never a traceback."""
        if not os.path.lexists(self.results_path):
            return None
        try:
            return read_results(self.results_path)
        except (OSError, ResultsError) as err:
            raise UserError(
                f"{self.results_path} is damaged ({type(err).__name__}: {err}), so this run cannot be taken as "
                "finished. Add force=true to run it again (results.json and the checkpoints are replaced), or "
                "move the directory aside."
            ) from None

    def write_results(self, results: Results) -> None:
        """Write results.json atomically (checked against the schema first): its presence alone means the run
        completed."""
        check_results(results, complete=True)
        write_json_atomic(self.results_path, results)
        self.failed_path.unlink(missing_ok=True)  # an earlier attempt's failure is resolved


def checkpoint_step(path: Path) -> tuple[int | None, str | None]:
    """(global step, None) for a readable checkpoint, (None, what is wrong) otherwise. Memory-mapped: the
    tensors are not read, only the file's structure and the pickled state."""
    import torch

    if (
        path.is_dir()
    ):  # a sharded checkpoint (FSDP2): Lightning keeps the loop state in meta.pt beside the shards
        path = path / "meta.pt"
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return int(checkpoint["global_step"]), None
    except Exception as err:  # a truncated zip, a bad pickle, a missing key: all mean "cannot resume"
        return None, " ".join(f"{type(err).__name__}: {err}".split())[:200]


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint: one file, or a folder of shards (FSDP2's distributed checkpoint)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _get(cfg: DictConfig, dotted: str):
    return OmegaConf.select(cfg, dotted, default="<missing>")

"""Where a run's code came from: package versions and the git commit of a source checkout."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata

from locality.core.paths import PACKAGE_DIR

PACKAGES = ("locality", "torch", "transformers", "lightning", "peft", "datasets", "hydra-core", "wandb")


@functools.cache
def versions() -> dict[str, str | None]:
    """{"python", <package>: version, "git": commit (+"-dirty") or None outside a checkout}."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["git"] = git_commit()
    return found


def git_commit() -> str | None:
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, check=True, timeout=5
            ).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit

"""Checksums written with the files locality keeps (checkpoints, pretrained and converted models, pre-fine-tuning
captures) and verified before they are used: a file damaged on disk (a flipped bit loads fine and changes
results) is recomputed or refused, never used.

One form for single files: a sidecar `<file>.sha256` holding the hex digest, written after the file. A file
without a sidecar was written before checksums existed (or its writer was killed between the two writes) and
is reported as unknown, not damaged. Directories of files (a `save_pretrained` entry) keep a manifest
{name: digest} inside their own info file (`manifest`, `manifest_problem`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

SUFFIX = ".sha256"


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SUFFIX)


def write_checksum(path: Path, digest: str | None = None) -> None:
    """Write `path`'s sidecar (atomically), from `digest` when the caller already has it."""
    target = sidecar(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text((digest or sha256_of(path)) + "\n")
    os.replace(tmp, target)


def checksum_matches(path: Path) -> bool | None:
    """True: the file has the digest written with it; False: it does not (damaged); None: no checksum."""
    try:
        expected = sidecar(path).read_text().strip()
    except OSError:
        return None
    return sha256_of(path) == expected


def manifest(directory: Path) -> dict[str, str]:
    """{file name: sha256} of every file directly in `directory`."""
    return {p.name: sha256_of(p) for p in sorted(directory.iterdir()) if p.is_file()}


def manifest_problem(directory: Path, files: object) -> str | None:
    """Why `directory` does not match its manifest `files` (a missing or changed file), or None."""
    if not isinstance(files, dict) or not files:
        return "it has no checksums"
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_of(path) != digest:
            return f"{name} does not match the checksum written with it"
    return None


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file. The file gets
    the permissions a plain `open` would give under the user's umask (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(payload), f, indent=1)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value

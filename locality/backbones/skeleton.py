"""A model's structure without its weights, for checks before anything is loaded: the module tree built on
the meta device (no memory, ~0.1-0.3 s), and the tensor names a local safetensors checkpoint holds (its
header only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from locality.backbones.hf import AUTO_CLASSES, HeadKind
from locality.core.config import ModelConf
from locality.core.errors import UserError


def skeleton(spec: ModelConf, config, head: HeadKind = "base") -> nn.Module | None:
    """The model with `head` on the meta device (its base model for "base"); None when transformers cannot
    build it from the config alone (remote code, say)."""
    try:
        with torch.device("meta"):
            model = AUTO_CLASSES[head].from_config(config, trust_remote_code=spec.trust_remote_code)
    except Exception:  # the real load reports the reason, with the weights' context
        return None
    return model.base_model if head == "base" else model


def checkpoint_names(path: Path) -> set[str] | None:
    """The tensor names of the safetensors checkpoint in `path` (headers only), or None when it has none."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), "pt") as f:
        return set(f.keys())


def check_pretrained_head(spec: ModelConf, config, path: Path, head: HeadKind) -> None:
    """An LM objective reuses the checkpoint's pretrained head: refuse, before loading, a checkpoint that
    holds none of the head's own tensors (a sentence encoder has no MLM head). The load refuses a partly
    missing head too (`load_backbone`)."""
    if head == "base":
        return
    names = checkpoint_names(path)
    model = skeleton(spec, config, head) if names is not None else None
    if model is None:
        return
    tied = model._tied_weights_keys or {}
    prefix = model.base_model_prefix + "."
    own = [k for k in model.state_dict() if not k.startswith(prefix) and k not in tied]
    legacy = {_legacy(n) for n in names}
    if own and not any(k in names or k in legacy for k in own):
        kind = "masked-LM" if head == "masked_lm" else "causal-LM"
        raise UserError(
            f"Checkpoint '{spec.name_or_path}' has no pretrained {kind} head (none of {own[:3]}"
            f"{' ...' if len(own) > 3 else ''} is in it), so this objective would start from a random head. "
            "Choose an objective with a new task head (objective=cls or objective=tok) or a checkpoint that "
            "ships the head."
        )


def _legacy(name: str) -> str:
    """transformers' renaming of old LayerNorm tensor names on load (gamma/beta -> weight/bias)."""
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if name.endswith(old):
            return name.removesuffix(old) + new
    return name

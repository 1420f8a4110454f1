"""Run identity: a readable name plus a hash of every result-changing value of the resolved config.

A run directory is `<model>-<objective>-<control>-s<seed>-<hash>`. The hash covers the whole resolved config
except the keys in `NON_RESULT_KEYS` (they cannot change a run's numbers) and the seed (it is in the name, so
the replicates of one configuration share a hash and the analysis groups them by it). The same config reached
by any route (command line, experiment file, edited default) gets the same directory; any result-changing
difference gets another one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# The one list of config keys that cannot change a run's results (dotted paths; a key covers its subtree).
NON_RESULT_KEYS = (
    "hydra",  # Hydra's own settings: output dirs, launcher, sweeper
    "run_name",  # derived from everything else
    "force",
    "sweep_name",
    "outputs_root",
    "logger",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "trainer.ckpt_every_n_steps",
    "trainer.keep_checkpoint",
    "data.num_workers",
    "measure.cache",
)
# Groups that join the identity only when they hold something: added after runs existed, whose hashes stay.
OPTIONAL_GROUPS = ("callbacks",)
# In the readable part of the name rather than the hash.
NAMED_KEYS = ("seed",)

HASH_CHARS = 8


def control_name(control: Any) -> str:
    """The control's name for run names: its component names joined by '+', or 'standard'."""
    names = list(control.keys()) if isinstance(control, Mapping | DictConfig) else []
    return "+".join(names) or "standard"


def result_config(cfg: DictConfig | Mapping) -> dict:
    """The resolved config restricted to result-changing values (seed included), as plain data."""
    plain: dict[str, Any] = {}
    for key in cfg:
        if key in NON_RESULT_KEYS:
            continue
        value = cfg[key]
        if key in OPTIONAL_GROUPS and not value:
            continue
        plain[key] = (
            OmegaConf.to_container(value, resolve=True)
            if isinstance(value, DictConfig | ListConfig)
            else value
        )
    for dotted in NON_RESULT_KEYS:
        *parents, leaf = dotted.split(".")
        node = plain
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if parents and isinstance(node, dict):
            node.pop(leaf, None)
    if isinstance(plain.get("control"), dict):
        plain["control"] = {name: _with_constructor_defaults(c) for name, c in plain["control"].items()}
    return plain


def _with_constructor_defaults(component: Any) -> Any:
    """A control spelled with or without its default arguments is the same control."""
    if not isinstance(component, dict) or "_target_" not in component:
        return component
    try:
        from hydra.utils import get_class

        signature = inspect.signature(get_class(component["_target_"]))
    except Exception:  # an unknown target is reported when the control is built
        return component
    defaults = {
        name: p.default
        for name, p in signature.parameters.items()
        if p.default is not inspect.Parameter.empty and _jsonable(p.default)
    }
    return {**defaults, **component}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def config_hash(cfg: DictConfig | Mapping, leave_out: tuple[str, ...] = NAMED_KEYS) -> str:
    """Short hash of every result-changing value except the seed (and any other top-level keys left out)."""
    values = {k: v for k, v in result_config(cfg).items() if k not in leave_out}
    canonical = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha1(canonical.encode()).hexdigest()[:HASH_CHARS]


def setting_hash(cfg: DictConfig | Mapping) -> str:
    """The hash without the seed and the control: runs that share it differ only in how they were trained
    (standard vs equal-step) and their seed, so the analysis compares their controls side by side."""
    return config_hash(cfg, leave_out=(*NAMED_KEYS, "control"))


def run_name(cfg: DictConfig | Mapping) -> str:
    """`<model>-<objective>-<control>-s<seed>-<config hash>`: the run's directory and W&B id."""
    readable = (
        f"{cfg['model']['name']}-{cfg['objective']['name']}-{control_name(cfg['control'])}-s{cfg['seed']}"
    )
    return f"{readable.replace('/', '_')}-{config_hash(cfg)}"


def changed_keys(saved: DictConfig | Mapping, current: DictConfig | Mapping) -> list[str]:
    """Dotted keys whose result-changing values differ between two configs (seed included)."""
    return sorted(_diff(result_config(saved), result_config(current)))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(key, _MISSING), b.get(key, _MISSING), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


_MISSING = object()


def run_name_resolver(*, _root_: DictConfig) -> str:
    """OmegaConf resolver `${run_name:}`: the run name of the config it sits in."""
    return run_name(_root_)

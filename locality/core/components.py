"""Components built from config: a `_target_` (a class or function) whose signature is the schema.

Controls, objectives, optimizers, schedulers and loggers are all configured the same way: one yaml with a
`_target_`, and keys that are the target's keyword arguments. Adding one is one .py + one .yaml, with no
registry or schema to edit. `check_component` refuses, before any work, a target that does not import, a
key the target does not take (listing those it does) and a value whose type differs from the argument's
default (a string where a number belongs); `instantiate_component` reports a value the target itself
refuses with the target's own message.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from locality.core.errors import UserError

HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def target_of(cfg: DictConfig | dict, where: str) -> Any:
    """The class or function `cfg._target_` names; UserError if it is missing or does not import."""
    target = cfg.get("_target_") if isinstance(cfg, DictConfig | dict) else None
    if not target:
        raise UserError(f"{where} must be a mapping with a `_target_` (a class or function), got {cfg!r}.")
    try:
        return get_object(target)
    except Exception:  # noqa: BLE001 -- any import failure means the same thing to the user
        raise UserError(f"{where}: `_target_: {target}` is not importable.") from None


def arguments(target: Callable, supplied_elsewhere: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
    """The keyword arguments a config may set: the signature's named parameters, less `self` and those the
    framework supplies at build time (e.g. an objective's backbone, an optimizer's parameters)."""
    skip = {"self", *supplied_elsewhere}
    return {
        name: p
        for name, p in inspect.signature(target).parameters.items()
        if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def check_component(
    cfg: DictConfig | dict,
    where: str,
    base: type | None = None,
    supplied_elsewhere: Iterable[str] = (),
    extra_keys: Iterable[str] = (),
) -> Any:
    """Check a component config against its target's signature; return the target. `extra_keys` are keys the
    framework reads itself (e.g. an objective's `name`), not passed to the target."""
    target = target_of(cfg, where)
    if base is not None and not (isinstance(target, type) and issubclass(target, base)):
        raise UserError(f"{where}: {cfg['_target_']} is not a {base.__module__}.{base.__qualname__}.")
    accepted = arguments(target, supplied_elsewhere)
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    unknown = sorted(set(plain) - {*HYDRA_KEYS, *extra_keys, *accepted})
    if unknown:
        raise UserError(
            f"{where} has no argument(s) {unknown}; {getattr(target, '__name__', target)} takes: "
            f"{', '.join(accepted)}."
        )
    hints = _type_hints(target)
    for name, value in plain.items():
        if name in accepted:
            _check_value(where, name, value, hints.get(name), accepted[name].default)
    return target


def _type_hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # noqa: BLE001 -- unresolvable annotations: fall back to the defaults' types
        return {}


PLAIN_KINDS = {bool: {bool}, int: {int}, float: {int, float}, str: {str}, type(None): {type(None)}}
KIND_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _admits(hint: Any) -> tuple[set[type], tuple] | None:
    """The plain-value kinds and Literal choices an annotation admits; None: anything (Any, Tensor, ...)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return set(), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds, choices = set(), ()
        for member in typing.get_args(hint):
            sub = _admits(member)
            if sub is None:
                return None
            kinds, choices = kinds | sub[0], choices + sub[1]
        return kinds, choices
    plain = origin or hint
    if plain in PLAIN_KINDS:
        return PLAIN_KINDS[plain], ()
    if isinstance(plain, type) and issubclass(plain, list | tuple | collections.abc.Sequence):
        return {list}, ()
    return None


def _check_value(where: str, name: str, value: Any, hint: Any, default: Any) -> None:
    """A value must be of its annotation's kinds or one of its Literal choices; without an annotation, of its
    default's kind (none or a None default: anything)."""
    if hint is None:
        if default is inspect.Parameter.empty or default is None:
            return
        hint = list if isinstance(default, tuple | list) else type(default)
    admitted = _admits(hint)
    if admitted is None or (value is None and default is None):
        return
    kinds, choices = admitted
    if isinstance(value, tuple):
        value = list(value)
    is_kind = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool)) for k in kinds)
    if is_kind or any(value == c and type(value) is type(c) for c in choices):
        return
    if choices and not kinds:
        listed = ", ".join(map(str, choices))
        raise UserError(f"{where}.{name}={value!r} is not a valid choice; choose one of: {listed}.")
    named = kinds - {int} if float in kinds else kinds
    described = " or ".join(sorted({KIND_NAMES.get(k, "null") for k in named} | {repr(c) for c in choices}))
    raise UserError(f"{where}.{name}={value!r} is invalid: it must be {described}.")


def instantiate_component(
    cfg: DictConfig, where: str, extra_keys: Iterable[str] = (), **supplied: Any
) -> Any:
    """Build the component (or its partial), passing what the framework supplies as is (`extra_keys`, read by
    the framework, are left out); a value the target refuses becomes a UserError with the target's message."""
    own = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in set(extra_keys)}
    try:
        if not supplied:
            return instantiate(OmegaConf.create(own))
        build = instantiate(OmegaConf.create({**own, "_partial_": True}))
        return build(**supplied)  # not merged into the config: a backbone is no config value
    except InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise UserError(f"{where}: {cause}") from None
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: {err}") from None

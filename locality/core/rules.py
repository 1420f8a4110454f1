"""What a config value may be, stated once beside its field: the rule kinds that `locality.core.config`'s
homes attach to their fields (`field(default=..., metadata=rule(...))`).

A rule answers two questions from the same numbers: is this value allowed (`problem`, the paragraph
`locality.run.checks.check_values` raises), and what may it be (`describe`, the text docs print). A range
rule's words are built from its bounds, so changing a bound changes the check and the docs together.
Choices that code defines elsewhere are referenced by name (`"package.module:NAME"`, resolved when checked),
never copied: a `typing.Literal` gives its arguments, a tuple itself.
"""

from __future__ import annotations

import importlib
import math
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

STAGES = ("ranges", "dependent", "choices", "members", "last")  # the order rules run in: cheapest first


def number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """A bound or choice as the messages write it: 1e-08, 2^32, null, false."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and value >= 2**16 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class Rule:
    stage = "ranges"

    def problem(self, key: str, value: Any, cfg: Any) -> str | None:
        """Why `value` is not allowed for `key` (None when it is); `cfg`: the whole composed config."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the value may be, in the words of the error message."""
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Rule):
    """A number from `low` (or above it, `low_open`) up to below `high` (or to it, `high_closed`); words
    `noun`, `note` (in parentheses) and `null` (what null means, when null is allowed) come from these."""

    noun: str
    example: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_closed: bool = False
    whole: bool = True  # an integer (False: any finite number)
    note: str = ""
    null: str | None = None  # null allowed, meaning "or null for <null>"; "" allows null without saying so
    words: str = ""  # the words, where the bounds alone do not say it (they still decide the check)

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.null is not None
        if not (integer if self.whole else number)(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value <= self.high if self.high_closed else value < self.high)

    def describe(self) -> str:
        if self.words:
            return self.words
        text = self.noun
        if self.low is not None and self.high is not None:
            text += (
                f" in {'(' if self.low_open else '['}{shown(self.low)}, {shown(self.high)}"
                f"{']' if self.high_closed else ')'}"
            )
        elif self.low is not None:
            text += f" {'>' if self.low_open else '>='} {shown(self.low)}"
        if self.note:
            text += f" ({self.note})"
        if self.null:
            text += f", or null for {self.null}"
        return text

    def problem(self, key: str, value: Any, cfg: Any) -> str | None:
        if self.ok(value):
            return None
        return f"{key}={value!r} is invalid: it must be {self.describe()} (e.g. {key}={self.example})."


@dataclass(frozen=True)
class Check(Range):
    """A value no bounds describe (a list, a sentinel beside a range): `test` decides, `words` say it."""

    test: Callable[[Any], bool] = lambda value: False

    def ok(self, value: Any) -> bool:
        return self.test(value)


@dataclass(frozen=True)
class Choice(Rule):
    """One of `of`: a tuple, or `"package.module:NAME"` naming a tuple or a `typing.Literal` (resolved when
    checked), or a function returning the tuple (choices from a library, imported only when checked)."""

    of: tuple | str | Callable[[], Iterable]
    null: str = "refused"  # "listed": null is a choice and listed first; "unchecked": null skips the check
    as_text: bool = False  # compare str(value) (trainer.precision: 32 and "32" are the same)
    stage = "choices"

    def choices(self) -> tuple:
        found = resolve(self.of)
        return (None, *found) if self.null == "listed" else tuple(found)

    def describe(self) -> str:
        return "one of: " + ", ".join(shown(c) for c in self.choices())

    def problem(self, key: str, value: Any, cfg: Any) -> str | None:
        if value is None and self.null == "unchecked":
            return None
        value = str(value) if self.as_text else value
        if value in self.choices():
            return None
        return f"{key}={value!r} is not a valid choice; choose {self.describe()}."


@dataclass(frozen=True)
class Members(Choice):
    """A list whose every item is one of `of`."""

    noun: str = "item"
    stage = "members"

    def problem(self, key: str, value: Any, cfg: Any) -> str | None:
        valid = self.choices()
        unknown = [v for v in value if v not in valid]
        if not unknown:
            return None
        return (
            f"{key} has unknown {self.noun}(s) {unknown}; valid {self.noun}s: {', '.join(map(shown, valid))}."
        )

    def describe(self) -> str:
        return f"a list of {self.noun}s, each one of: " + ", ".join(shown(c) for c in self.choices())


@dataclass(frozen=True)
class Depends(Rule):
    """A rule that reads other values of the config: `test(key, value, cfg)` returns the paragraph or None;
    `words` say it for the docs; `stage`: after the ranges it relies on (or "last")."""

    test: Callable[[str, Any, Any], str | None]
    words: str
    stage: str = "dependent"

    def problem(self, key: str, value: Any, cfg: Any) -> str | None:
        return self.test(key, value, cfg)

    def describe(self) -> str:
        return self.words


def resolve(of: tuple | str | Callable[[], Iterable]) -> tuple:
    if typing.get_origin(of) is typing.Literal:
        return typing.get_args(of)
    if callable(of):
        return tuple(of())
    if isinstance(of, str):
        module, _, name = of.partition(":")
        found = getattr(importlib.import_module(module), name)
        return typing.get_args(found) if typing.get_origin(found) is typing.Literal else tuple(found)
    return tuple(of)


def rule(*rules: Rule) -> dict[str, tuple[Rule, ...]]:
    """Field metadata holding a field's rules: `field(default=..., metadata=rule(Range(...)))`."""
    return {"rules": rules}

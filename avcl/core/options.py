"""Options that declare their own rule: a config field's range or choices sit on the field itself
(``option(...)``: dataclass field metadata), and one checker reads them (``check_section``), as ``avcl show``
does to print them.

A number without a declared range must be >= 0 (sizes, weights, counts: most options); ``range="any"``
allows every finite number; NaN and infinity are refused everywhere. A list of numbers (or of strings, with
``choices``) is checked value by value. ``None`` (an optional option left unset) is never checked.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, Optional, Sequence

from avcl.core.errors import AvclError


RULES: dict[str, Callable[[float], bool]] = {
    ">0": lambda v: v > 0, ">=0": lambda v: v >= 0, ">=1": lambda v: v >= 1, "any": lambda v: True,
    "[0,1]": lambda v: 0 <= v <= 1, "[0,1)": lambda v: 0 <= v < 1, "(0,1]": lambda v: 0 < v <= 1,
}
WORDS = {">0": "> 0", ">=0": ">= 0", ">=1": ">= 1", "any": "a finite number", "[0,1]": "in [0, 1]",
         "[0,1)": "in [0, 1)", "(0,1]": "in (0, 1]"}
DEFAULT_RULE = ">=0"


def option(default: Any = dataclasses.MISSING, *, factory: Optional[Callable[[], Any]] = None,
           range: Optional[str] = None, choices: Optional[Sequence] = None) -> Any:  # noqa: A002 - the word users read
    """A dataclass field with its rule: ``range`` (a key of ``RULES``) for numbers, ``choices`` for values
    that must be one of a few (strings, or each string of a list). ``factory``: a default_factory."""
    metadata = {}
    if range is not None:
        if range not in RULES:
            raise ValueError(f"unknown range {range!r} (known: {', '.join(RULES)})")
        metadata["range"] = range
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def rule_of(f: dataclasses.Field) -> str:
    return f.metadata.get("range", DEFAULT_RULE)


def choices_of(f: dataclasses.Field) -> Optional[tuple]:
    return f.metadata.get("choices")


def describe(f: dataclasses.Field) -> str:
    """The field's rule in words, for ``avcl show``: "one of a | b", "> 0", ... ("" for the default rule)."""
    choices = choices_of(f)
    if choices:
        return "one of " + " | ".join(str(c) for c in choices)
    rule = f.metadata.get("range")
    return WORDS[rule] if rule and rule != "any" else ""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(key: str, value: Any, f: dataclasses.Field) -> None:
    """``value`` of the dotted config ``key`` against the rule of field ``f`` (AvclError naming the key)."""
    if value is None:
        return
    is_list = isinstance(value, (list, tuple))
    values, each = (list(value), " (each value)") if is_list else ([value], "")
    choices = choices_of(f)
    if choices is not None:
        if any(v not in choices for v in values):
            got = values if is_list else f"'{value}'"
            raise AvclError(f"bad config: '{key}' must be one of {list(choices)}{each}, got {got}")
        return
    rule = rule_of(f)
    if any(_number(v) and (not math.isfinite(v) or not RULES[rule](v)) for v in values):
        raise AvclError(f"bad config: '{key}' must be {WORDS[rule]}{each}, got {values if is_list else value}")


def check_section(values: Any, cls: type, prefix: str, skip: Sequence[str] = ()) -> None:
    """Every field of the dataclass ``cls`` present in ``values`` (a plain mapping of that section, e.g.
    ``OmegaConf.to_container(cfg.train)``) within its rule; fields that are dataclasses are checked
    recursively. ``prefix``: the section's dotted key (e.g. "train", "method_args.lwf"); ``skip``: field
    names left out."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in values:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = values[f.name]
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            if value is not None:
                check_section(value, kind, key)
            continue
        if typing.get_origin(kind) is dict or kind is dict:  # free mappings (variants, search, expected)
            continue
        check_value(key, value, f)

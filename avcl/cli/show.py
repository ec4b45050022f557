"""``avcl show RECIPE [key=value ...]``: the resolved config, then each method's hyperparameters
with their values, defaults, the range or choices each declares (``[> 0]``, ``[one of a | b]``) and
one-line descriptions, without loading data or writing anything. ``--regime`` adds each method's optimizer step
as it will run (parameter groups with their sizes, the lr curve of the first task, the effective batch): that
builds the models, so it loads the data.

Descriptions come from the source: the comment that ends a dataclass field's line (or, when
there is none, the comment lines right above it). Every method's ``Hparams`` field carries one
(tests/test_tools.py checks), as do the config sections (avcl/config/schema.py, the models' and datasets' options).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from functools import lru_cache

import torch
import yaml
from omegaconf import OmegaConf

from avcl.config import load_config, method_hparams_for, resolve_recipe
from avcl.core.options import describe
from avcl.core.samples import num_samples
from avcl.engine.regime import regime_lines
from avcl.engine.runner import build_method, make_scenario


@lru_cache(maxsize=None)
def field_descriptions(cls: type) -> dict[str, str]:
    """Field name -> its comment in the source of ``cls`` or of the dataclass it extends."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # made at run time (no source)
            continue
        comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT}
        lines = source.splitlines()
        names = {f.name for f in dataclasses.fields(klass)}
        for number, line in enumerate(lines, 1):
            match = re.match(r"\s+(\w+)\s*:", line)
            if not match or match.group(1) not in names:
                continue
            if number in comments and comments[number][0] > match.start(1):
                text = comments[number][1]
            else:  # the comment lines right above the field
                above, j = [], number - 1
                while j in comments and lines[j - 1].lstrip().startswith("#"):
                    above.insert(0, comments[j][1])
                    j -= 1
                text = " ".join(above)
            if text:
                found[match.group(1)] = text
    return found


def _value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix("...").strip()


def method_lines(cfg, name: str) -> list[str]:
    """``name`` (a method or a variant): its description and one line per hyperparameter."""
    cls, hparams, _ = method_hparams_for(cfg, name)
    title = f"{name}  (variant of {cls.name})" if name != cls.name else name
    prefix = f"variants.{name}" if name != cls.name else f"method_args.{name}"  # where to override it
    lines = [f"  {title}: {cls.description}"]
    defaults = cls.Hparams()
    descriptions = field_descriptions(cls.Hparams)
    rows = []
    for f in dataclasses.fields(hparams):
        value, default = getattr(hparams, f.name), getattr(defaults, f.name)
        changed = value != default
        rule = describe(f)  # the range or choices declared on the field (avcl.core.options)
        rows.append((f"{'*' if changed else ' '} {prefix}.{f.name} = {_value(value)}",
                     f"(default {_value(default)})" if changed else "",
                     " ".join(part for part in (f"[{rule}]" if rule else "", descriptions.get(f.name, "")) if part)))
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(2)]
    for key, default, text in rows:
        lines.append(f"   {key.ljust(widths[0])}  {default.ljust(widths[1])}  {text}".rstrip())
    return lines


def show(recipe: str | None, overrides: list[str], regime: bool = False) -> str:

    cfg = load_config(recipe, overrides)
    shown = OmegaConf.to_container(cfg)
    for key in ("method_args", "variants"):  # shown per method below, with defaults and descriptions
        shown.pop(key, None)
    out = [f"# recipe {recipe or 'avdigits'} ({resolve_recipe(recipe or 'avdigits')}), resolved with the overrides",
           OmegaConf.to_yaml(OmegaConf.create(shown)).rstrip(), "",
           "# methods: hyperparameters (override as key=value; * = differs from the default)"]
    for name in cfg.methods:
        out += method_lines(cfg, name)
    if regime:
        out += regime_section(cfg)
    return "\n".join(out)


def regime_section(cfg) -> list[str]:
    """Each method's optimizer step as it will run (avcl.engine.regime): its parameter groups with their sizes, the
    lr at points of the first task's curve, the effective batch. Loads the data (the model's shapes, the task size)."""
    scenario = make_scenario(cfg)
    first = scenario.tasks[0].train
    out = ["", "# the optimizer step of each method (train.*; avcl.engine.regime), on task 0 of the scenario"]
    for name in cfg.methods:
        method = build_method(name, cfg, first)
        out.append(f"  {name}:")
        out += ["  " + line for line in regime_lines(method, cfg.train, torch.device("cpu"), num_samples(first),
                                                      len(scenario.tasks))]
    return out


def _show(args) -> int:
    items = list(args.items)
    recipe = items.pop(0) if items and "=" not in items[0] else None
    print(show(recipe, items, regime=args.regime))
    return 0


def register(subparsers) -> None:
    cmd = subparsers.add_parser("show", help="the resolved config and each method's hyperparameters "
                                             "(defaults, descriptions); loads no data, writes nothing")
    cmd.add_argument("items", nargs="*", metavar="[RECIPE] [key=value ...]",
                     help="a recipe name or YAML path (default: avdigits), then dotted overrides")
    cmd.add_argument("--regime", action="store_true",
                     help="also each method's optimizer step: parameter groups and their sizes, lr curve, effective "
                          "batch (loads the data to build the models)")
    cmd.set_defaults(func=_show)

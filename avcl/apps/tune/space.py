"""The search space: the recipe's ``search.<method>`` mapping as Optuna distributions, every spec and bound
checked by building the configs it makes."""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from avcl.apps.tune.study import optuna_module
from avcl.apps.tune.trials import Param, trial_base, trial_config
from avcl.core.errors import AvclError
from avcl.methods import METHODS


# Sections that define what a trial measures: searching them would compare trials on different data or metrics.
FIXED = ("name", "description", "seed", "seeds", "methods", "data", "scenario", "eval", "log", "variants",
         "expected", "search", "tune")
SPEC_KEYS = ("low", "high", "log", "int", "step")


# ----- the search space ----------------------------------------------------------------------------

def method_of(cfg: DictConfig) -> tuple[str, type]:
    """(the searched method or variant, its method class)."""
    name = cfg.tune.method
    if not name:
        raise AvclError("name the method to tune: avcl tune RECIPE method=NAME (a method of the recipe's search:)")
    if name in METHODS:
        return name, METHODS[name]
    if name in cfg.variants:
        return name, METHODS[cfg.variants[name]["method"]]
    raise AvclError(f"unknown method '{name}' (method=...; known: {', '.join(sorted(METHODS))}, "
                    f"or a variant of the recipe: {', '.join(cfg.variants) or 'none'})")


def search_space(cfg: DictConfig) -> list[Param]:
    """The searched parameters of ``cfg.tune.method``, every spec and every bound checked (AvclError)."""
    name, cls = method_of(cfg)
    space = cfg.search.get(name)
    if not space:
        have = f" (it has: {', '.join(cfg.search)})" if cfg.search else ""
        raise AvclError(f"the recipe has no search space for '{name}'{have}: add e.g. "
                        f"search: {{{name}: {{lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}}}}}")
    hparams = [f.name for f in fields(cls.Hparams)]
    params = []
    for key, spec in flat_space(OmegaConf.to_container(space), hparams).items():
        where = f"search.{name}.{key}"
        if "." in key:
            if key.split(".")[0] in FIXED:
                raise AvclError(f"{where}: '{key.split('.')[0]}' cannot be searched: the data, scenario, seeds and "
                                "evaluation stay fixed during a search (they define what the objective measures)")
            target = key
        elif key in hparams:
            target = f"variants.{name}.{key}" if name in cfg.variants else f"method_args.{cls.name}.{key}"
        else:
            raise AvclError(f"{where}: unknown key '{key}': {cls.name}'s hyperparameters are {', '.join(hparams)} "
                            "(or give a dotted config key, e.g. train.lr)")
        params.append(Param(key, target, distribution(where, spec)))
    base = trial_base(cfg)
    for param in params:  # a wrong type or an out-of-range value: the config's own message, before anything runs
        for value in probe_values(param.distribution):
            try:
                trial_config(base, {param.key: value})
            except AvclError as err:
                hint = " (a whole-number key: add int: true)" if "to Integer" in str(err) else ""
                raise AvclError(f"search.{name}.{param.name}: the value {value!r} is refused: {err}{hint}") from None
    return params


def flat_space(space: dict, hparams: list[str], prefix: str = "") -> dict:
    """key -> spec with dotted config keys, whether the recipe writes `train.lr: {...}` or
    `train: {lr: {...}}` (a mapping that is no spec, under a key that is no hyperparameter, is a section)."""
    out = {}
    for key, spec in space.items():
        name = f"{prefix}{key}"
        nested = (isinstance(spec, dict) and spec and name not in hparams
                  and not set(spec) & {"choices", *SPEC_KEYS})
        out.update(flat_space(spec, hparams, f"{name}.") if nested else {name: spec})
    return out


def distribution(where: str, spec: Any):
    """The Optuna distribution of one spec (AvclError naming ``where`` when it is malformed or empty)."""
    optuna = optuna_module()
    dists = optuna.distributions
    shape = "{low: L, high: H[, log: true][, int: true][, step: S]} or {choices: [a, b, ...]}"
    if not isinstance(spec, dict):
        raise AvclError(f"{where}: a spec is a mapping {shape}, got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise AvclError(f"{where}: choices take no other keys, got {sorted(set(spec) - {'choices'})}")
        if not isinstance(choices, list) or not choices:
            raise AvclError(f"{where}: choices must be a non-empty list, got {choices!r}")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise AvclError(f"{where}: choices must be numbers, strings, booleans or null, got {bad[0]!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise AvclError(f"{where}: choices list a value twice: {choices}")
        return dists.CategoricalDistribution(choices)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown or not {"low", "high"} <= set(spec):
        raise AvclError(f"{where}: a spec is {shape}; got keys {sorted(spec)}")
    low, high = spec["low"], spec["high"]
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AvclError(f"{where}: '{bound}' must be a finite number, got {value!r}")
    for flag in ("log", "int"):
        if not isinstance(spec.get(flag, False), bool):
            raise AvclError(f"{where}: '{flag}' must be true or false, got {spec[flag]!r}")
    log, integer, step = spec.get("log", False), spec.get("int", False), spec.get("step")
    if not low < high:
        raise AvclError(f"{where}: empty range: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise AvclError(f"{where}: a log scale needs low > 0, got low={low}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or log):
        raise AvclError(f"{where}: 'step' must be a number > 0, without log: true; got step={step!r}")
    if integer:
        if low != int(low) or high != int(high) or (step is not None and step != int(step)):
            raise AvclError(f"{where}: int: true needs whole numbers, got low={low}, high={high}"
                            + (f", step={step}" if step is not None else ""))
        return dists.IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return dists.FloatDistribution(float(low), float(high), log=log, step=step)


def probe_values(dist) -> list:
    """The values a spec is checked with: its bounds (or choices) and, on a float range, an inner non-whole
    value, so an integer hyperparameter searched without int: true is refused at once."""
    if hasattr(dist, "choices"):
        return list(dist.choices)
    values = [dist.low, dist.high]
    if not hasattr(dist, "step") or dist.step is None or dist.step != int(dist.step):
        inner = dist.low + 0.37 * (dist.high - dist.low)
        values.append(inner if inner != int(inner) else inner + 0.5 * min(1.0, dist.high - inner))
    return values



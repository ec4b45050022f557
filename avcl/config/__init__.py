"""Layer ``config``: the typed run configuration, a recipe YAML merged with ``key=value`` overrides.

Imports the layers below it (``core`` ... ``report``: to assemble the schema from what each declares); the
engine, the apps and the CLI import it. One module per concern: ``schema`` (the sections and the assembled
run schema), ``recipes`` (finding and reading recipes), ``overrides`` (``key=value`` and ``key=@FILE``),
``validate`` (the one entry point every config goes through). OmegaConf checks names and types, so a typo or
a wrong type ends in one message naming the key; ``validate`` checks values.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avcl.config.overrides import override_file, parse_overrides
from avcl.config.recipes import REPO_RECIPES, list_recipes, load_recipe_tree, read_yaml, recipes_dir, resolve_recipe
from avcl.config.schema import EvalConfig, InitConfig, LogConfig, MemoryConfig, TrainConfig, TuneConfig, run_schema
from avcl.config.validate import config_error_message, method_hparams_for, validate
from avcl.core.errors import AvclError
from avcl.core.io import atomic_write_text
from avcl.data import dataset_options
from avcl.data.scenario import ScenarioConfig
from avcl.methods import method_hparams
from avcl.models import CAVConfig, ModelConfig, ViTConfig, XKDConfig


__all__ = ["CAVConfig", "EvalConfig", "InitConfig", "LogConfig", "MemoryConfig", "ModelConfig", "REPO_RECIPES",
           "ScenarioConfig", "TrainConfig", "TuneConfig", "ViTConfig", "XKDConfig", "build_config",
           "config_error_message", "list_recipes", "load_config", "load_recipe_tree", "load_saved_config",
           "method_hparams_for", "override_file", "parse_overrides", "read_yaml", "recipes_dir", "resolve_recipe",
           "run_schema", "save_config", "validate"]


def build_config(raw: dict | DictConfig, overrides: list[str] = ()) -> DictConfig:
    """Validate ``raw`` (+ overrides) against the schema; returns a read-only DictConfig."""
    cli = parse_overrides(list(overrides))
    for source in (raw, cli):  # `methods=finetune` / `methods=finetune,er`: a name or a comma list is a list
        if isinstance(source.get("methods"), str):
            source["methods"] = [m.strip() for m in source["methods"].split(",") if m.strip()]
    data_name = OmegaConf.select(cli, "data.name") or OmegaConf.select(
        OmegaConf.create(raw), "data.name") or "avdigits"
    schema = OmegaConf.structured(run_schema(dataset_options(data_name), method_hparams()))
    try:
        cfg = OmegaConf.merge(schema, raw, cli)
    except OmegaConfBaseException as err:
        raise AvclError(config_error_message(err)) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_saved_config(path: Path) -> DictConfig:
    """A run directory's ``config.yaml`` (what ``--resume`` reads back), refused with one message naming
    the file when it is empty, not YAML, not a mapping, or cut short: a saved config is the whole resolved
    config, so every section is there and the file ends with a newline."""
    text = path.read_text()
    if not text.strip():
        raise AvclError(f"{path} is empty: it should hold the run's resolved config (nothing was changed)")
    if not text.endswith("\n"):
        raise AvclError(f"{path} is truncated (its last line is cut short): restore it or start a new run; "
                        "nothing was changed")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or "parse error"
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise AvclError(f"{path} is not valid YAML ({where}{problem}); nothing was changed") from None
    if not isinstance(raw, dict):
        raise AvclError(f"{path} holds {'a list' if isinstance(raw, list) else type(raw).__name__}, not the run's "
                        "config (a mapping of keys to values); nothing was changed")
    sections = [f.name for f in dataclasses.fields(run_schema(object, {}))]
    later = ("search", "tune")  # sections added after runs were saved without them (their defaults apply)
    missing = [name for name in sections if name not in raw and name not in later]
    if missing:
        raise AvclError(f"{path} is truncated (no {', '.join(missing)} section): restore it or start a new run; "
                        "nothing was changed")
    return build_config(raw)


def load_config(recipe: str | None, overrides: list[str] = ()) -> DictConfig:
    raw = load_recipe_tree(resolve_recipe(recipe or "avdigits"))
    return build_config(raw, overrides)


def save_config(cfg: DictConfig, path: Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(cfg))

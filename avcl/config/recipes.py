"""Recipes: the YAML files of ``recipes/`` (shipped inside the package as ``avcl/recipes`` in a wheel, see
setup.py), found by name, each merged over its ``base:`` chain."""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from avcl.core.errors import AvclError


# The recipes: inside the package when installed (a wheel: avcl/recipes, see setup.py), else the
# source tree's top-level recipes/ folder (a checkout, an editable install).
_PACKAGE = Path(__file__).resolve().parent.parent
REPO_RECIPES = next((path for path in (_PACKAGE / "recipes", _PACKAGE.parent / "recipes") if path.is_dir()),
                    _PACKAGE.parent / "recipes")


def recipes_dir() -> Path:
    return Path(os.environ.get("AVCL_RECIPES_DIR", REPO_RECIPES))


def list_recipes() -> dict[str, str]:
    """Recipe name -> description, for ``avcl list``."""
    found = {}
    root = recipes_dir()
    for path in sorted(root.rglob("*.yaml")):
        if path.name.startswith("_"):  # partial recipes, only used as `base:` of others
            continue
        raw = read_yaml(path)
        found[path.relative_to(root).with_suffix("").as_posix()] = str(raw.get("description", ""))
    return found


def resolve_recipe(recipe: str) -> Path:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise AvclError(f"recipe file not found: {path}")
        return path
    candidate = recipes_dir() / f"{recipe}.yaml"
    if not candidate.is_file():
        known = ", ".join(list_recipes()) or "none"
        raise AvclError(f"unknown recipe '{recipe}' (known: {known}; or give a path to a .yaml file)")
    return candidate


def read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AvclError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise AvclError(f"{path}: a recipe must be a mapping of keys to values")
    return raw


def load_recipe_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The recipe with its ``base:`` chain merged underneath (a recipe may extend another)."""
    if path in seen:
        raise AvclError(f"{path}: 'base' recipes form a cycle")
    raw = read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = resolve_recipe(base) if not str(base).endswith((".yaml", ".yml")) \
        else (path.parent / base)
    merged = OmegaConf.merge(load_recipe_tree(base_path, seen + (path,)), raw)
    return OmegaConf.to_container(merged)

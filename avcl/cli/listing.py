"""``avcl list``: the recipes, methods and datasets available."""
from __future__ import annotations

from avcl.config import list_recipes
from avcl.data import DATASETS
from avcl.methods import METHODS


def _list(args) -> int:
    sections = [("recipes", list_recipes()),
                ("methods", {n: c.description for n, c in sorted(METHODS.items())}),
                ("datasets", {n: e.description for n, e in sorted(DATASETS.items())})]
    for title, entries in sections:
        print(f"{title}:")
        width = max((len(n) for n in entries), default=0)
        for name, description in entries.items():
            print(f"  {name.ljust(width)}  {description}")
    return 0


def register(sub) -> None:
    lst = sub.add_parser("list", help="recipes, methods and datasets available")
    lst.set_defaults(func=_list)

"""Layer ``methods``: the learner contract (``base``) and one small file per method, each with its
hyperparameters beside it; imports ``core``, ``parallel``, ``nn``, ``models`` and ``memory``.

``@register`` a Method subclass and it is selectable by name (``METHODS``); every module of this package
registers its methods on import. ``stella/`` is a package: the method and its patch selection.
"""
from __future__ import annotations

import importlib
import pkgutil

from avcl.methods.base import Method


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_hparams() -> dict[str, type]:
    return {name: cls.Hparams for name, cls in METHODS.items()}


def _import_all() -> None:
    """Every module of this package registers its methods on import."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

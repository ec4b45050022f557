"""Extra ``avcl`` subcommands, one module each.

A module here defines ``register(subparsers)``, which adds its subparser and sets
``func=handler`` (``handler(args) -> exit code``). Raise AvclError for bad input: the CLI turns
it into one line on stderr and exit code 2.
"""
from __future__ import annotations

import importlib
import pkgutil


def register_all(subparsers) -> None:
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module.name}").register(subparsers)

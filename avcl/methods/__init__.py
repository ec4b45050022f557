"""Method registry: ``@register`` a Method subclass and it is selectable by name."""
from __future__ import annotations

from avcl.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_hparams() -> dict[str, type]:
    return {name: cls.Hparams for name, cls in METHODS.items()}


def _import_all() -> None:
    """Every module of this package registers its methods on import."""
    import importlib
    import pkgutil
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

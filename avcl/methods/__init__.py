"""Method registry: ``@register`` a Method subclass and it is selectable by name."""
from __future__ import annotations

from avcl.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_hparams() -> dict[str, type]:
    return {name: cls.Hparams for name, cls in METHODS.items()}


from avcl.methods import er, ewc, finetune, icarl, joint, lwf, ssil  # noqa: E402,F401

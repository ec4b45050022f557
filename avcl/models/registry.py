"""The model registry: ``model.name`` -> the model class (``register_model``), and the options every model reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from avcl.core.options import option


MODELS: dict[str, type] = {}


@dataclass
class ModelOptions:
    """The keys every model reads; each model adds its own (``options``, a subclass of this)."""
    name: str = "avnet"  # a key of avcl.models.MODELS
    modalities: List[str] = option(factory=lambda: ["audio", "video"], choices=("audio", "video"))


def register_model(name: str):
    """Register a model class under ``name`` (``model.name``); the class declares its options dataclass as
    ``options``."""
    def wrap(cls):
        cls.model_name = name
        MODELS[name] = cls
        return cls
    return wrap

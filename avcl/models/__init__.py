"""Models: swappable encoders, fusion modules and growing classifier heads.

A model is selected with ``model.name`` from ``MODELS``. Every model takes ``(model_cfg,
example_samples)``, has a growing ``head`` (IncrementalClassifier), and maps a batch dict to
a dict with at least "logits" and "features" (``embed`` returns the dict without "logits").
"""
from avcl.models.avnet import AVNet
from avcl.models.heads import IncrementalClassifier

MODELS: dict[str, type] = {"avnet": AVNet}


def register_model(name: str):
    def wrap(cls):
        MODELS[name] = cls
        return cls
    return wrap


def build_model(model_cfg, example):
    from avcl.errors import AvclError
    if model_cfg.name not in MODELS:
        raise AvclError(f"unknown model '{model_cfg.name}' in 'model.name' (known: {', '.join(sorted(MODELS))})")
    return MODELS[model_cfg.name](model_cfg, example)


def _import_all() -> None:
    """Model modules register themselves on import; import every module of this package."""
    import importlib
    import pkgutil
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = ["AVNet", "IncrementalClassifier", "MODELS", "register_model", "build_model"]

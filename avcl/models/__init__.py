"""Layer ``models``: networks only, each with its options (the ``model`` config section) declared beside it.

Imports ``core``, ``parallel`` and ``nn``. A model is selected with ``model.name`` from ``MODELS``
(``avcl.models.registry``). Every model takes ``(model_cfg, example_samples)`` and maps a batch dict to
a dict with at least "features" (``embed``); a classifier model has a growing ``head``
(IncrementalClassifier) and adds "logits"; a label-free (self-supervised) model says
``label_free = True``. Each model class names its options dataclass (``options``); ``ModelConfig``,
the ``model`` section, is all of them together.
"""
import dataclasses
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from avcl.core.errors import AvclError
from avcl.core.options import check_section
from avcl.models.avcil import AVCILOptions
from avcl.models.avnet import AVNet, AVNetOptions
from avcl.models.cav import CAVConfig, CAVOptions
from avcl.models.had import HADOptions
from avcl.models.heads import IncrementalClassifier
from avcl.models.registry import MODELS, ModelOptions, register_model
from avcl.models.xkd import XKDConfig, XKDOptions
from avcl.nn.vit import ViTConfig


@dataclass
class ModelConfig(XKDOptions, CAVOptions, AVCILOptions, HADOptions, AVNetOptions):
    """The ``model`` section: the keys of every registered model (each model reads its own). Fields come in
    base-class order: the common ones (``ModelOptions``), AVNet's, HAD's, AV-CIL's, then ``vit``, ``cav``, ``xkd``."""


def check_model_options(model_cfg) -> None:
    """Every key of a ``model`` section within the range or choices its field declares (AvclError naming the
    key), and an unknown ``model.name`` refused. ``build_model`` runs it, so does ``avcl.engine.checks`` for
    every method's and variant's model before a run writes anything."""
    if model_cfg.name not in MODELS:
        raise AvclError(f"unknown model '{model_cfg.name}' in 'model.name' (known: {', '.join(sorted(MODELS))})")
    values = OmegaConf.to_container(model_cfg) if isinstance(model_cfg, DictConfig) else dataclasses.asdict(model_cfg)
    check_section(values, ModelConfig, "model")
    if not values["modalities"]:
        raise AvclError("bad config: model.modalities must be a non-empty subset of [audio, video], got []")


def build_model(model_cfg, example):
    """The model ``model_cfg.name`` built for data shaped as ``example`` (a few rows of Samples)."""
    check_model_options(model_cfg)
    return MODELS[model_cfg.name](model_cfg, example)


__all__ = ["AVNet", "CAVConfig", "IncrementalClassifier", "MODELS", "ModelConfig", "ModelOptions", "ViTConfig",
           "XKDConfig", "build_model", "check_model_options", "register_model"]

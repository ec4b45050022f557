"""``validate(cfg)``: everything a run config can be refused for without its data, in one place. It runs whenever
a config is built (``avcl run``, ``--dry-run``, ``--resume``, ``avcl tune`` and its trials, the workers of
``--jobs``). Ranges and choices are read from the fields that declare them (``avcl.core.options``); what is
checked here by hand is what no single field can say: names that must exist, methods tied to models, and
constraints between fields. What needs the data (shapes, class counts) is ``avcl.engine.checks``; the ``model``
section is checked by the model layer when the model is built (``avcl.models.check_model_options``), which
``avcl.engine.checks`` does for every method before a run writes anything.
"""
from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avcl.config.schema import run_schema
from avcl.core.errors import AvclError
from avcl.core.options import check_section
from avcl.data import dataset_options
from avcl.methods import METHODS, method_hparams
from avcl.models import MODELS


def config_error_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    return f"bad config: {msg}" + (f" (key '{key}')" if key else "")


def validate(cfg: DictConfig) -> None:
    """Refuse ``cfg`` (AvclError, one message naming the key) unless every name exists, every value is within
    the range or choices its field declares, and the fields agree with each other."""
    for name in cfg.variants:
        method_hparams_for(cfg, name)  # the variant's base method, keys, types and values
    unknown = [m for m in cfg.methods if m not in METHODS and m not in cfg.variants]
    if unknown:
        raise AvclError(f"unknown method(s) {unknown} in 'methods' (known: {', '.join(sorted(METHODS))}; "
                        "or define a variant under 'variants')")
    if not cfg.methods:
        raise AvclError("'methods' is empty: name at least one method")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise AvclError(f"bad config: 'seeds' lists a seed twice: {list(cfg.seeds)}")
    for name in cfg.methods:  # a method tied to one model (AV-CIL, HAD, STELLA, XKD), refused before anything runs
        cls, _, model_cfg = method_hparams_for(cfg, name)
        trained_by = getattr(MODELS.get(model_cfg.name), "trained_by", None)  # a model tied to its method (XKD)
        if trained_by and cls.name not in trained_by:
            raise AvclError(f"model.name={model_cfg.name} is trained by method {' or '.join(trained_by)} only "
                            f"(got '{name}' in methods): {MODELS[model_cfg.name].trained_by_why}")
        cls.check_model(model_cfg.name)
    # every value against its field's rule; the model section is the model layer's (module docstring)
    schema = run_schema(dataset_options(cfg.data.name), method_hparams())
    check_section(OmegaConf.to_container(cfg, resolve=True), schema, "", skip=("model",))
    for name, cls in METHODS.items():  # each method's own constraints between its fields (Hparams.check)
        cls.Hparams(**OmegaConf.to_container(cfg.method_args[name])).check(f"method_args.{name}")
    check_between_fields(cfg)


def check_between_fields(cfg: DictConfig) -> None:
    """The constraints that tie two fields, or a field's length, together."""
    if len(cfg.train.adam_betas) != 2:
        raise AvclError(f"bad config: 'train.adam_betas' must be two numbers in [0, 1), got {list(cfg.train.adam_betas)}")
    check_regime(cfg.train)
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise AvclError(f"bad config: 'train.device' must be auto, cpu, cuda, cuda:N or mps, got '{device}'")
    if cfg.eval.probe != "none" and cfg.eval.probe_warmup_epochs > cfg.eval.probe_epochs:
        raise AvclError(f"bad config: 'eval.probe_warmup_epochs' ({cfg.eval.probe_warmup_epochs}) must be <= "
                        f"'eval.probe_epochs' ({cfg.eval.probe_epochs})")
    if not cfg.eval.recall_at:
        raise AvclError("bad config: 'eval.recall_at' must be a non-empty list of k >= 1, got []")
    sc = cfg.scenario
    if sc.first_task_classes and sc.initial_classes and sc.first_task_classes != sc.initial_classes:
        raise AvclError(f"bad config: 'scenario.initial_classes' ({sc.initial_classes}) is the older name of "
                        f"'scenario.first_task_classes' ({sc.first_task_classes}); give one of them")
    if sc.blurry and not getattr(MODELS.get(cfg.model.name), "label_free", False):
        raise AvclError(f"scenario.blurry={sc.blurry} needs a label-free model (the pre-training stream, "
                        f"e.g. recipe pretrain/avdigits); model '{cfg.model.name}' learns each task's "
                        "classes at its own step (class-incremental)")


def check_regime(train: DictConfig) -> None:
    """The optimizer-step options that tie fields together (avcl.engine.regime)."""
    if train.warmup_epochs and train.warmup_steps:
        raise AvclError(f"bad config: give 'train.warmup_epochs' ({train.warmup_epochs}) or 'train.warmup_steps' "
                        f"({train.warmup_steps}), not both")
    if train.schedule == "step" and not train.milestones:
        raise AvclError("bad config: 'train.schedule=step' needs 'train.milestones' (epochs at which the lr is "
                        "multiplied by 'train.gamma'), e.g. train.milestones=[30,60]")
    if train.schedule == "cosine" and train.min_lr > train.lr:
        raise AvclError(f"bad config: 'train.min_lr' ({train.min_lr}) must be <= 'train.lr' ({train.lr})")
    for pattern, factor in (train.lr_multipliers or {}).items():
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) \
                or factor <= 0:
            raise AvclError(f"bad config: 'train.lr_multipliers.{pattern}' must be a number > 0, got {factor}")
    for kind in ("no_decay", "clip_grad_params"):
        if any(not isinstance(p, str) or not p for p in train[kind]):
            raise AvclError(f"bad config: 'train.{kind}' must be a list of parameter-name patterns"
                            f"{' (or 1d)' if kind == 'no_decay' else ''}, got {list(train[kind])}")


def method_hparams_for(cfg: DictConfig, name: str):
    """(method class, its Hparams, the model config) for a method or a variant of ``cfg.variants``.

    A variant's keys override ``method_args.<method>``; its optional ``model:`` mapping
    overrides ``model`` for that entry alone (e.g. a single-modality row in the same table).
    A variant's values are checked here (the method's own section is checked with the whole config).
    """
    overrides, model_overrides = {}, {}
    base = name
    if name in cfg.variants:
        overrides = dict(OmegaConf.to_container(cfg.variants[name]))
        base = overrides.pop("method", None)
        model_overrides = overrides.pop("model", None) or {}
        if base not in METHODS:
            raise AvclError(f"variants.{name}.method must name a method (known: {', '.join(sorted(METHODS))}), "
                            f"got {base!r}")
    cls = METHODS[base]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls.Hparams), cfg.method_args[base], overrides)
        model_cfg = OmegaConf.merge(cfg.model, model_overrides)
    except OmegaConfBaseException as err:
        raise AvclError(f"variants.{name}: {config_error_message(err)}") from None
    hparams = cls.Hparams(**OmegaConf.to_container(merged))
    if name in cfg.variants:
        try:
            check_section(OmegaConf.to_container(merged), cls.Hparams, f"method_args.{base}")
            hparams.check(f"method_args.{base}")
        except AvclError as err:
            raise AvclError(f"variants.{name}: {err}") from None
    return cls, hparams, model_cfg

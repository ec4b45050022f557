"""Everything refused before a run directory is written that needs the data: the model built on it and one
forward pass, the protocol's data checks, the init stage, memory against the classes and the stream.
(What needs only the config is ``avcl.config.validate``, run when the config is built.)"""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from avcl.config import method_hparams_for
from avcl.core.device import pick_device
from avcl.core.errors import AvclError
from avcl.core.samples import gather, num_samples
from avcl.data.features import require_raw
from avcl.engine.init_stage import check_init
from avcl.engine.loggers import check_loggers
from avcl.eval.protocols import protocol_class
from avcl.models import MODELS, build_model, check_model_options


def check_run(cfg: DictConfig, scenario) -> None:
    """Everything that can be refused before a run directory is written (AvclError, one message)."""
    for name in cfg.methods:  # every row's model section (a variant's model overrides included): its values
        try:
            check_model_options(method_hparams_for(cfg, name)[2])
        except AvclError as err:
            raise AvclError(f"variants.{name}: {err}" if name in cfg.variants else str(err)) from None
    pick_device(cfg.train.device)  # CUDA asked for and absent: refused here
    store = OmegaConf.select(cfg, "data.store") if cfg.data.name == "features" else None
    try:  # a store this recipe's model cannot read: the message names the recipe made for the store's kind
        if getattr(MODELS.get(cfg.model.name), "label_free", False):  # pre-training trains the encoders on raw clips
            require_raw(scenario.tasks[0].train, store or f"dataset '{cfg.data.name}'")
        model = build_model(cfg.model, scenario.tasks[0].train)  # data shapes vs model config, checkpoint files
        check_forward(cfg, model, scenario.tasks[0].train)
    except AvclError as err:
        raise AvclError(with_recipe_hint(str(err), scenario.tasks[0].train) if store else str(err)) from None
    if store:
        check_finite(scenario, store)
    protocol_class(cfg.eval.protocol).check(cfg, scenario)
    check_init(cfg, scenario, model)
    memory_methods = [name for name in cfg.methods if method_hparams_for(cfg, name)[0].memory_use.kind == "exemplars"]
    classes = len(scenario.class_order)
    if memory_methods and not getattr(model, "label_free", False) and cfg.memory.size < classes:
        raise AvclError(f"memory.size={cfg.memory.size} holds less than one exemplar per class for {classes} classes "
                        f"(methods {', '.join(memory_methods)}): set memory.size >= {classes}")
    check_loggers(cfg)
    if getattr(model, "label_free", False):
        train_rows = sum(len(t.train["label"]) for t in scenario.tasks)
        if cfg.memory.size > train_rows:
            raise AvclError(f"memory.size={cfg.memory.size} is larger than the whole stream ({train_rows} training "
                            "clips): the reservoir could never fill; lower memory.size")


def check_finite(scenario, where: str) -> None:
    """A store's resident float features hold no NaN / inf (each such clip would turn the loss into NaN at
    its first batch); streamed data is not read here."""
    for t, task in enumerate(scenario.tasks):
        for split in ("train", "val", "test"):
            for field_name, value in getattr(task, split).items():
                if torch.is_tensor(value) and value.is_floating_point() and value.numel():
                    bad = ~torch.isfinite(value.reshape(len(value), -1)).all(dim=1)
                    if bool(bad.any()):
                        raise AvclError(f"{where}: field '{field_name}' holds NaN or inf values in {int(bad.sum())} "
                                        f"{split} clip(s) of task {t + 1}: re-extract those clips or drop them")


def check_forward(cfg: DictConfig, model, samples) -> None:
    """One forward pass of the model on two training clips (on the CPU, no gradients): any mismatch
    between the data's shapes and the model config (``model.visual_grid``, encoders that expect raw
    inputs fed features, ...) is refused here, before anything is written."""
    rows = gather(samples, torch.arange(min(2, num_samples(samples))))
    shapes = ", ".join(f"{k} {tuple(v.shape[1:])} {str(v.dtype).replace('torch.', '')}"
                       for k, v in rows.items() if k in ("audio", "video"))
    try:
        with torch.no_grad():
            model.eval()
            model.embed(rows)
    except AvclError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here is the data not fitting the model config
        raise AvclError(f"model.name={cfg.model.name} (audio_encoder={cfg.model.audio_encoder}, video_encoder="
                        f"{cfg.model.video_encoder}) cannot read this data ({shapes} per clip): "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


# Which recipe fits which store (README "From video files to results"; docs/extraction.md)
RECIPE_FOR_OUTPUT = {
    "clip": "recipe `features`",
    "tokens": "recipe `features`",
    "snippets": "recipe `features` (or `had/features`, HAD's snippet model)",
    "avcil": "recipe `features` (or `files/avdigits` / `avcil/*`, AV-CIL's model, with model.visual_grid=[T,P])",
    "raw": "a pretrain/ recipe (`pretrain/features`, with model.vit.* patches that fit)",
}


def store_output(samples) -> str | None:
    """Which ``avcl extract --output`` made a store, from its per-clip shapes (None: none of them)."""
    video, audio = samples.get("video"), samples.get("audio")
    if video is None or audio is None:
        return None
    if video.dtype == torch.uint8:
        return "raw"
    return {(1, 1): "clip", (2, 3): "tokens", (2, 2): "snippets", (1, 3): "avcil"}.get(
        (audio.dim() - 1, video.dim() - 1))


def with_recipe_hint(message: str, samples) -> str:
    """``message`` plus the recipe made for this store's kind (or every recipe, when the kind is unknown)."""
    output = store_output(samples)
    if output is None:
        return (f"{message}. Stores from `avcl extract` train with recipe `features` (--output clip, tokens, "
                "snippets, avcil), `had/features` (snippets), `files/avdigits` (avcil) or pretrain/features (raw)")
    return f"{message}. This is an `avcl extract --output {output}` store: train it with {RECIPE_FOR_OUTPUT[output]}"

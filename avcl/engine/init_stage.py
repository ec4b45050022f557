"""The init stage: the model every method of a pre-training recipe starts from (config ``init``).

As in FLAVA/STELLA, the continual stream starts from a model already pre-trained on other data:
the backbone by its self-supervised loss (``init.epochs``), then the AVM module alone by its
matching loss with the backbone frozen (``init.avm_epochs``), on the dataset's held-out clips
(e.g. AV-Digits' held-out speakers), through the same trainer as every method. It runs once per
run directory, is saved atomically to ``init/model.pt`` and shared by every method; a resumed run
loads it. ``init.checkpoint`` starts every method from a given file instead. The stage's model is
also evaluated once, by the run's protocol, as the report's ``init`` row (``init/metrics.json``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from avcl import parallel
from avcl.core.device import autocast_factory
from avcl.core.errors import AvclError
from avcl.core.io import atomic_torch_save, atomic_write_json
from avcl.core.rng import seed_everything
from avcl.data.scenario import Task
from avcl.engine.peak_memory import PeakMemory
from avcl.engine.trainer import Trainer
from avcl.eval.protocols import make_protocol, method_metrics
from avcl.methods import METHODS
from avcl.methods.base import Method
from avcl.models import build_model


INIT = "init"


class AVMStage(Method):
    """The AVM module's own pre-training (the STELLA code's `models/avm_module.py`): matching loss, backbone frozen."""
    name = "avm-stage"

    def parameters(self):
        return self.model.avm.parameters()

    def training_loss(self, batch):
        return self.model.avm_loss(self.model.prepare(batch, train=True))


def load_init_checkpoint(path: str, model) -> dict:
    file = Path(path).expanduser()
    if not file.is_file():
        raise AvclError(f"init.checkpoint: file not found: {file}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[:3]
        raise AvclError(f"init.checkpoint {file}: does not match model (model.vit / model.cav): "
                        + " ".join(line.strip() for line in first)) from None
    return model.state_dict()


def wants_init(cfg: DictConfig) -> bool:
    ic = cfg.init
    return bool(ic.checkpoint or ic.epochs or ic.avm_epochs)


def check_init(cfg: DictConfig, scenario, model) -> None:
    """Refuse an init stage that cannot run (AvclError), before anything is written."""
    ic = cfg.init
    if not wants_init(cfg):
        return
    if not getattr(model, "label_free", False):
        raise AvclError(f"the init stage is for self-supervised models: model.name={cfg.model.name} is not one "
                        "(set init.epochs=0, init.avm_epochs=0 and no init.checkpoint)")
    if ic.checkpoint:
        load_init_checkpoint(ic.checkpoint, model)
        return
    if not scenario.held_out:
        raise AvclError("init.epochs / init.avm_epochs need clips kept out of the stream, and the dataset has "
                        "none (AV-Digits: data.held_out_speakers=[...]; or give init.checkpoint=FILE)")
    if ic.avm_epochs and getattr(model, "avm", None) is None:
        raise AvclError("init.avm_epochs > 0 needs the AVM module: set model.cav.avm=true")


def run_init_stage(cfg: DictConfig, scenario, run_dir: Path, log, device: torch.device,
                   show_progress: bool = True) -> dict | None:
    """The init model's weights (training or loading them), or None when the recipe has no init stage."""
    ic = cfg.init
    if not wants_init(cfg):
        if ic.row:
            evaluate_untrained(cfg, scenario, run_dir, device, show_progress)
        return None
    out = run_dir / INIT
    model_path, metrics_path = out / "model.pt", out / "metrics.json"
    trained, evaluated = model_path.is_file(), metrics_path.is_file()
    parallel.barrier("starting the init stage")  # every rank has read the files before rank 0 writes them
    main = parallel.is_main()  # several processes: rank 0 alone writes
    seed_everything(cfg.seed)
    model = build_model(cfg.model, scenario.tasks[0].train)
    seconds, peak_mib = 0.0, 0.0
    finetune = METHODS["finetune"]
    if ic.checkpoint:
        state = load_init_checkpoint(ic.checkpoint, model)
    elif trained:
        saved = torch.load(model_path, map_location="cpu", weights_only=True)
        state, seconds, peak_mib = saved["model"], saved["seconds"], saved["peak_memory_mib"]
    else:
        check_init(cfg, scenario, model)
        train_cfg = OmegaConf.merge(cfg.train, {"batch_size": ic.batch_size or cfg.train.batch_size,
                                                "model_selection": "last", "optimizer_scope": "task"})
        model.to(device)
        trainer = Trainer(train_cfg, device, autocast_factory(device, cfg.train.precision), cfg.eval.batch_size)
        held_out = Task(-1, [], scenario.held_out, {}, {})
        clips = len(next(iter(scenario.held_out.values())))
        log("init_start", clips=clips, epochs=ic.epochs, avm_epochs=ic.avm_epochs)
        if show_progress and main:
            print(f"init: {ic.epochs} epoch(s) of the backbone, then {ic.avm_epochs} of the AVM, on {clips} held-out "
                  f"clips (once; saved to {model_path})", file=sys.stderr, flush=True)
        started = time.perf_counter()
        stages = [(finetune, finetune.Hparams(epochs=ic.epochs)), (AVMStage, AVMStage.Hparams(epochs=ic.avm_epochs))]
        with PeakMemory(device) as peak:
            for cls, hparams in stages:
                if hparams.epochs:
                    trainer.fit_task(cls(model, hparams, cfg), held_out,
                                     lambda e, loss, n=cls.name: log("init_epoch", stage=n, epoch=e, loss=loss),
                                     loader_cfg=cfg.data)
        seconds, peak_mib = time.perf_counter() - started, peak.mib
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if main:
            atomic_torch_save({"model": state, "seconds": seconds, "peak_memory_mib": peak_mib}, model_path)
        log("init_end", seconds=round(seconds, 3))
    if not evaluated:  # every rank evaluates its share (sharded evaluation); rank 0 alone writes
        model.load_state_dict(state)
        model.to(device).eval()
        protocol = make_protocol(cfg, scenario, device, autocast_factory(device, cfg.train.precision))
        record = {"train_seconds": seconds, "task_seconds": [seconds], "peak_memory_mib": peak_mib,
                  **protocol.new_record()}
        holder = finetune(model, finetune.Hparams(), cfg)  # the protocol reads its .model
        summary = protocol.after_task(holder, scenario.tasks, record)
        protocol.finish(holder, record)
        if main:
            atomic_write_json(metrics_path, method_metrics(INIT, record, protocol, scenario, 1, True))
        if show_progress and main:
            print(f"{INIT}: {summary} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return state


def evaluate_untrained(cfg: DictConfig, scenario, run_dir: Path, device: torch.device,
                       show_progress: bool = True) -> None:
    """``init.row`` without an init stage: the report's ``init`` row is the untrained model (built as every
    method builds its own: seeded with ``seed``), evaluated once by the run's protocol (``init/metrics.json``)."""
    metrics_path = run_dir / INIT / "metrics.json"
    parallel.barrier("evaluating the untrained model")  # every rank sees the same metrics file, or none
    if metrics_path.is_file():
        return
    seed_everything(cfg.seed)
    model = build_model(cfg.model, scenario.tasks[0].train).to(device).eval()
    protocol = make_protocol(cfg, scenario, device, autocast_factory(device, cfg.train.precision))
    record = {"train_seconds": 0.0, "task_seconds": [0.0], "peak_memory_mib": 0.0, **protocol.new_record()}
    holder = METHODS["finetune"](model, METHODS["finetune"].Hparams(), cfg)  # the protocol reads its .model
    summary = protocol.after_task(holder, scenario.tasks, record)
    protocol.finish(holder, record)
    if not parallel.is_main():  # every rank evaluated its share (sharded evaluation); rank 0 alone writes
        return
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics_path, method_metrics(INIT, record, protocol, scenario, 1, True))
    if show_progress:
        print(f"{INIT} (untrained): {summary}", file=sys.stderr, flush=True)

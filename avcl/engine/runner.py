"""A run: every method of a recipe through the same scenario, with checkpoints and logs.

Run directory::

    config.yaml              resolved config (what --resume reads back)
    events.jsonl             one JSON event per line (run/method/task/epoch start and end)
    init/model.pt, init/metrics.json   the init stage's model (config ``init``) and its evaluation
    <method>/metrics.json    written after every task; "complete": true when the method is done
    <method>/checkpoint.pt   after every task: model, method state (memory...), optimizer + scaler, RNG,
                             metrics;
                             deleted once the method is complete unless train.keep_checkpoints=true
    <method>/step_checkpoint.pt  inside a task, every train.checkpoint_every steps / checkpoint_minutes: the
                             task's position (model, optimizer + lr schedule + scaler, method state, RNG, epoch,
                             permutation, step);
                             deleted when the task ends
    <method>/model.pt        the final model's weights (train.save_model; default: pre-training models)
    <method>/accuracy_matrix.png, accuracy.png   plots (retrieval_matrix.png, retrieval.png)
    <method>/epochs.csv, tasks.csv   per-epoch losses (each loss term), lr, skipped fp16 steps, val accuracy,
                             times; per-task metrics
    tensorboard/<method>/    the same as TensorBoard scalars, with log.tensorboard=true (avcl.engine.loggers)
    environment.json         versions, platform and device, one entry per start or resume

What is measured after each task is the protocol's (``eval.protocol``, avcl.eval.protocols).

A killed run resumes from each method's last checkpoint and reproduces the uninterrupted
run's metrics (on CPU; wall-clock times aside). Inside a task it resumes from the step checkpoint: the task
starts again from its starting state (the previous task's checkpoint, or the fresh model), ``before_task`` and
``training_data`` run as the first time, then the step checkpoint's state replaces the model's, the
optimizer's (with its lr schedule and GradScaler), the method's and the RNGs', and training continues at the
next step of the same permutation.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from avcl import parallel
from avcl.config import method_hparams_for
from avcl.core.device import autocast_factory, default_threads, keep_cpu_heap, pick_device
from avcl.core.io import atomic_torch_save, atomic_write_json
from avcl.core.rng import rng_state, seed_everything, set_rng_state
from avcl.core.samples import concat
from avcl.data import build_dataset
from avcl.data.scenario import from_config as scenario_from_config, merged_task
from avcl.engine.events import EventLog
from avcl.engine.init_stage import run_init_stage, wants_init
from avcl.engine.loggers import MethodLog, NoLog, record_environment
from avcl.engine.peak_memory import PeakMemory
from avcl.engine.progress import RunProgress, stage
from avcl.engine.regime import Regime, precision_of
from avcl.engine.trainer import Trainer
from avcl.eval.protocols import make_protocol, method_metrics
from avcl.memory import sharding
from avcl.models import build_model
from avcl.report.plots import plot_run
from avcl.report.tables import divergence_text


def build_method(name: str, cfg: DictConfig, example) -> object:
    """The method (or variant) ``name`` with its hyperparameters and a fresh model."""
    cls, hparams, model_cfg = method_hparams_for(cfg, name)
    return cls(build_model(model_cfg, example), hparams, cfg)


def run_method(name: str, cfg: DictConfig, scenario, run_dir: Path, log: EventLog,
               device: torch.device, show_progress: bool = True, init_state: dict | None = None,
               progress: RunProgress | None = None) -> dict:
    """Train and evaluate one method over all tasks, resuming from its checkpoint if present.

    ``init_state``: model weights every method starts from (the init stage's), if any.
    ``progress``: the run's progress (advanced one step per epoch); None: this method's own.
    """
    out = run_dir / name
    main = parallel.is_main()  # several processes: rank 0 alone writes; every rank reads
    if main:
        out.mkdir(parents=True, exist_ok=True)
    metrics_path, ckpt_path, step_path = out / "metrics.json", out / "checkpoint.pt", out / "step_checkpoint.pt"
    if metrics_path.is_file():
        done = json.loads(metrics_path.read_text())
        if done.get("complete") or done.get("stopped"):
            return done
    resuming = ckpt_path.is_file()
    parallel.barrier("starting a method")  # every rank has read the files before rank 0 writes them again
    seed_everything(cfg.seed)
    method = build_method(name, cfg, scenario.tasks[0].train)
    if init_state is not None:
        method.model.load_state_dict(init_state)
    method.model.to(device)
    trainer = Trainer(cfg.train, device, autocast_factory(device, cfg.train.precision), cfg.eval.batch_size)
    protocol = make_protocol(cfg, scenario, device, trainer.autocast)
    tasks = [merged_task(scenario)] if method.single_task else scenario.tasks
    record = {"train_seconds": 0.0, "task_seconds": [], "peak_memory_mib": 0.0, **protocol.new_record()}
    start_task, regime = 0, None
    stream_optimizer = cfg.train.optimizer_scope == "stream"
    if resuming:
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if not method.label_free:
            method.model.head.grow(state["model"]["head.fc.weight"].shape[0])
        method.model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
        sharding.load_rank_memory(method.memory, state, cfg.seed)
        if stream_optimizer:  # the optimizer and GradScaler go on; each task starts its own part of the curve
            regime = Regime.build(method, cfg.train, device)
            regime.load_state_dict(state["regime"], schedule=False)
        record, start_task = state["record"], state["task"] + 1
        set_rng_state(state["rng"])
        log("method_resume", method=name, task=start_task)
    mid = torch.load(step_path, map_location=device, weights_only=True) if step_path.is_file() else None
    if mid is not None and mid["task"] != start_task:  # left by a kill after its task's checkpoint was written
        mid = None
    if mid is not None:
        log("method_resume", method=name, task=start_task, epoch=mid["epoch"], step=mid["step"])
    epochs = method.hp.epochs or cfg.train.epochs
    own_progress = progress is None
    if own_progress:
        progress = RunProgress(len(tasks) * epochs, start_task * epochs, show_progress,
                               interval=cfg.log.progress_seconds)
    interactive = show_progress and progress.interactive
    logs = MethodLog(run_dir, name, start_task, epochs, cfg.log.tensorboard,
                     start_epoch=mid["epoch"] if mid is not None else 0) if main else NoLog()
    log("method_start", method=name, start_task=start_task)
    for t in range(start_task, len(tasks)):
        task = tasks[t]
        log("task_start", method=name, task=t, classes=task.classes)
        started = last_epoch = time.perf_counter()
        progress.at(name, t, len(tasks), 0, epochs)

        def on_epoch(epoch: int, loss: float) -> None:
            nonlocal last_epoch
            now = time.perf_counter()
            terms = method.pop_terms()
            logs.epoch(t, epoch, loss, terms, now - last_epoch, now - started, trainer.epoch_stats)
            if cfg.train.model_selection != "best_val":  # no val accuracy joins the row: on disk now (a kill keeps it)
                logs.flush()
            if not math.isfinite(loss):
                bad = {"task": t, "epoch": epoch, "step": trainer.nonfinite_step, "loss": str(loss),
                       "terms": sorted(k for k, v in terms.items() if not math.isfinite(v)), "on_nan": cfg.train.on_nan}
                log("diverged", method=name, **bad)
                if "diverged" not in record:  # flag: said once, at the first
                    print(f"avcl: {name}: {divergence_text(bad)}", file=sys.stderr, flush=True)
                record.setdefault("diverged", bad)  # the first one (flag: training goes on)
                if cfg.train.on_nan == "stop":
                    raise Diverged(bad)
            last_epoch = now
            progress.advance(1)
            progress.at(name, t, len(tasks), epoch + 1, epochs, loss=f"{loss:.3f}")
            log("epoch_end", method=name, task=t, epoch=epoch, loss=loss)

        def on_val(epoch: int, accuracy: float) -> None:
            log("epoch_val", method=name, task=t, epoch=epoch, val_accuracy=accuracy)
            logs.val(t, epoch, accuracy)

        seen = scenario.tasks if method.single_task else scenario.tasks[:t + 1]
        seen_val = (concat([s.val for s in seen])  # model selection: all seen classes
                    if cfg.train.model_selection == "best_val" else None)
        method.pop_terms()  # only the terms of this task's epochs
        def save_step(state: dict, t: int = t) -> None:
            if main:
                atomic_torch_save({"task": t, **state}, step_path)
                log("step_checkpoint", method=name, task=t, epoch=state["epoch"], step=state["step"],
                    mib=round(step_path.stat().st_size / 2**20, 2))

        with PeakMemory(device) as peak, stopped_by_divergence() as stopped:
            regime = trainer.fit_task(method, task, on_epoch, val=seen_val, on_val=on_val,
                                      regime=regime if stream_optimizer else None,
                                      checkpoint=save_step if (cfg.train.checkpoint_every or
                                                               cfg.train.checkpoint_minutes) else None,
                                      resume=mid if t == start_task else None, loader_cfg=cfg.data,
                                      position=(t, len(tasks)))
        seconds = time.perf_counter() - started
        if stopped.info is not None:  # train.on_nan=stop: the tasks before it are the row, marked as stopped
            metrics = (method_metrics(name, record, protocol, scenario, len(tasks), False) if record["task_seconds"]
                       else {"method": name, "complete": False, "tasks_done": 0, "num_tasks": len(tasks),
                             "protocol": protocol.name, "train_seconds": 0.0, "task_seconds": [],
                             "peak_memory_mib": 0.0})
            metrics.update(stopped="diverged", diverged=record["diverged"])
            if main:
                atomic_write_json(metrics_path, metrics)
                step_path.unlink(missing_ok=True)
            break
        method.model.eval()
        parallel.check_replicas(method.replicated_state(), f"{name} task {t}")  # same model and memory on every rank
        summary = protocol.after_task(method, seen, record)
        record["train_seconds"] += seconds
        record["task_seconds"].append(seconds)
        record["peak_memory_mib"] = max(record["peak_memory_mib"], peak.mib)
        complete = t == len(tasks) - 1
        if complete:
            protocol.finish(method, record)
        rank_memory = sharding.rank_memory(method.memory)  # per-rank reservoirs (a collective: every rank)
        metrics = method_metrics(name, record, protocol, scenario, len(tasks), complete)
        if main:
            atomic_torch_save({"task": t, "model": method.model.state_dict(), "method": method.state_dict(),
                               "regime": regime.state_dict(), "rng": rng_state(), "record": record,
                               **rank_memory}, ckpt_path)
            if complete and wants_model_file(cfg, method.model):  # before metrics.json marks the method complete
                atomic_torch_save({"model": method.model.state_dict()}, out / "model.pt")
            atomic_write_json(metrics_path, metrics)
            step_path.unlink(missing_ok=True)  # the task's end supersedes its step checkpoints
            if complete and not cfg.train.keep_checkpoints:  # only resuming needs it, and the method is done
                ckpt_path.unlink(missing_ok=True)
        logs.task(t, seconds, metrics)
        log("task_end", method=name, task=t, summary=summary, seconds=round(seconds, 3))
        if show_progress and not interactive:  # logs and CI: one line per task instead of a bar
            print(f"{name}: task {t + 1}/{len(tasks)} {summary} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    logs.close()
    if own_progress:
        progress.close()
    log("method_end", method=name)
    parallel.barrier("ending a method")  # rank 0 has written metrics.json before any rank reads it
    return json.loads(metrics_path.read_text())


class Diverged(Exception):
    """A method's epoch loss was not finite under ``train.on_nan=stop`` (``info``: where, which terms)."""

    def __init__(self, info: dict):
        super().__init__(divergence_text(info))
        self.info = info


class stopped_by_divergence(contextlib.AbstractContextManager):
    """Catches ``Diverged`` from a task's training: ``info`` is then its dict, else None."""
    info = None

    def __exit__(self, kind, value, traceback) -> bool:
        if isinstance(value, Diverged):
            self.info = value.info
            return True
        return False


def wants_model_file(cfg: DictConfig, model) -> bool:
    """``train.save_model``; None: only for label-free (pre-training) models."""
    save = cfg.train.save_model
    return bool(getattr(model, "label_free", False)) if save is None else save


def make_scenario(cfg: DictConfig, data_root: str | None = None):
    """Build the dataset and split it into tasks (raises AvclError on missing or bad data)."""
    stage(f"loading data: dataset '{cfg.data.name}'")
    started = time.perf_counter()
    dataset = build_dataset(cfg.data, data_root, cfg.seed)
    stage(f"building the scenario: {cfg.scenario.num_tasks} tasks "
          f"(data loaded in {time.perf_counter() - started:.1f} s; {dataset.info.get('residency', 'resident')})")
    return scenario_from_config(dataset, cfg)


def planned_epochs(cfg: DictConfig, scenario, run_dir: Path) -> tuple[int, int]:
    """(epochs the whole run trains over all methods x tasks, epochs already done by a killed run)."""
    total = done = 0
    for name in cfg.methods:
        cls, hparams, _ = method_hparams_for(cfg, name)
        tasks = 1 if cls.single_task else len(scenario.tasks)
        epochs = hparams.epochs or cfg.train.epochs
        total += tasks * epochs
        metrics_path = run_dir / name / "metrics.json"
        if metrics_path.is_file():
            done += min(json.loads(metrics_path.read_text()).get("tasks_done", 0), tasks) * epochs
    return total, done


def execute(cfg: DictConfig, run_dir: Path, data_root: str | None = None, show_progress: bool = True,
            scenario=None, on_event=None) -> dict:
    """Run every method of ``cfg`` into ``run_dir``; returns method -> metrics.
    ``on_event(event, fields)``: hears every event of ``events.jsonl`` (EventLog's listener)."""

    if scenario is None:
        scenario = make_scenario(cfg, data_root)
    dist = parallel.setup(cfg.train)  # under torchrun: join the process group (None in one process)
    parallel.check_world(cfg)
    main = parallel.is_main()  # rank 0 alone writes and shows progress
    show_progress = show_progress and main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = EventLog(run_dir / "events.jsonl", on_event)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    else:  # torchrun: the node's cores shared by its local ranks
        threads, why = default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist else 1)
        torch.set_num_threads(threads)
        stage(f"{threads} torch thread(s) per process ({why})")
    device = dist.device if dist else pick_device(cfg.train.device)
    heap_kept = device.type == "cpu" and cfg.train.cpu_keep_heap and keep_cpu_heap()
    tc = cfg.train
    effective = tc.batch_size * tc.accumulate  # rows per optimizer step, over every process (+ replayed rows)
    log("run_start", recipe=cfg.name, device=str(device), cpu_heap_kept=heap_kept, methods=list(cfg.methods),
        tasks=[task.classes for task in scenario.tasks], effective_batch=effective,
        precision=precision_of(tc, device), **({"processes": dist.world} if dist else {}))
    if main:
        # What the run was trained on, as plain data anyone can reproduce: classes, order, tasks, provenance.
        atomic_write_json(run_dir / "dataset.json", {
            "class_names": scenario.class_names, "class_order": scenario.class_order,
            "tasks": [{"classes": t.classes, "train": len(t.train["label"]), "val": len(t.val["label"]),
                       "test": len(t.test["label"])} for t in scenario.tasks],
            "info": scenario.info})
        record_environment(run_dir, device)
    parallel.barrier("starting the run")  # every rank has read the run directory before rank 0 writes more
    total, done = planned_epochs(cfg, scenario, run_dir)
    with RunProgress(total, done, show_progress, interval=cfg.log.progress_seconds) as progress:
        if wants_init(cfg):
            progress.note("init stage")
        init_state = run_init_stage(cfg, scenario, run_dir, log, device, show_progress)
        per = f", {tc.batch_size // dist.world} rows per process" if dist else ""
        stage(f"training {len(cfg.methods)} method(s) x {len(scenario.tasks)} task(s) on {device}; "
              f"{effective} rows per optimizer step ({tc.batch_size} x {tc.accumulate} accumulated{per}), "
              f"{tc.optimizer}, {tc.schedule} lr, {precision_of(tc, device)}")
        results = {}
        for name in cfg.methods:
            results[name] = run_method(name, cfg, scenario, run_dir, log, device, show_progress, init_state,
                                       progress)
            if main:
                plot_run(run_dir, results, cfg.eval.protocol)
    log("run_end")
    return results

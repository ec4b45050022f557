"""Per-epoch and per-task logs of one method: CSV always, TensorBoard when ``log.tensorboard=true``.

``<method>/epochs.csv``: one row per epoch: ``task``, ``epoch``, ``loss`` (the mean training loss),
one ``loss/<term>`` column per loss term the method reports (``Method.log_terms``; the mean over
the epoch's steps that reported it), ``val_accuracy`` (with ``train.model_selection=best_val``),
``seconds`` (wall time of the epoch; the first of a task includes the task's set-up) and
``elapsed_seconds`` (since the task began).
``<method>/tasks.csv``: one row per task: ``task``, ``seconds``, then the scalar metrics of
metrics.json after that task (e.g. ``accuracy`` on all seen classes, ``last_accuracy``...).

TensorBoard (optional extra ``pip install 'avcl[tensorboard]'``): the same numbers as scalars in
``RUN/tensorboard/<method>`` (``tensorboard --logdir RUN/tensorboard``): epoch rows at step =
epochs trained so far, task rows (``task/...``) at step = tasks learned.

Both survive a resume: rows of the tasks a resumed method trains again are dropped (the CSV
files are rewritten atomically each time), and TensorBoard purges events past the resume step.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch

import avcl
from avcl.core.errors import AvclError
from avcl.core.io import atomic_write_json, atomic_write_text


def check_loggers(cfg) -> None:
    """Refuse ``log.tensorboard=true`` without the tensorboard package, before anything is written."""
    if cfg.log.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - optional extra: avcl[tensorboard]
        except ImportError:
            raise AvclError("log.tensorboard=true needs the tensorboard package: pip install 'avcl[tensorboard]' "
                            "(or pip install tensorboard)") from None


class CsvTable:
    """A CSV file appended row by row (no fsync: as events.jsonl). It is rewritten whole (atomically)
    only when a row brings a new column (a loss term that starts at the second task) and once on
    resume, keeping the rows ``keep`` accepts (a row torn by a kill belongs to a task trained again)."""

    def __init__(self, path: Path, keep=lambda row: True):
        self.path, self.rows, self.columns = path, [], []
        if path.is_file():
            with open(path, newline="") as handle:
                self.rows = [row for row in csv.DictReader(handle) if None not in row.values() and keep(row)]
            self.rewrite()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if any(key not in self.columns for key in row):
            self.rewrite()
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, lineterminator="\n").writerow(row)

    def rewrite(self) -> None:
        seen = list(dict.fromkeys(key for row in self.rows for key in row))  # loss terms right after the loss
        self.columns = sorted(seen, key=lambda key: (0 if key == "loss" or key.startswith("loss/") else 1, seen.index(key))
                              if key not in ("task", "epoch") else (-1, seen.index(key)))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())


def task_values(metrics: dict) -> dict:
    """The scalar numbers of a method's metrics after a task (the latest value of per-task lists)."""
    values = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or key in ("tasks_done", "num_tasks", "train_seconds", "task_seconds"):
            continue
        if isinstance(value, (int, float)):
            values[key] = value
    for key, name in (("step_accuracy", "accuracy"), ("val_accuracy", "val_accuracy")):
        if metrics.get(key) and metrics[key][-1] is not None:
            values[name] = metrics[key][-1]
    for head, h in (metrics.get("heads") or {}).items():
        if h.get("step_accuracy"):
            values[f"{head}/accuracy"] = h["step_accuracy"][-1]
    return values


class MethodLog:
    """The logs of one method in ``run_dir/name``; ``start_task``: the first task trained now."""

    def __init__(self, run_dir: Path, name: str, start_task: int, epochs_per_task: int, tensorboard: bool = False,
                 start_epoch: int = 0):
        """``start_epoch``: resumed inside task ``start_task`` (a step checkpoint): its earlier epochs' rows stay."""
        out = run_dir / name
        out.mkdir(parents=True, exist_ok=True)
        self.epochs_csv = CsvTable(out / "epochs.csv", lambda row: (int(row["task"]), int(row["epoch"])) <
                                   (start_task, start_epoch))
        self.tasks_csv = CsvTable(out / "tasks.csv", lambda row: int(row["task"]) < start_task)
        self.epochs_per_task = epochs_per_task
        self.pending: dict | None = None  # the last epoch's row, until its val accuracy may join it
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional extra (avcl[tensorboard]), checked before
            purge = start_task * epochs_per_task + start_epoch
            self.writer = SummaryWriter(str(run_dir / "tensorboard" / name), purge_step=purge if purge else None)

    def epoch(self, task: int, epoch: int, loss: float, terms: dict, seconds: float, elapsed: float,
              stats: Optional[dict] = None) -> None:
        """``stats``: the optimizer step's (the lr of the epoch's last step, fp16 steps skipped), own columns."""
        row = {"task": task, "epoch": epoch, "loss": loss, **{f"loss/{k}": v for k, v in terms.items()},
               **(stats or {}), "seconds": round(seconds, 4), "elapsed_seconds": round(elapsed, 4)}
        self.flush()
        self.pending = row
        if self.writer is not None:
            step = task * self.epochs_per_task + epoch + 1
            self.writer.add_scalar("loss", loss, step)
            for key, value in {**{f"loss/{k}": v for k, v in terms.items()}, **(stats or {})}.items():
                self.writer.add_scalar(key, value, step)
            self.writer.add_scalar("epoch_seconds", seconds, step)

    def val(self, task: int, epoch: int, accuracy: float) -> None:
        """The val accuracy of the epoch just logged (model selection)."""
        self.pending["val_accuracy"] = accuracy
        self.flush()
        if self.writer is not None:
            self.writer.add_scalar("val_accuracy", accuracy, task * self.epochs_per_task + epoch + 1)

    def task(self, task: int, seconds: float, metrics: dict) -> None:
        self.flush()
        values = task_values(metrics)
        self.tasks_csv.append({"task": task, "seconds": round(seconds, 4), **values})
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"task/{key}", value, task + 1)
            self.writer.add_scalar("task/seconds", seconds, task + 1)
            self.writer.flush()

    def flush(self) -> None:
        if self.pending is not None:
            self.epochs_csv.append(self.pending)
            self.pending = None

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def environment_info(device) -> dict:
    """What the run ran on: versions, platform, device (RUN/environment.json; one entry per start or resume)."""


    info = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "avcl": avcl.__version__,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:  # a source checkout: its commit
        source = Path(avcl.__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def record_environment(run_dir: Path, device) -> None:
    path = run_dir / "environment.json"
    sessions = []
    if path.is_file():
        try:
            sessions = json.loads(path.read_text()).get("sessions", [])
        except (json.JSONDecodeError, AttributeError):
            sessions = []
    atomic_write_json(path, {"sessions": sessions + [environment_info(device)]})


class NoLog:
    """What a rank other than 0 logs: nothing (rank 0 writes every method's logs)."""

    def epoch(self, *args, **kwargs) -> None: ...

    def val(self, *args, **kwargs) -> None: ...

    def task(self, *args, **kwargs) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

"""Evaluation after each task: accuracy on all seen tasks' data, no task id (class-incremental,
"TAg"), and from the same forward pass the task-aware accuracy ("TAw", as FACIL reports it):
each clip is classified among the classes of its own task only (the columns of that task's
label range), i.e. the task-incremental setting where the task id is given at test time.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from avcl import parallel
from avcl.core.samples import Samples, concat, to_device


@torch.no_grad()
def _correct(predict: Callable[[Samples], torch.Tensor], data: Samples, batch_size: int, device, autocast,
             task_bounds: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(TAg, TAw) per-sample correctness (N,) float on the CPU; TAw is None without ``task_bounds``
    ((num_classes, 2): the [start, end) label range of each class's task)."""
    bounds = task_bounds.to(device) if task_bounds is not None else None

    def correct(batch: Samples) -> dict[str, torch.Tensor]:
        batch = to_device(batch, device)
        with autocast():
            scores = predict(batch)
        labels = batch["label"]
        out = {"tag": (scores.argmax(dim=1) == labels).float().cpu()}
        if bounds is not None:
            start, end = bounds[labels].unbind(1)
            columns = torch.arange(scores.shape[1], device=scores.device)
            own_task = (columns >= start[:, None]) & (columns < end[:, None])
            out["taw"] = (scores.masked_fill(~own_task, float("-inf")).argmax(dim=1) == labels).float().cpu()
        return out
    both = parallel.eval_pass(correct, data, batch_size)  # several processes: sharded
    return both["tag"], both.get("taw")


def correct_predictions(predict: Callable[[Samples], torch.Tensor], data: Samples, batch_size: int,
                        device, autocast) -> torch.Tensor:
    """(N,) float on the CPU: 1 where argmax of ``predict`` is the label, batched on ``device``."""
    return _correct(predict, data, batch_size, device, autocast)[0]


def task_bounds(tasks: list) -> torch.Tensor:
    """(num_classes, 2): the [start, end) label range of the task owning each label of ``tasks``."""
    end = max(task.classes[-1] for task in tasks) + 1
    bounds = torch.zeros(end, 2, dtype=torch.long)
    for task in tasks:
        bounds[task.classes[0]:task.classes[-1] + 1] = torch.tensor([task.classes[0], task.classes[-1] + 1])
    return bounds


def _per_task(correct: torch.Tensor, labels: torch.Tensor, tasks: list) -> list[float]:
    per_task = []
    for task in tasks:
        mask = (labels >= task.classes[0]) & (labels <= task.classes[-1])
        per_task.append(float(correct[mask].mean()) if mask.any() else float("nan"))
    return per_task


def accuracy_per_task(predict: Callable[[Samples], torch.Tensor], tasks: list, split: str,
                      batch_size: int, device, autocast) -> tuple[list[float], float]:
    """(accuracy on each seen task, accuracy on all of them pooled) for one prediction head."""
    data = concat([getattr(task, split) for task in tasks])
    correct = correct_predictions(predict, data, batch_size, device, autocast)
    return _per_task(correct, data["label"].cpu(), tasks), float(correct.mean())


def accuracies_tag_taw(predict: Callable[[Samples], torch.Tensor], tasks: list, split: str,
                       batch_size: int, device, autocast) -> dict[str, tuple[list[float], float]]:
    """``{"tag": (per task, pooled), "taw": (per task, pooled)}`` from one pass over the data:
    class-incremental (no task id) and task-aware (each clip among its own task's classes)."""
    data = concat([getattr(task, split) for task in tasks])
    tag, taw = _correct(predict, data, batch_size, device, autocast, task_bounds(tasks))
    labels = data["label"].cpu()
    return {"tag": (_per_task(tag, labels, tasks), float(tag.mean())),
            "taw": (_per_task(taw, labels, tasks), float(taw.mean()))}

"""Evaluation after each task: accuracy on all seen tasks' data, no task id."""
from __future__ import annotations

from typing import Callable

import torch

from avcl.data.samples import Samples, batches, concat


@torch.no_grad()
def correct_predictions(predict: Callable[[Samples], torch.Tensor], data: Samples, batch_size: int,
                        device, autocast) -> torch.Tensor:
    """(N,) float on the CPU: 1 where argmax of ``predict`` is the label, batched on ``device``."""
    correct = []
    for batch in batches(data, batch_size):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            scores = predict(batch)
        correct.append((scores.argmax(dim=1) == batch["label"]).cpu())
    return torch.cat(correct).float()


def accuracy_per_task(predict: Callable[[Samples], torch.Tensor], tasks: list, split: str,
                      batch_size: int, device, autocast) -> tuple[list[float], float]:
    """(accuracy on each seen task, accuracy on all of them pooled) for one prediction head."""
    data = concat([getattr(task, split) for task in tasks])
    correct = correct_predictions(predict, data, batch_size, device, autocast)
    labels = data["label"].cpu()
    per_task = []
    for task in tasks:
        mask = (labels >= task.classes[0]) & (labels <= task.classes[-1])
        per_task.append(float(correct[mask].mean()) if mask.any() else float("nan"))
    return per_task, float(correct.mean())

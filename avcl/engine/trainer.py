"""The one training loop every method runs through.

Per task: ``method.before_task`` -> epochs of mini-batches (new data, plus memory as the
method asks) -> ``method.after_task``. Hooks are per task, never per forward pass, so the
loop costs next to nothing over a hand-written one (benchmarks/engine_overhead.py).
Task data stays resident on the device and is batch-indexed.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from avcl.data.samples import Samples, batches, concat, num_samples, select, to_device
from avcl.methods.base import Method


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_factory(device: torch.device, bf16: Optional[bool]) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast when asked (default: on CUDA only), else a no-op context."""
    enabled = device.type == "cuda" if bf16 is None else bf16
    if not enabled:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(params, train_cfg, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=train_cfg.weight_decay)


def flagged(samples: Samples, from_memory: bool) -> Samples:
    return {**samples, "from_memory": torch.full((num_samples(samples),), from_memory,
                                                 dtype=torch.bool, device=samples["label"].device)}


@dataclass
class Trainer:
    train_cfg: object
    device: torch.device
    autocast: Callable

    def fit_task(self, method: Method, task, on_epoch: Callable[[int, float], None] = lambda e, l: None):
        """Train ``method`` on ``task``; returns the optimizer (its state goes into the checkpoint)."""
        cfg, hp = self.train_cfg, method.hp
        task = replace(task, train=to_device(task.train, self.device))
        method.before_task(task)
        memory = method.memory.samples if method.memory is not None and len(method.memory) else None
        data = flagged(task.train, False)
        replay = None
        if memory is not None and method.replay == "merge":
            data = concat([data, flagged(memory, True)])
        elif memory is not None:
            replay = flagged(memory, True)
        optimizer = make_optimizer(method.parameters(), cfg, hp.lr or cfg.lr)
        method.model.train()
        for epoch in range(hp.epochs or cfg.epochs):
            total, steps = torch.zeros((), device=self.device), 0
            for batch in batches(data, cfg.batch_size, shuffle=True):
                if replay is not None:
                    pick = torch.randint(num_samples(replay), (cfg.replay_batch_size,))
                    batch = concat([batch, select(replay, pick.to(self.device))])
                with self.autocast():
                    loss = method.training_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                steps += 1
            on_epoch(epoch, float(total) / max(steps, 1))  # one host sync per epoch, not per step
        method.model.eval()
        method.after_task(task)
        return optimizer

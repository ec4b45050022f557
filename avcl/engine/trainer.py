"""The one training loop every method runs through.

Per task: ``method.before_task`` -> epochs of mini-batches (new data, plus memory as the
method asks) -> ``method.after_task``. Hooks are per task, never per forward pass, so the
loop costs next to nothing over a hand-written one (benchmarks/engine_overhead.py).
Task data stays resident on the device and is batch-indexed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from avcl import parallel
from avcl.core.samples import Samples, batches, concat, num_samples, select, to_device
from avcl.eval.evaluator import correct_predictions
from avcl.memory.buffer import ExemplarMemory
from avcl.methods.base import Method


def make_optimizer(params, train_cfg, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=tuple(train_cfg.adam_betas), weight_decay=train_cfg.weight_decay)


def flagged(samples: Samples, from_memory: bool) -> Samples:
    device = next(iter(samples.values())).device
    return {**samples, "from_memory": torch.full((num_samples(samples),), from_memory,
                                                 dtype=torch.bool, device=device)}


def without_labels(samples: Samples) -> Samples:
    """What a label-free learner may see: everything but the labels (used only to build tasks and evaluate)."""
    return {key: value for key, value in samples.items() if key != "label"}


@dataclass
class Trainer:
    train_cfg: object
    device: torch.device
    autocast: Callable
    eval_batch_size: int = 256

    def fit_task(self, method: Method, task, on_epoch: Callable[[int, float], None] = lambda e, l: None,
                 val: Optional[Samples] = None, on_val: Callable[[int, float], None] = lambda e, a: None,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        """Train ``method`` on ``task``; returns the optimizer (its state goes into the checkpoint).

        ``optimizer``: continue with this one (``train.optimizer_scope=stream``); None: a fresh one.

        With ``train.model_selection=best_val`` the accuracy on ``val`` (the val data of all seen
        classes, FC head, no task id) is measured after every epoch and the task ends with the
        weights of the best epoch (the first, on ties), as AV-CIL's official code does.
        """
        cfg, hp = self.train_cfg, method.hp
        select_best = cfg.model_selection == "best_val" and bool(val) and num_samples(val) > 0
        best_accuracy, best_state = -1.0, None
        if select_best:
            val = to_device(val, self.device)
        task = replace(task, train=to_device(task.train, self.device))
        method.before_task(task)
        # exemplar memories join training here; a reservoir is drawn from by the method itself (replay "step")
        memory = method.memory.samples if isinstance(method.memory, ExemplarMemory) and len(method.memory) else None
        data = flagged(without_labels(task.train) if method.label_free else task.train, False)
        replay = None
        if memory is not None and method.replay == "merge":
            data = concat([data, flagged(memory, True)])
        elif memory is not None:
            replay = flagged(memory, True)
        with torch.no_grad(), self.autocast():
            data, replay = method.training_data(data, replay)
        if optimizer is None:
            optimizer = make_optimizer(method.parameters(), cfg, hp.lr or cfg.lr)
        method.optimizer = optimizer
        method.model.train()
        sharded = parallel.current() is not None
        if sharded:  # the rank's own stream for its rows' augmentations (parallel.RankRandom)
            parallel.seed_rank_random(int(method.cfg.seed), len(method.task_ranges), self.device)
        for epoch in range(hp.epochs or cfg.epochs):
            total, steps = torch.zeros((), device=self.device), 0
            # several processes: this rank's slice of each global batch (avcl.parallel)
            for batch, step in (parallel.shard_batches(data, cfg.batch_size) if sharded else
                                ((b, None) for b in batches(data, cfg.batch_size, shuffle=True))):
                if replay is not None:
                    pick = torch.randint(num_samples(replay), (cfg.replay_batch_size,))
                    if step is not None:
                        pick = parallel.slice_rows(pick, step)
                    batch = concat([batch, select(replay, pick.to(self.device))])
                with (parallel.collective("a training step") if sharded else contextlib.nullcontext()):
                    with self.autocast(), (parallel.step(step) if sharded else contextlib.nullcontext()):
                        loss = method.training_loss(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # several processes: gathered rows send their gradients back here
                    if sharded:
                        parallel.average_gradients(optimizer)
                optimizer.step()
                total += loss.detach()
                steps += 1
            if sharded:  # the epoch's loss over every rank's slices (equal slices: the mean of the means)
                total = parallel.average(total)
            on_epoch(epoch, float(total) / max(steps, 1))  # one host sync per epoch, not per step
            parallel.test_stop(f"{method.name}:{len(method.task_ranges) - 1}:{epoch}")
            if select_best:
                accuracy = self.fc_accuracy(method, val)
                on_val(epoch, accuracy)
                if accuracy > best_accuracy:
                    best_accuracy = accuracy
                    best_state = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
                method.model.train()
        if best_state is not None:
            method.model.load_state_dict(best_state)
        method.model.eval()
        method.after_task(task)
        return optimizer

    @torch.no_grad()
    def fc_accuracy(self, method: Method, samples: Samples) -> float:
        """Accuracy of the classifier head over all seen classes (FC even for NME methods:
        their class means are only computed after the task)."""
        method.model.eval()
        predict = lambda batch: Method.predict(method, batch)  # noqa: E731
        return float(correct_predictions(predict, samples, self.eval_batch_size, self.device, self.autocast).mean())

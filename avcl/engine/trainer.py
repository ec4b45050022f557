"""The one training loop every method runs through.

Per task: ``method.before_task`` -> epochs of mini-batches (new data, plus memory as the
method asks) -> ``method.after_task``. Hooks are per task, never per forward pass, so the
loop costs next to nothing over a hand-written one (benchmarks/engine_overhead.py).
Task data stays resident on the device and is batch-indexed; a streamed task (``data.residency``,
avcl.data.stream) is read batch by batch by DataLoader workers, in the same order. Every
``train.checkpoint_every`` steps (or ``checkpoint_minutes``) the task's position is handed to the runner,
which writes it: a killed run resumes inside the task.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from avcl import parallel
from avcl.core.rng import rng_state, set_rng_state
from avcl.core.samples import Samples, concat, is_streamed, num_samples, select, to_device
from avcl.data.stream import StreamLoader
from avcl.engine.regime import Regime, drops_last, micro_batches
from avcl.eval.evaluator import correct_predictions
from avcl.memory import sharding
from avcl.memory.buffer import ExemplarMemory
from avcl.methods.base import Method


class Clock:
    """When a mid-task checkpoint is due: every ``every`` optimizer steps and/or ``minutes`` minutes
    (several processes: rank 0's clock decides, for every rank)."""

    def __init__(self, every: int, minutes: float):
        self.every, self.seconds = int(every or 0), 60.0 * float(minutes or 0)
        self.steps, self.last = 0, time.monotonic()

    def due(self, sharded: bool) -> bool:
        self.steps += 1
        due = bool(self.every) and self.steps % self.every == 0
        if self.seconds:
            late = time.monotonic() - self.last >= self.seconds
            if sharded:  # one rank's clock, so that every rank checkpoints at the same step
                late = bool(parallel.broadcast_flag(late))
            due = due or late
        if due:
            self.last = time.monotonic()
        return due


def step_state(method: Method, regime: Regime, epoch: int, step: int, order: torch.Tensor, total: torch.Tensor,
               steps: int, best_accuracy: float, best_state) -> dict:
    """A task's position after ``step`` steps of ``epoch``: what a resumed run needs to continue exactly (the
    model, optimizer + schedule + scaler, method state, every RNG, the epoch's permutation, the epoch's loss sums)."""
    terms = method.__dict__.get("_terms", {})
    return {"epoch": epoch, "step": step, "order": order.cpu(), "total": total.detach().cpu(), "steps": steps,
            "terms": {k: [t, c, list(p)] for k, (t, c, p) in terms.items()},
            "best_accuracy": best_accuracy, "best_state": best_state,
            "model": method.model.state_dict(), "method": method.state_dict(), "regime": regime.state_dict(),
            "rng": rng_state(), "rank_randoms": parallel.gather_objects(parallel.rank_random_state()),
            **sharding.rank_memory(method.memory)}  # several processes: every rank's reservoir (a collective)


def flagged(samples: Samples, from_memory: bool) -> Samples:
    device = next((v.device for v in samples.values() if torch.is_tensor(v)), torch.device("cpu"))
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
    epoch_stats: dict = field(default_factory=dict)  # after each epoch: the lr of its last step, skipped steps
    nonfinite_step: Optional[int] = None  # after an epoch whose loss is not finite: its first such step (1-based)

    def fit_task(self, method: Method, task, on_epoch: Callable[[int, float], None] = lambda e, l: None,
                 val: Optional[Samples] = None, on_val: Callable[[int, float], None] = lambda e, a: None,
                 regime: Optional[Regime] = None, checkpoint: Optional[Callable[[dict], None]] = None,
                 resume: Optional[dict] = None, loader_cfg=None, position: tuple[int, int] = (0, 1)) -> Regime:
        """Train ``method`` on ``task``; returns the optimizer step's ``Regime`` (its state goes into the checkpoint).

        ``regime``: continue with this optimizer (``train.optimizer_scope=stream``); None: a fresh one
        (avcl.engine.regime: parameter groups, optimizer, schedule, clipping, accumulation, GradScaler).
        ``position``: (this task's index, the number of tasks), where the task sits on a ``schedule_scope=stream``
        curve. After each epoch ``self.epoch_stats`` holds the lr of its last step and the fp16 steps it skipped.

        With ``train.model_selection=best_val`` the accuracy on ``val`` (the val data of all seen
        classes, FC head, no task id) is measured after every epoch and the task ends with the
        weights of the best epoch (the first, on ties), as AV-CIL's official code does.

        A streamed task (``avcl.data.stream``) is read by a ``StreamLoader`` (``loader_cfg``: the ``data``
        section's workers and prefetch) in the same order as resident data.

        ``checkpoint(state)``: called on every rank every ``train.checkpoint_every`` steps / ``checkpoint_minutes``
        with the task's position (``step_state``); ``resume``: such a state, to continue from (after
        ``before_task`` and ``training_data`` ran again on the task's starting state, as the first time).
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
        n, epochs, accumulate = num_samples(data), hp.epochs or cfg.epochs, cfg.accumulate
        micro = micro_batches(n, cfg.batch_size, drops_last(cfg, method))  # (start, end) in the epoch's order
        # each optimizer step: `accumulate` micro-batches, each loss weighted by its share of the step's rows
        steps_of = [micro[i:i + accumulate] for i in range(0, len(micro), accumulate)]
        weights = [[(e - s) / (group[-1][1] - group[0][0]) for s, e in group] for group in steps_of]
        if regime is None:
            regime = Regime.build(method, cfg, self.device)
        regime.start_task(len(steps_of), epochs, *position)
        method.optimizer = regime.optimizer
        method.model.train()
        sharded = parallel.current() is not None
        if sharded:  # the rank's own stream for its rows' augmentations (parallel.RankRandom)
            parallel.seed_rank_random(int(method.cfg.seed), len(method.task_ranges), self.device)
        loader = (StreamLoader(data, self.device, loader_cfg.workers if loader_cfg else 0,
                               loader_cfg.prefetch if loader_cfg else 2) if is_streamed(data) else None)
        start_epoch, start_step, order = 0, 0, None
        total, steps = torch.zeros((), device=self.device), 0
        first_bad = torch.full((), -1, device=self.device)  # the epoch's first non-finite step, on the device
        if resume is not None:
            method.model.load_state_dict(resume["model"])
            method.load_state_dict(resume["method"])
            regime.load_state_dict(resume["regime"])
            start_epoch, start_step, order = resume["epoch"], resume["step"], resume["order"]
            total, steps = resume["total"].to(self.device), resume["steps"]
            method.__dict__["_terms"] = resume["terms"]
            best_accuracy, best_state = resume["best_accuracy"], resume["best_state"]
            sharding.load_rank_memory(method.memory, resume, int(method.cfg.seed))
            set_rng_state(resume["rng"])
            parallel.set_rank_random_state(resume["rank_randoms"][parallel.rank()] if sharded else None)
        clock = Clock(cfg.checkpoint_every, cfg.checkpoint_minutes) if checkpoint is not None else None
        for epoch in range(start_epoch, epochs):
            if order is None:
                order = torch.randperm(n)  # as batches(shuffle=True) draws it
            if epoch > start_epoch or resume is None:
                total, steps = torch.zeros((), device=self.device), 0
            first_bad.fill_(-1)
            first = start_step if epoch == start_epoch else 0
            # several processes: this rank's slice of each global micro-batch (avcl.parallel)
            cut = [parallel.shard_rows(order[s:e], e - s)[0] if sharded else (order[s:e], None)
                   for group in steps_of[first:] for s, e in group]
            rows_of = iter(loader.epoch([rows for rows, _ in cut]) if loader is not None else
                           (select(data, rows.to(self.device)) for rows, _ in cut))
            shards = iter(cut)
            for index in range(first, len(steps_of)):
                step_loss = torch.zeros((), device=self.device)
                for part, weight in enumerate(weights[index]):
                    batch, (_, step) = next(rows_of), next(shards)
                    if replay is not None:
                        pick = torch.randint(num_samples(replay), (cfg.replay_batch_size,))
                        if step is not None:
                            pick = parallel.slice_rows(pick, step)
                        batch = concat([batch, select(replay, pick.to(self.device))])
                    with (parallel.collective("a training step") if sharded else contextlib.nullcontext()):
                        with self.autocast(), (parallel.step(step) if sharded else contextlib.nullcontext()):
                            loss = method.training_loss(batch)
                        if part == 0:  # after the forward pass: what a method's own backward left goes too
                            regime.optimizer.zero_grad(set_to_none=True)
                        # several processes: gathered rows send their gradients back here
                        regime.backward(loss * weight if len(weights[index]) > 1 else loss)
                    step_loss += loss.detach() * weight
                with (parallel.collective("a training step") if sharded else contextlib.nullcontext()):
                    regime.step(sharded)  # (average,) unscale, clip, step, lr
                total += step_loss
                steps += 1
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss), index, first_bad)  # no sync
                if clock is not None and clock.due(sharded):
                    checkpoint(step_state(method, regime, epoch, index + 1, order, total, steps,
                                          best_accuracy, best_state))
                parallel.test_stop(f"{method.name}:{len(method.task_ranges) - 1}:{epoch}:{index + 1}")
            order = None
            if sharded:  # the epoch's loss over every rank's slices (equal slices: the mean of the means)
                total = parallel.average(total)
            self.epoch_stats = {"lr": regime.last_lr, **({"skipped_steps": regime.pop_skipped()}
                                                               if regime.scaler is not None else {})}
            mean = float(total) / max(steps, 1)  # one host sync per epoch, not per step
            self.nonfinite_step = None if math.isfinite(mean) else (int(first_bad) + 1 if first_bad >= 0 else None)
            try:
                on_epoch(epoch, mean)
            except BaseException:  # train.on_nan=stop (avcl.engine.runner) ends the task here
                if loader is not None:
                    loader.close()
                raise
            parallel.test_stop(f"{method.name}:{len(method.task_ranges) - 1}:{epoch}")
            if select_best:
                accuracy = self.fc_accuracy(method, val)
                on_val(epoch, accuracy)
                if accuracy > best_accuracy:
                    best_accuracy = accuracy
                    best_state = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
                method.model.train()
        if loader is not None:
            loader.close()
        if best_state is not None:
            method.model.load_state_dict(best_state)
        method.model.eval()
        method.after_task(task)
        return regime

    @torch.no_grad()
    def fc_accuracy(self, method: Method, samples: Samples) -> float:
        """Accuracy of the classifier head over all seen classes (FC even for NME methods:
        their class means are only computed after the task)."""
        method.model.eval()
        predict = lambda batch: Method.predict(method, batch)  # noqa: E731
        return float(correct_predictions(predict, samples, self.eval_batch_size, self.device, self.autocast).mean())

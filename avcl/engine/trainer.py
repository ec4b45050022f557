"""The one training loop every method runs through.

Per task: ``method.before_task`` -> epochs of mini-batches (new data, plus memory as the
method asks) -> ``method.after_task``. Hooks are per task, never per forward pass, so the
loop costs next to nothing over a hand-written one (benchmarks/engine_overhead.py).
Task data stays resident on the device and is batch-indexed.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from avcl.data.samples import Samples, batches, concat, num_samples, select, to_device
from avcl.engine import distributed
from avcl.errors import AvclError
from avcl.eval.evaluator import correct_predictions
from avcl.memory.buffer import ExemplarMemory
from avcl.methods.base import Method


def pick_device(name: str = "auto") -> torch.device:
    """The torch device ``train.device`` names ("auto": CUDA, else MPS, else CPU); AvclError if it is absent."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AvclError(f"train.device={name}, but CUDA is not available here (torch {torch.__version__}"
                            f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU visible'}): "
                            "use train.device=auto or cpu")
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if index >= torch.cuda.device_count():
            raise AvclError(f"train.device={name}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise AvclError("train.device=mps, but MPS is not available here: use train.device=auto or cpu")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_cpu_heap() -> bool:
    """Make glibc malloc serve every allocation from its heap and keep freed memory for reuse.

    By default glibc maps each large block (every activation of a big batch) fresh from the OS
    and unmaps it on free, so every op's output page-faults on first touch; on AV-CIL's
    (B, T, P, D) attention tensors that cost as much as the arithmetic (sys time ~ user time,
    and far more inside VMs). This is what a caching allocator (jemalloc, tcmalloc, CUDA's)
    avoids. Cost: the process keeps its peak heap until it exits. Linux with glibc only;
    returns whether it was applied (elsewhere malloc is left alone).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


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
        if cfg.model_selection not in ("last", "best_val"):
            raise AvclError(f"train.model_selection must be 'last' or 'best_val', got '{cfg.model_selection}'")
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
        sharded = distributed.current() is not None
        if sharded:  # the rank's own stream for its rows' augmentations (distributed.RankRandom)
            distributed.seed_rank_random(int(method.cfg.seed), len(method.task_ranges), self.device)
        for epoch in range(hp.epochs or cfg.epochs):
            total, steps = torch.zeros((), device=self.device), 0
            # several processes: this rank's slice of each global batch (avcl.engine.distributed)
            for batch, step in (distributed.shard_batches(data, cfg.batch_size) if sharded else
                                ((b, None) for b in batches(data, cfg.batch_size, shuffle=True))):
                if replay is not None:
                    pick = torch.randint(num_samples(replay), (cfg.replay_batch_size,))
                    if step is not None:
                        pick = distributed.slice_rows(pick, step)
                    batch = concat([batch, select(replay, pick.to(self.device))])
                with (distributed.collective("a training step") if sharded else contextlib.nullcontext()):
                    with self.autocast(), (distributed.step(step) if sharded else contextlib.nullcontext()):
                        loss = method.training_loss(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # several processes: gathered rows send their gradients back here
                    if sharded:
                        distributed.average_gradients(optimizer)
                optimizer.step()
                total += loss.detach()
                steps += 1
            if sharded:  # the epoch's loss over every rank's slices (equal slices: the mean of the means)
                total = distributed.average(total)
            on_epoch(epoch, float(total) / max(steps, 1))  # one host sync per epoch, not per step
            distributed.test_stop(f"{method.name}:{len(method.task_ranges) - 1}:{epoch}")
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

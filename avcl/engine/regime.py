"""The optimizer step around a method's loss (``train.*``): parameter groups, optimizer, lr schedule, gradient
clipping, accumulation and mixed precision, built from the config in this one place.

PyTorch's own pieces do the work: ``torch.optim.SGD/Adam/AdamW``, a ``torch.optim.lr_scheduler.LambdaLR`` whose
factor is the schedule's closed form (``lr_factor``), ``torch.nn.utils.clip_grad_norm_``, ``torch.amp.GradScaler``.

Parameter groups (``param_groups``), over the method's trainable parameters (``Method.named_parameters``):
- **no decay** (``train.no_decay``): fnmatch patterns on the parameter name; the word ``1d`` stands for every
  tensor of at most one dimension (biases, norm weights, scalars). The default is the MAE / STELLA / XKD codes'
  set: 1-D tensors, positional and modality embeddings, cls and mask tokens. ``[]``: decay every parameter (the
  AV-CIL code's ``Adam(model.parameters(), weight_decay=...)``).
- **layer-wise lr decay** (``train.layer_decay`` < 1, MAE's ``param_groups_lrd``): with L the number of blocks
  (``...blocks.<i>...`` in the names), a parameter of block i gets ``layer_decay ** (L - i)``, the embeddings
  (patch / positional / modality embeddings, cls and mask tokens) ``layer_decay ** (L + 1)``, the rest 1.
- **per-module lr** (``train.lr_multipliers``, {pattern: factor}): the first matching pattern's factor multiplies
  the lr (e.g. ``{"avm.*": 10}``).
Parameters with the same (decay, lr factor) share a group; then the method's ``param_groups(groups)`` hook may
change or add groups (the contract's one hook for it).

Schedule (``lr_factor``): a factor of the group's lr per optimizer step, from the position p in epochs
(``epoch + step / steps_per_epoch``, MAE's ``adjust_learning_rate`` position): linear warm-up from 0 over
``warmup_epochs`` (or ``warmup_steps``, converted with the task's steps per epoch), then ``constant`` (1),
``cosine`` (``m + (1 - m) (1 + cos(pi t)) / 2`` with t the fraction of the post-warm-up epochs done and
m = ``min_lr / lr``, so a group's floor is its own share of ``min_lr``, as MAE's), or ``step`` (``gamma`` per
milestone epoch passed). ``schedule_scope``: ``task`` runs the curve over each task's epochs; ``stream`` over all
tasks' (task t starts at p = t x epochs; a curve that each official code runs over its whole stream).

Accumulation (``train.accumulate`` = N): one optimizer step per N micro-batches of ``train.batch_size`` rows; each
micro-batch's loss is weighted by its share of the step's rows, so that a loss that is a mean over rows gives the
gradient of one batch N times larger. Several processes average gradients once per optimizer step.

Clipping (``train.clip_grad_norm``, ``train.clip_grad_per_param``) applies to the parameters ``train.clip_grad_params``
names (fnmatch patterns; none: all), after the gradients are averaged and unscaled.

Precision (``train.precision``): ``fp16`` autocast with a GradScaler (gradients unscaled before clipping; a step
with non-finite gradients is skipped and counted), ``bf16`` autocast (no scaler), ``fp32``; unset: bf16 on CUDA,
fp32 elsewhere. The scheduler and scaler states are in every checkpoint (``Regime.state_dict``).
"""
from __future__ import annotations

import fnmatch
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from avcl import parallel
from avcl.core.device import resolved_precision
from avcl.core.errors import AvclError

EMBEDDINGS = ("*patch_embed*", "*pos_embed*", "*cls_token*", "*cls_pos*", "*mask_token*", "*modality_embed*")
BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def precision_of(train_cfg, device: torch.device) -> str:
    """``train.precision``, unset: bf16 on CUDA, fp32 elsewhere (avcl.core.device, as the autocast reads it)."""
    return resolved_precision(train_cfg.precision, device)


def no_decay(name: str, p: torch.Tensor, patterns: Iterable[str]) -> bool:
    return any((pattern == "1d" and p.ndim <= 1) or (pattern != "1d" and fnmatch.fnmatchcase(name, pattern))
               for pattern in patterns)


def layer_scale(name: str, layers: int, decay: float) -> float:
    """MAE's ``param_groups_lrd`` factor of ``name`` in a model of ``layers`` blocks."""
    if decay == 1.0 or not layers:
        return 1.0
    block = BLOCK.search(name)
    if block:
        return decay ** (layers - int(block.group(1)))
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in EMBEDDINGS):
        return decay ** (layers + 1)
    return 1.0


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], train_cfg, lr: float) -> list[dict]:
    """The optimizer's parameter groups (module docstring); each group also carries ``name`` (for ``avcl show``)
    and ``lr_scale``."""
    named = [(n, p) for n, p in named if p.requires_grad]
    layers = 1 + max((int(m.group(1)) for m in map(BLOCK.search, (n for n, _ in named)) if m), default=-1)
    multipliers = dict(train_cfg.lr_multipliers or {})
    groups: dict[tuple, dict] = {}
    for name, p in named:
        decay = train_cfg.weight_decay if not no_decay(name, p, train_cfg.no_decay) else 0.0
        scale = layer_scale(name, layers, train_cfg.layer_decay)
        scale *= next((f for pattern, f in multipliers.items() if fnmatch.fnmatchcase(name, pattern)), 1.0)
        key = (decay, scale)
        if key not in groups:
            label = ("decay" if decay else "no decay") + (f", lr x{scale:.4g}" if scale != 1.0 else "")
            groups[key] = {"params": [], "names": [], "weight_decay": decay, "lr": lr * scale, "lr_scale": scale,
                           "name": label}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def make_optimizer(groups: list[dict], train_cfg, lr: float) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``groups`` (their own lr / weight_decay override the defaults)."""
    kind = train_cfg.optimizer
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=tuple(train_cfg.adam_betas), eps=train_cfg.adam_eps,
               weight_decay=train_cfg.weight_decay)


def lr_factor(position: float, train_cfg, total_epochs: float, warmup_epochs: float, lr: float) -> float:
    """The schedule's factor at ``position`` epochs of ``total_epochs`` (module docstring)."""
    if warmup_epochs > 0 and position < warmup_epochs:
        return position / warmup_epochs
    kind = train_cfg.schedule
    if kind == "cosine":
        floor = train_cfg.min_lr / lr
        done = (position - warmup_epochs) / max(total_epochs - warmup_epochs, 1e-12)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    if kind == "step":
        return train_cfg.gamma ** sum(position >= m for m in train_cfg.milestones)
    return 1.0


def drops_last(train_cfg, method) -> bool:
    """``train.drop_last``; unset: drop for label-free (pre-training) methods, as their official loaders do."""
    return method.label_free if train_cfg.drop_last is None else bool(train_cfg.drop_last)


def micro_batches(rows: int, batch_size: int, drop_last: bool) -> list[tuple[int, int]]:
    """(start, end) of each global micro-batch of an epoch of ``rows`` rows; the partial last one dropped when
    ``drop_last`` and at least one full batch exists (never an epoch without a step)."""
    end = rows - rows % batch_size if drop_last and rows >= batch_size else rows
    return [(s, min(s + batch_size, end)) for s in range(0, end, batch_size)]


def steps_per_epoch(rows: int, train_cfg, drop_last: bool) -> int:
    """Optimizer steps of an epoch of ``rows`` rows (``accumulate`` micro-batches per step)."""
    return math.ceil(len(micro_batches(rows, train_cfg.batch_size, drop_last)) / train_cfg.accumulate)


@dataclass
class Regime:
    """One method's optimizer, its schedule over the current task and its GradScaler (module docstring)."""
    optimizer: torch.optim.Optimizer
    train_cfg: object
    lr: float
    scaler: Optional[torch.amp.GradScaler] = None
    scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
    skipped: int = 0  # fp16 steps skipped by the scaler (non-finite gradients), since the last ``pop_skipped``
    last_lr: float = 0.0  # the base group's lr of the last step taken
    params: list = field(default_factory=list)  # what clipping applies to (``train.clip_grad_params``)

    @classmethod
    def build(cls, method, train_cfg, device: torch.device) -> "Regime":
        lr = method.hp.lr or train_cfg.lr
        groups = method.param_groups(param_groups(method.named_parameters(), train_cfg, lr))
        if not any(g["params"] for g in groups):
            raise AvclError(f"method '{method.name}' has no trainable parameter")
        optimizer = make_optimizer(groups, train_cfg, lr)
        scaler = torch.amp.GradScaler(device.type) if precision_of(train_cfg, device) == "fp16" else None
        clipped = [p for g in groups for name, p in zip(g.get("names", [None] * len(g["params"])), g["params"])
                   if not train_cfg.clip_grad_params or
                   any(fnmatch.fnmatchcase(name or "", pattern) for pattern in train_cfg.clip_grad_params)]
        return cls(optimizer, train_cfg, lr, scaler, params=clipped)

    def start_task(self, steps: int, epochs: int, task: int, tasks: int) -> None:
        """A fresh schedule for a task of ``epochs`` x ``steps`` optimizer steps, the ``task``-th of ``tasks``."""
        cfg, lr = self.train_cfg, self.lr
        warmup = cfg.warmup_epochs or cfg.warmup_steps / steps
        offset, total = (task * epochs, tasks * epochs) if cfg.schedule_scope == "stream" else (0, epochs)

        def curve(k: int) -> float:  # a plain function: the scheduler's state_dict keeps numbers only
            return lr_factor(offset + k / steps, cfg, total, warmup, lr)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, curve)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, sharded: bool) -> None:
        """Average (several processes), unscale, clip, step, update the scale, then the lr."""
        cfg, optimizer = self.train_cfg, self.optimizer
        if sharded:
            parallel.average_gradients(optimizer)
        if self.scaler is not None and (cfg.clip_grad_norm or cfg.clip_grad_per_param):
            self.scaler.unscale_(optimizer)
        if cfg.clip_grad_per_param:  # XKD / DINO's clip_gradients: each parameter's own norm
            for p in self.params:
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_(p, cfg.clip_grad_per_param)
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            self.skipped += int(self.scaler.get_scale() < scale)  # the scale drops exactly when the step was skipped
        else:
            optimizer.step()
        self.last_lr = self.current_lr()
        with warnings.catch_warnings():  # a skipped fp16 step still moves the curve (counted above): not a misuse
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
            self.scheduler.step()

    def current_lr(self) -> float:
        """The lr of the base group (factor 1) the next step uses (without its group's factor)."""
        group = next((g for g in self.optimizer.param_groups if g.get("lr_scale", 1.0) == 1.0),
                     self.optimizer.param_groups[0])
        return float(group["lr"]) / float(group.get("lr_scale", 1.0))

    def pop_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "skipped": self.skipped,
                "last_lr": self.last_lr}

    def load_state_dict(self, state: dict, schedule: bool = True) -> None:
        """The optimizer and scaler; the schedule too when ``schedule`` (a mid-task resume: the task's curve)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if schedule and self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])  # the groups' lr came back with the optimizer's
        self.skipped, self.last_lr = int(state.get("skipped", 0)), float(state.get("last_lr", 0.0))


def regime_lines(method, train_cfg, device: torch.device, rows: int, tasks: int) -> list[str]:
    """What ``avcl show`` prints of the resolved regime: the groups with their parameter counts, the effective
    batch, and the lr at a few points of the curve of a task of ``rows`` rows."""
    regime = Regime.build(method, train_cfg, device)
    cfg, lines = train_cfg, []
    opt = regime.optimizer
    detail = (f"momentum {cfg.momentum}" if cfg.optimizer == "sgd" else
              f"betas {list(cfg.adam_betas)}, eps {cfg.adam_eps}")
    lines.append(f"  optimizer: {cfg.optimizer} ({detail}), lr {regime.lr:g}, weight decay {cfg.weight_decay:g}")
    for g in opt.param_groups:
        count = sum(p.numel() for p in g["params"])
        lines.append(f"    group '{g['name']}': {len(g['params'])} tensors, {count:,} values, lr {g['lr']:.4g}, "
                     f"weight decay {g['weight_decay']:g}")
    steps = steps_per_epoch(rows, cfg, drops_last(cfg, method))
    epochs = method.hp.epochs or cfg.epochs
    regime.start_task(steps, epochs, 0, tasks)
    total = steps * epochs
    points = sorted({0, 1, total // 4, total // 2, (3 * total) // 4, total - 1})
    curve = regime.scheduler.lr_lambdas[0]
    lines.append(f"  schedule: {cfg.schedule} over each {cfg.schedule_scope}, warm-up "
                 f"{cfg.warmup_epochs or cfg.warmup_steps} {'epochs' if cfg.warmup_epochs else 'steps'}; task 0 "
                 f"({rows} rows, {steps} steps/epoch): " + ", ".join(f"step {k}: {regime.lr * curve(k):.3g}"
                                                                      for k in points))
    clip = [f"global norm {cfg.clip_grad_norm}" if cfg.clip_grad_norm else "",
            f"per parameter {cfg.clip_grad_per_param}" if cfg.clip_grad_per_param else ""]
    lines.append(f"  batch: {cfg.batch_size} x {cfg.accumulate} accumulated = {cfg.batch_size * cfg.accumulate} "
                 f"rows per step (+ replayed rows per micro-batch); precision {precision_of(cfg, device)}"
                 f"{' + GradScaler' if regime.scaler is not None else ''}; clipping: "
                 f"{', '.join(c for c in clip if c) or 'none'}")
    return lines


"""XKD: masked reconstruction + cross-modal knowledge distillation + domain alignment (paper and code ``pritamqu/XKD``).

Sarkar & Etemad, "XKD: Cross-modal Knowledge Distillation with Domain Alignment for Video Representation
Learning" (AAAI 2024, arXiv 2211.13929). Label-free; needs ``model.name=xkd`` (avcl/models/xkd.py: the
students, decoders, heads, EMA teachers and the loss terms; ``model.xkd.share`` selects XKD / XKD-MAS /
XKD-MATS, ``model.xkd.refine`` the refinement, ``model.xkd.teacher_view`` the code's or the paper's teacher view).

One step (``training_loss``):

1. the EMA update the previous optimizer step owes the teachers (teacher <- m teacher + (1 - m) student,
   m from the per-iteration cosine schedule ``momentum -> momentum_final`` of ``avcl.nn.ema.cosine_momentum``,
   evaluated at the previous step's index: the code updates right after each optimizer step; here the update
   happens before the next forward, and ``after_task`` applies the last step's);
2. ``replay`` (continual use, not in the paper): ``train.replay_batch_size`` clips drawn uniformly from a
   reservoir of ``memory.size`` raw clips join the batch (one shared mean), and the current clips are offered
   to the reservoir after the forward;
3. ``model.views`` (global + local views, fresh augmentation) and ``model.loss_terms``;
4. ``loss = (rec_weight * rec + kd_weight * kd + da_weight * da) / (rec_weight + kd_weight + da_weight)``
   (XKD's official code: (5 L_rec + 1 L_kd + 1 L_da) / 7). Terms with weight 0 are not computed (no teacher pass when
   both kd and da are off: the ``mae`` row).

The schedule's length is the stream's planned step count: at each task's start ``steps done + remaining
tasks x this task's steps`` (exact for the equal tasks of a class-incremental split and for one task).
The teacher temperatures warm up over ``model.xkd.teacher_temp_warmup`` of it.

The optimizer step is the run's (``train.*``, avcl.engine.regime); the XKD recipes set it to the code's
(``main_xkd.py``: AdamW (0.9, 0.95), weight decay 0.3 except biases and 1-D tensors, warm-up + cosine, each
parameter's gradient clipped at 0.3, fp16 with a GradScaler on GPUs).

Deviations (docs/xkd.md): the lr warm-up ramps ``k / n`` (the code's ``linspace(0, lr, n)``: one step sooner);
ablation rows normalise by the sum of their non-zero weights (the code's ablation normalisation is not
released); the reservoir keeps raw clips (re-augmented at replay; other label-free methods keep prepared
inputs) because XKD's views are drawn from the clip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from avcl.core.errors import AvclError
from avcl.methods import register
from avcl.methods.base import Hparams
from avcl.methods.replay_ssl import LabelFreeMethod, draw
from avcl.nn.ema import cosine_momentum


CLIP_FIELDS = ("audio", "video")


@dataclass
class XKDHparams(Hparams):
    rec_weight: float = 5.0  # XKD's official code: (5 L_rec + 1 L_kd + 1 L_da) / 7
    kd_weight: float = 1.0  # cross-modal distillation (DINO cross-entropy, teacher of the other modality)
    da_weight: float = 1.0  # domain alignment (MMD between the audio and video outputs)
    momentum: float = 0.997  # EMA teachers: cosine schedule from this ...
    momentum_final: float = 1.0  # ... to this at the last step
    replay: bool = False  # continual use: replay clips from a reservoir of memory.size (train.replay_batch_size per step)

    def check(self, prefix: str) -> None:
        weights = (self.rec_weight, self.kd_weight, self.da_weight)
        if sum(weights) <= 0:
            raise AvclError(f"{prefix}: rec_weight, kd_weight, da_weight must be >= 0 and not all 0, got {weights}")
        if not 0 <= self.momentum <= self.momentum_final <= 1:
            raise AvclError(f"{prefix}: need 0 <= momentum ({self.momentum}) <= momentum_final "
                            f"({self.momentum_final}) <= 1")


@register
class XKD(LabelFreeMethod):
    name = "xkd"
    description = "XKD: MAE + cross-modal distillation from EMA teachers + MMD alignment (model.name=xkd; label-free)"
    Hparams = XKDHparams
    requires_model = "xkd"

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        self.step = 0  # optimizer steps taken over the stream
        self.total_steps = 0  # the schedule's length (planned at each task's start)
        self.ema_pending = False  # the last step's teacher update is still owed

    @property
    def uses_teachers(self) -> bool:
        return self.hp.kd_weight > 0 or self.hp.da_weight > 0

    def before_task(self, task):
        super().before_task(task)
        clips = len(next(iter(task.train.values())))
        steps = (self.hp.epochs or self.cfg.train.epochs) * math.ceil(clips / self.cfg.train.batch_size)
        remaining = max(self.cfg.scenario.num_tasks - (len(self.task_ranges) - 1), 1)
        self.total_steps = self.step + remaining * steps

    def momentum_at(self, step: int) -> float:
        return cosine_momentum(step, self.total_steps, self.hp.momentum, self.hp.momentum_final)

    def settle_teachers(self) -> None:
        """The EMA update owed by the last optimizer step (its index: self.step - 1)."""
        if self.ema_pending and self.uses_teachers:
            self.model.update_teachers(self.momentum_at(self.step - 1))
        self.ema_pending = False

    def training_loss(self, batch):
        self.settle_teachers()
        clips = {key: batch[key] for key in CLIP_FIELDS}
        current = clips
        if self.hp.replay:
            _, rows = draw(self.memory, self.cfg.train.replay_batch_size)
            if rows is not None:
                clips = {key: torch.cat([value, rows[key].to(value.dtype)]) for key, value in clips.items()}
        hp = self.hp
        with torch.no_grad():
            views = self.model.views(clips, train=True)
        progress = self.step / max(self.total_steps, 1)
        terms = self.model.loss_terms(views, progress, kd=hp.kd_weight > 0, da=hp.da_weight > 0)
        loss = hp.rec_weight * terms["rec"]
        if hp.kd_weight > 0:
            loss = loss + hp.kd_weight * terms["kd"]
        if hp.da_weight > 0:
            loss = loss + hp.da_weight * terms["da"]
        loss = loss / (hp.rec_weight + hp.kd_weight + hp.da_weight)
        if hp.replay:
            self.memory.add(current)
        self.step += 1
        self.ema_pending = True
        self.log_terms(**terms)  # loss/rec, loss/kd, loss/da, ... in epochs.csv (and TensorBoard)
        self.last_terms = {key: value.detach() for key, value in terms.items()}  # this step's, for inspection
        return loss

    def after_task(self, task):
        self.settle_teachers()
        super().after_task(task)

    def state_dict(self) -> dict:
        # ema_pending: a mid-task checkpoint falls between a step and the teacher update it owes
        return {**super().state_dict(), "step": self.step, "total_steps": self.total_steps,
                "ema_pending": self.ema_pending}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.step, self.total_steps = int(state["step"]), int(state["total_steps"])
        self.ema_pending = bool(state.get("ema_pending", False))

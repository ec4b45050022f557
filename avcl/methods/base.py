"""The learner contract every method implements (Mammoth-style: one small file per method).

The engine calls, per task: ``before_task`` -> many ``training_loss`` steps -> ``after_task``,
then evaluates with ``predict``. A method declares its hyperparameters as a dataclass
(``Hparams``), which becomes the config section ``method_args.<name>`` (each field ends with a
``# comment``: its one-line description, which ``avcl show`` prints; ranges and choices sit on the
field, ``avcl.core.options``), and says how it uses memory with one value, ``memory_use``
(``MemoryUse``: kind, selection, replay). Besides:

* ``requires_model``: the ``model.name`` the method needs, if any (AV-CIL's, HAD's);
* ``single_task``: train once on the union of all tasks (multitask upper bound), evaluate after it.

Label-free models (``model.label_free``: the self-supervised encoders) have no classifier head
and never see labels: the trainer removes ``label`` from their batches; an exemplar memory becomes
a reservoir on them (``MemoryUse.on``). Batches carry a boolean ``from_memory`` field telling
replayed samples apart.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.core.samples import Samples
from avcl.memory import sharding
from avcl.memory.buffer import SELECTIONS, ExemplarMemory
from avcl.memory.reservoir import ReservoirBuffer
from avcl.models import AVNet
from avcl.parallel import eval_pass


MEMORY_KINDS = (None, "exemplars", "all", "reservoir")
REPLAYS = ("merge", "separate", "step")


@dataclass(frozen=True)
class MemoryUse:
    """How a method uses memory, declared once on its class.

    * ``kind``: None (no memory); "exemplars" (``memory.size`` exemplars shared equally by the classes
      seen, chosen after each task); "all" (every sample: the joint upper bound); "reservoir" (a task-free
      reservoir of ``memory.size`` rows that the method fills and draws from step by step);
    * ``selection``: how exemplars are chosen: "random" or "herding";
    * ``replay``: how memory joins training: "merge" (one dataset with the new task's data), "separate"
      (each batch of new data gets ``train.replay_batch_size`` memory samples) or "step" (the method
      draws from its reservoir inside ``training_loss``; the trainer does nothing).
    """
    kind: Optional[str] = None
    selection: str = "random"
    replay: str = "merge"

    def __post_init__(self):
        if self.kind not in MEMORY_KINDS or self.selection not in SELECTIONS or self.replay not in REPLAYS:
            raise ValueError(f"MemoryUse: kind must be one of {MEMORY_KINDS}, selection one of {SELECTIONS}, "
                             f"replay one of {REPLAYS}; got {self}")

    def on(self, label_free: bool) -> "MemoryUse":
        """What this memory is on a model: on a label-free one, exemplars (class-balanced, so they need labels)
        become a reservoir of ``memory.size`` rows the method replays itself (the label-free form of ER,
        DER++, ... of the STELLA code's ``models/cl_methods/``); any other memory is as declared."""
        return MemoryUse("reservoir", replay="step") if label_free and self.kind == "exemplars" else self


@dataclass
class Hparams:
    epochs: Optional[int] = option(None, range=">=1")  # overrides train.epochs for this method
    lr: Optional[float] = option(None, range=">0")  # overrides train.lr for this method

    def check(self, prefix: str) -> None:
        """Constraints between fields that no field's own rule can say (AvclError naming ``prefix``, the
        section: ``method_args.<method>``); ``avcl.config.validate`` calls it for every method and variant."""


class Method(ABC):
    name = "base"
    description = ""
    Hparams = Hparams
    memory_use = MemoryUse()
    requires_model: Optional[str] = None  # a model.name the method needs (None: any model)
    single_task = False  # True: one task made of every task's data (multitask upper bound)

    def __init__(self, model: AVNet, hparams: Hparams, cfg):
        self.check_model(getattr(type(model), "model_name", type(model).__name__))
        self.model, self.hp, self.cfg = model, hparams, cfg
        self.task_ranges: list[tuple[int, int]] = []  # [start, end) labels of each task seen
        self.old_model: Optional[AVNet] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None  # set by the trainer (virtual steps read it)
        self.label_free = bool(getattr(model, "label_free", False))
        self.memory_use = type(self).memory_use.on(self.label_free)  # this model's form of the declared memory
        kind = self.memory_use.kind
        if kind == "reservoir":
            # several processes: one reservoir per rank with its share of the slots (avcl.memory.sharding)
            self.memory = ReservoirBuffer(sharding.memory_share(cfg.memory.size), seed=sharding.memory_seed(cfg.seed))
        else:
            budget = cfg.memory.size if kind == "exemplars" else None
            self.memory = ExemplarMemory(budget, self.memory_use.selection) if kind else None

    @property
    def replay(self) -> str:
        """How memory joins training on this model: ``memory_use.replay`` (merge, separate or step)."""
        return self.memory_use.replay

    @classmethod
    def check_model(cls, model_name: str) -> None:
        """Refuse a model this method cannot train (``requires_model``): when the config is built, for every
        method and variant, and again when a method is built on a model."""
        if cls.requires_model and model_name != cls.requires_model:
            raise AvclError(f"method '{cls.name}' needs model.name={cls.requires_model}, got model.name={model_name} "
                            f"(in the recipe, or for one row: variants: {{my-{cls.name}: {{method: {cls.name}, "
                            f"model: {{name: {cls.requires_model}}}}}}})")

    # ----- class bookkeeping -------------------------------------------------------------
    @property
    def seen_classes(self) -> int:
        return self.task_ranges[-1][1] if self.task_ranges else 0

    @property
    def old_classes(self) -> int:
        """Classes of the tasks before the current one."""
        return self.task_ranges[-1][0] if self.task_ranges else 0

    # ----- hooks ---------------------------------------------------------------------------
    def before_task(self, task) -> None:
        """Grow the classifier for the task's classes; keep a frozen copy of the model so far."""
        self.old_model = self.frozen_copy() if self.task_ranges and not self.label_free else None
        self.task_ranges.append((self.seen_classes, self.seen_classes + len(task.classes)))
        if not self.label_free:
            self.model.head.grow(self.seen_classes)

    def training_data(self, data: Samples, replay: Optional[Samples]) -> tuple[Samples, Optional[Samples]]:
        """The step's training data and separate replay memory, as the batches will be cut from them.

        Called once per task after ``before_task`` (no grad, under the trainer's autocast); a
        method may add per-sample fields that stay fixed for the task (e.g. cached teacher outputs).
        """
        return data, replay

    @abstractmethod
    def training_loss(self, batch: Samples) -> torch.Tensor:
        """The loss of one training batch (the engine does backward and the optimizer step)."""

    def after_task(self, task) -> None:
        """Store exemplars of the task just learned (methods with an exemplar memory)."""
        if isinstance(self.memory, ExemplarMemory):
            self.memory.update(task.train, embed=self.embed_features)

    @torch.no_grad()
    def predict(self, batch: Samples) -> torch.Tensor:
        """Scores over all seen classes (no task id): argmax is the prediction."""
        return self.model(batch)["logits"][:, :self.seen_classes]

    def extra_heads(self) -> dict:
        """Other evaluation heads, name -> predict function (e.g. iCaRL's FC besides NME)."""
        return {}

    # ----- loss terms for the logs ----------------------------------------------------------
    def log_terms(self, **terms: torch.Tensor) -> None:
        """Report named terms of this step's loss (e.g. ``ce=..., kd=...``): their means per epoch go
        to ``<method>/epochs.csv`` (and TensorBoard) as ``loss/<name>``. Kept on the device, no host sync;
        folded into a sum every 1024 steps, so memory stays bounded when nobody reads them."""
        kept = self.__dict__.setdefault("_terms", {})
        for key, value in terms.items():
            value = value.detach()
            entry = kept.setdefault(key, [None, 0, []])  # [sum of folded steps, their count, pending values]
            entry[2].append(value if value.dim() == 0 else value.mean())
            if len(entry[2]) >= 1024:
                folded = torch.stack(entry[2]).float().sum()
                entry[0] = folded if entry[0] is None else entry[0] + folded
                entry[1], entry[2] = entry[1] + len(entry[2]), []

    def pop_terms(self) -> dict[str, float]:
        """The mean of each term reported since the last call (one host sync per term), then reset."""
        means = {}
        for key, (total, count, pending) in self.__dict__.pop("_terms", {}).items():
            if pending:
                folded = torch.stack(pending).float().sum()
                total, count = folded if total is None else total + folded, count + len(pending)
            means[key] = float(total) / count
        return means

    # ----- state (checkpointed after every task) ------------------------------------------
    def state_dict(self) -> dict:
        return {"task_ranges": self.task_ranges,
                "memory": self.memory.state_dict() if self.memory is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.task_ranges = [tuple(r) for r in state["task_ranges"]]
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])

    # ----- helpers for subclasses ---------------------------------------------------------
    def named_parameters(self):
        """What the optimizer trains (the trainable ones of these; avcl.engine.regime groups them by name)."""
        return self.model.named_parameters()

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def param_groups(self, groups: list[dict]) -> list[dict]:
        """The optimizer's parameter groups as ``train.*`` built them (torch param-group dicts, each with
        ``params``, ``names``, ``lr``, ``weight_decay``, ``name``): change or add groups here (e.g. a module with
        its own lr). Default: unchanged."""
        return groups

    def frozen_copy(self) -> AVNet:
        old = copy.deepcopy(self.model).eval()
        for p in old.parameters():
            p.requires_grad_(False)
        return old

    @torch.no_grad()
    def old_outputs(self, batch: Samples) -> dict[str, torch.Tensor]:
        return self.old_model(batch)

    @torch.no_grad()
    def embed_features(self, samples: Samples) -> torch.Tensor:
        """Fused features of ``samples`` in eval mode, batched (several processes: sharded like evaluation)."""
        was_training = self.model.training
        self.model.eval()
        feats = eval_pass(lambda b: self.model.embed(b)["features"].float(), samples, self.cfg.eval.batch_size)
        self.model.train(was_training)
        return feats

    def replicated_state(self) -> list:
        """What every rank must hold alike after a task (compared by ``parallel.check_replicas``): the model's
        weights and an exemplar memory. A reservoir is per rank by design (``avcl.memory.sharding``)."""
        return [self.model.state_dict()] + ([self.memory.samples] if isinstance(self.memory, ExemplarMemory) else [])


def reset_parameters(module: nn.Module) -> None:
    for layer in module.modules():
        if layer is not module and hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


"""LwF (Li & Hoiem, 2016) for class-incremental learning, no memory.

Loss on the current task's data: a cross-entropy term plus ``alpha`` x knowledge distillation
(temperature ``temperature``) from the previous model's old-class logits. Two choices, each
switchable, because implementations differ:

* ``ce``: "new" (default) = CE over the new task's logits only, with the label shifted into
  that range, as AV-CIL's LwF baseline does; "all" = CE over all seen classes (FACIL, PyCIL).
* ``kd``: "taskwise" (default) = one softmax per old task (SS-IL's task-wise KD, as AV-CIL's
  LwF); "global" = one softmax over all old classes (FACIL, PyCIL).

Deviation from the paper, which has a head per task: one shared, growing head.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from avcl.core.options import option
from avcl.methods import register
from avcl.methods.base import Hparams, Method
from avcl.nn.cl_losses import distillation_kl, taskwise_kd


@dataclass
class LwFHparams(Hparams):
    alpha: float = 1.0  # weight of the distillation term
    temperature: float = option(2.0, range=">0")  # T of the distillation softmax
    ce: str = option("new", choices=("new", "all"))  # CE over: new (the task's classes, AV-CIL) | all (all seen classes: FACIL, PyCIL)
    kd: str = option("taskwise", choices=("taskwise", "global"))  # KD softmax: taskwise (one per old task, AV-CIL) | global (over all old classes)


@register
class LwF(Method):
    name = "lwf"
    description = "Learning without Forgetting: logit distillation from the previous model, no memory"
    Hparams = LwFHparams

    def training_loss(self, batch):
        logits, labels = self.model(batch)["logits"], batch["label"]
        if self.old_model is None:
            loss = F.cross_entropy(logits, labels)
            self.log_terms(ce=loss)
            return loss
        old_count = self.old_classes
        if self.hp.ce == "new":
            loss = F.cross_entropy(logits[:, old_count:], labels - old_count)
        else:
            loss = F.cross_entropy(logits, labels)
        old = self.old_outputs(batch)["logits"]
        if self.hp.kd == "taskwise":
            kd = taskwise_kd(logits, old, self.task_ranges[:-1], self.hp.temperature)
        else:
            kd = distillation_kl(logits[:, :old_count], old, self.hp.temperature)
        self.log_terms(ce=loss, kd=kd)
        return loss + self.hp.alpha * kd

"""SS-IL (Ahn et al., ICCV 2021): separated softmax + task-wise knowledge distillation.

As specified in AV-CIL's code (specs/supervised_methods.md 1.5 items 1-2), at tasks >= 1:

* separated-softmax CE: new samples over the new-class logits only (target y - C_old),
  replayed samples over the old-class logits only; L_SS = (B_n CE_new + B_e CE_old) / B;
* task-wise KD on all samples: one softmax per old task, T = ``temperature``, weight ``kd_weight``.

Task 0: plain CE. Memory: random exemplars, replayed as a separate batch each step.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avcl.methods import register
from avcl.methods.base import Hparams, Method, taskwise_kd


@dataclass
class SSILHparams(Hparams):
    temperature: float = 2.0  # T of the task-wise KD
    kd_weight: float = 1.0  # weight of the task-wise KD


def separated_softmax_ce(logits: torch.Tensor, labels: torch.Tensor, from_memory: torch.Tensor,
                         old_classes: int) -> torch.Tensor:
    """(B_n CE over new logits + B_e CE over old logits) / B."""
    new, old = ~from_memory, from_memory
    total = logits.new_zeros(())
    if new.any():
        total = total + F.cross_entropy(logits[new, old_classes:], labels[new] - old_classes,
                                        reduction="sum")
    if old.any():
        total = total + F.cross_entropy(logits[old, :old_classes], labels[old], reduction="sum")
    return total / len(labels)


@register
class SSIL(Method):
    name = "ssil"
    description = "SS-IL: separated softmax and task-wise distillation with replay"
    Hparams = SSILHparams
    memory_budget = "config"
    selection = "random"
    replay = "separate"

    def training_loss(self, batch):
        logits = self.model(batch)["logits"]
        if self.old_model is None:
            return F.cross_entropy(logits, batch["label"])
        loss = separated_softmax_ce(logits, batch["label"], batch["from_memory"], self.old_classes)
        old = self.old_outputs(batch)["logits"]
        kd = taskwise_kd(logits, old, self.task_ranges[:-1], self.hp.temperature)
        self.log_terms(separated_ce=loss, kd=kd)
        return loss + self.hp.kd_weight * kd

"""SS-IL (Ahn et al., ICCV 2021): separated softmax + task-wise knowledge distillation.

As specified in AV-CIL's code (``ours/train_incremental_ours.py``), at tasks >= 1:

* separated-softmax CE: new samples over the new-class logits only (target y - C_old),
  replayed samples over the old-class logits only; L_SS = (B_n CE_new + B_e CE_old) / B;
* task-wise KD on all samples: one softmax per old task, T = ``temperature``, weight ``kd_weight``.

Task 0: plain CE. Memory: random exemplars, replayed as a separate batch each step.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from avcl.core.options import option
from avcl.methods import register
from avcl.methods.base import Hparams, MemoryUse, Method
from avcl.nn.cl_losses import separated_softmax_ce, taskwise_kd


@dataclass
class SSILHparams(Hparams):
    temperature: float = option(2.0, range=">0")  # T of the task-wise KD
    kd_weight: float = 1.0  # weight of the task-wise KD


@register
class SSIL(Method):
    name = "ssil"
    description = "SS-IL: separated softmax and task-wise distillation with replay"
    Hparams = SSILHparams
    memory_use = MemoryUse("exemplars", replay="separate")

    def training_loss(self, batch):
        logits = self.model(batch)["logits"]
        if self.old_model is None:
            return F.cross_entropy(logits, batch["label"])
        loss = separated_softmax_ce(logits, batch["label"], batch["from_memory"], self.old_classes)
        old = self.old_outputs(batch)["logits"]
        kd = taskwise_kd(logits, old, self.task_ranges[:-1], self.hp.temperature)
        self.log_terms(separated_ce=loss, kd=kd)
        return loss + self.hp.kd_weight * kd

"""LwF (Li & Hoiem, 2016) for class-incremental learning, no memory.

Cross-entropy over all seen classes on the current data, plus knowledge distillation
(temperature ``temperature``, weight ``alpha``) from the previous model's old-class logits.
Deviation from the paper (which has task heads): one shared head, KD over its old rows,
as in FACIL's and PyCIL's class-incremental LwF.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from avcl.methods import register
from avcl.methods.base import Hparams, Method, distillation_kl


@dataclass
class LwFHparams(Hparams):
    alpha: float = 1.0
    temperature: float = 2.0


@register
class LwF(Method):
    name = "lwf"
    description = "Learning without Forgetting: logit distillation from the previous model, no memory"
    Hparams = LwFHparams

    def training_loss(self, batch):
        logits = self.model(batch)["logits"]
        loss = F.cross_entropy(logits, batch["label"])
        if self.old_model is not None:
            old = self.old_outputs(batch)["logits"]
            loss = loss + self.hp.alpha * distillation_kl(logits[:, :self.old_classes], old, self.hp.temperature)
        return loss

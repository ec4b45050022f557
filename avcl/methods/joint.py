"""Joint training (upper bound): at every task, train on all the data of all tasks so far.

The learner keeps every sample it has seen (an unlimited memory), so the scenario contract
(current task + own memory) still holds. ``reinit`` restarts from a fresh model at every
task, as AV-CIL's upper bound does; by default training continues from the previous task.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from avcl.methods import register
from avcl.methods.base import Hparams, MemoryUse, Method, reset_parameters


@dataclass
class JointHparams(Hparams):
    reinit: bool = False  # re-initialise the whole model at the start of every task


@register
class Joint(Method):
    name = "joint"
    description = "joint training on all data seen so far (upper bound)"
    Hparams = JointHparams
    memory_use = MemoryUse("all")

    def before_task(self, task):
        super().before_task(task)
        self.old_model = None  # no teacher needed
        if self.hp.reinit:
            reset_parameters(self.model)

    def training_loss(self, batch):
        return F.cross_entropy(self.model(batch)["logits"], batch["label"])

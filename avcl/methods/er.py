"""Experience replay: every batch of new data is joined by a random batch from memory.

Memory: ``memory.size`` exemplars, random selection, equal quota per class.
Loss: cross-entropy over all seen classes on the joined batch.
"""
import torch.nn.functional as F

from avcl.methods import register
from avcl.methods.base import Method


@register
class ER(Method):
    name = "er"
    description = "experience replay with a class-balanced random exemplar memory"
    memory_budget = "config"
    selection = "random"
    replay = "separate"

    def training_loss(self, batch):
        return F.cross_entropy(self.model(batch)["logits"], batch["label"])

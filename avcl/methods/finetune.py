"""Fine-tuning: cross-entropy over all seen classes on the current task only (lower bound)."""
import torch.nn.functional as F

from avcl.methods import register
from avcl.methods.base import Method


@register
class Finetune(Method):
    name = "finetune"
    description = "fine-tuning on each task in turn, no memory, no distillation (lower bound)"

    def training_loss(self, batch):
        return F.cross_entropy(self.model(batch)["logits"], batch["label"])

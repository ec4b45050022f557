"""Fine-tuning (lower bound): train on each task in turn, no memory, no distillation.

Classifier models: cross-entropy over all seen classes on the current task only.
Label-free models (the STELLA code's ``Finetune``, ``finetune.py``): the CAV-MAE loss of the current batch,
``model.ssl_loss(model.prepare(batch, train=True))["loss"]``. No deviation from the STELLA code (the
STELLA yaml's ``alpha: 1.0`` is unused there and has no counterpart here).
"""
import torch.nn.functional as F

from avcl.methods import register
from avcl.methods.base import Method
from avcl.methods.replay_ssl import logged_ssl_loss, prepare_current


@register
class Finetune(Method):
    name = "finetune"
    description = "fine-tuning on each task in turn, no memory, no distillation (lower bound)"

    def training_loss(self, batch):
        if self.label_free:
            return logged_ssl_loss(self, prepare_current(self.model, batch))["loss"]
        return F.cross_entropy(self.model(batch)["logits"], batch["label"])

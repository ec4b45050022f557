"""Experience replay: every batch of new data is joined by a random batch from memory.

Classifier models: ``memory.size`` exemplars, random selection, equal quota per class; the
trainer joins ``train.replay_batch_size`` of them to each batch; cross-entropy over all seen
classes on the joined batch.

Label-free models (the STELLA code's ``models/cl_methods/er.py``, commit a20a5ea):
the base class gives this method a task-free
reservoir of ``memory.size`` prepared rows instead (replay "step": the trainer does no replay).
Per step: draw ``train.replay_batch_size`` stored rows uniformly (none while the memory is
empty), one CAV-MAE forward on [current; replay] (one shared mean, as the STELLA code's ``models/cav.py`` loss),
then offer the
current rows to the reservoir. As the STELLA code, one reservoir per process (rank), each with
``memory.size`` / W slots (``avcl.memory.sharding``). Deviation: it stores prepared inputs on the
training device in their own dtype (the code: float32 arrays on the CPU).
"""
import torch.nn.functional as F

from avcl.methods import register
from avcl.methods.base import MemoryUse, Method
from avcl.methods.replay_ssl import draw, joined, logged_ssl_loss, prepare_current


@register
class ER(Method):
    name = "er"
    description = "experience replay with a class-balanced random exemplar memory (reservoir when label-free)"
    memory_use = MemoryUse("exemplars", replay="separate")

    def training_loss(self, batch):
        if not self.label_free:
            return F.cross_entropy(self.model(batch)["logits"], batch["label"])
        x = prepare_current(self.model, batch)
        _, replay = draw(self.memory, self.cfg.train.replay_batch_size)
        loss = logged_ssl_loss(self, joined(x, replay))["loss"]
        self.memory.add(x)
        return loss

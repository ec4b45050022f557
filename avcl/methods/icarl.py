"""iCaRL (Rebuffi et al., CVPR 2017): herding exemplars, distillation, nearest-mean classifier.

* Memory: ``memory.size`` exemplars chosen by herding on L2-normalised fused features,
  merged with the new task's data for training.
* Loss: CE over all seen classes + ``kd_weight`` x BCE between the new model's old-class
  logits and the previous model's sigmoid outputs (iCaRL's distillation). Deviation from the
  paper: CE instead of per-class BCE for the classification term (as AV-CIL's and PyCIL's
  iCaRL do; AV-CIL's double sigmoid is not reproduced).
* Evaluation: ``classifier`` = "nme" (nearest mean of exemplars, iCaRL's) or "fc"; the other
  head is reported too (``heads`` in metrics.json).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avcl.core.errors import AvclError
from avcl.methods import register
from avcl.methods.base import Hparams, MemoryUse, Method


def exemplar_means(method: Method) -> torch.Tensor:
    """iCaRL's class means: per seen class, the L2-normalised mean of its exemplars' L2-normalised
    fused features (``method.memory``, embedded by the current model)."""
    features = F.normalize(method.embed_features(method.memory.samples), dim=1)
    labels = method.memory.samples["label"]
    means = torch.zeros(method.seen_classes, features.shape[1], device=features.device)
    means.index_add_(0, labels, features)
    return F.normalize(means, dim=1)


@torch.no_grad()
def nearest_mean_scores(model, batch, class_means: torch.Tensor) -> torch.Tensor:
    """NME scores: minus the distance of the L2-normalised features to each class mean."""
    features = F.normalize(model.embed(batch)["features"].float(), dim=1)
    return -torch.cdist(features, class_means)


class NearestMeanHead:
    """Mixin for methods with iCaRL's NME classifier next to the model's own head (``own_head``).

    ``hp.classifier`` ("nme" or ``own_head``) picks the reported head; the other is reported
    too (``extra_heads``). Class means are recomputed from the memory after every task.
    """
    own_head = "fc"

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        if hparams.classifier not in ("nme", self.own_head):
            raise AvclError(f"method_args.{self.name}.classifier must be 'nme' or '{self.own_head}', "
                            f"got '{hparams.classifier}'")
        self.class_means = torch.empty(0)

    def after_task(self, task):
        super().after_task(task)
        self.class_means = exemplar_means(self)

    def predict_nme(self, batch):
        return nearest_mean_scores(self.model, batch, self.class_means)

    @torch.no_grad()
    def predict_own(self, batch):
        return Method.predict(self, batch)

    def predict(self, batch):
        return self.predict_nme(batch) if self.hp.classifier == "nme" else self.predict_own(batch)

    def extra_heads(self):
        return {self.own_head: self.predict_own} if self.hp.classifier == "nme" else {"nme": self.predict_nme}

    def state_dict(self):
        return {**super().state_dict(), "class_means": self.class_means}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.class_means = state["class_means"]


@dataclass
class ICaRLHparams(Hparams):
    kd_weight: float = 1.0  # weight of the BCE distillation on old-class logits
    classifier: str = "nme"  # the reported head: nme (nearest mean of exemplars) | fc (the other is in heads)


@register
class ICaRL(NearestMeanHead, Method):
    name = "icarl"
    description = "iCaRL: herding exemplars, sigmoid distillation, nearest-mean-of-exemplars classifier"
    Hparams = ICaRLHparams
    memory_use = MemoryUse("exemplars", selection="herding")
    own_head = "fc"

    def training_loss(self, batch):
        logits = self.model(batch)["logits"]
        loss = F.cross_entropy(logits, batch["label"])
        self.log_terms(ce=loss)
        if self.old_model is not None:
            target = torch.sigmoid(self.old_outputs(batch)["logits"].float())
            kd = F.binary_cross_entropy_with_logits(logits[:, :self.old_classes].float(), target)
            self.log_terms(kd=kd)
            loss = loss + self.hp.kd_weight * kd
        return loss

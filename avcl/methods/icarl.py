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

from avcl.errors import AvclError
from avcl.methods import register
from avcl.methods.base import Hparams, Method


@dataclass
class ICaRLHparams(Hparams):
    kd_weight: float = 1.0
    classifier: str = "nme"  # nme | fc


@register
class ICaRL(Method):
    name = "icarl"
    description = "iCaRL: herding exemplars, sigmoid distillation, nearest-mean-of-exemplars classifier"
    Hparams = ICaRLHparams
    memory_budget = "config"
    selection = "herding"
    replay = "merge"

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        if hparams.classifier not in ("nme", "fc"):
            raise AvclError(f"method_args.icarl.classifier must be 'nme' or 'fc', got '{hparams.classifier}'")
        self.class_means = torch.empty(0)

    def training_loss(self, batch):
        logits = self.model(batch)["logits"]
        loss = F.cross_entropy(logits, batch["label"])
        if self.old_model is not None:
            target = torch.sigmoid(self.old_outputs(batch)["logits"].float())
            loss = loss + self.hp.kd_weight * F.binary_cross_entropy_with_logits(
                logits[:, :self.old_classes].float(), target)
        return loss

    def after_task(self, task):
        super().after_task(task)
        features = F.normalize(self.embed_features(self.memory.samples), dim=1)
        labels = self.memory.samples["label"]
        means = torch.zeros(self.seen_classes, features.shape[1], device=features.device)
        means.index_add_(0, labels, features)
        self.class_means = F.normalize(means, dim=1)

    @torch.no_grad()
    def predict_nme(self, batch):
        features = F.normalize(self.model.embed(batch)["features"].float(), dim=1)
        return -torch.cdist(features, self.class_means)

    @torch.no_grad()
    def predict_fc(self, batch):
        return super().predict(batch)

    def predict(self, batch):
        return self.predict_nme(batch) if self.hp.classifier == "nme" else self.predict_fc(batch)

    def extra_heads(self):
        return {"fc": self.predict_fc} if self.hp.classifier == "nme" else {"nme": self.predict_nme}

    def state_dict(self):
        return {**super().state_dict(), "class_means": self.class_means}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.class_means = state["class_means"]

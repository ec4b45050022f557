"""EWC (Kirkpatrick et al., 2017): a quadratic penalty keeping important weights in place.

After each task the diagonal empirical Fisher information is estimated from the task's
training data and merged into a running estimate, F <- gamma * F + F_task (``gamma`` = 1:
one penalty summing all tasks; < 1: online EWC). Loss: CE over all seen classes +
(lambda / 2) * sum_i F_i (theta_i - theta*_i)^2 over the parameters that existed before.
Deviation: the Fisher uses squared gradients of mini-batch mean losses (times the batch
size) rather than per-sample gradients, as FACIL does, for speed.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avcl.core.options import option
from avcl.core.samples import batches
from avcl.methods import register
from avcl.methods.base import Hparams, Method


@dataclass
class EWCHparams(Hparams):
    ewc_lambda: float = 5000.0  # lambda: weight of the Fisher penalty (x 1/2)
    gamma: float = option(1.0, range="[0,1]")  # Fisher decay per task: 1 = sum over tasks, < 1 = online EWC
    fisher_batch_size: int = option(32, range=">=1")  # mini-batch size of the Fisher estimate after a task


def _overlap(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly grown) parameter that existed when ``reference`` was saved."""
    return current[tuple(slice(0, size) for size in reference.shape)]


@register
class EWC(Method):
    name = "ewc"
    description = "Elastic Weight Consolidation: Fisher-weighted penalty on weight changes, no memory"
    Hparams = EWCHparams

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def training_loss(self, batch):
        loss = F.cross_entropy(self.model(batch)["logits"], batch["label"])
        if self.fisher:
            penalty = sum((self.fisher[n] * (_overlap(p, self.anchor[n]) - self.anchor[n]) ** 2).sum()
                          for n, p in self.model.named_parameters() if n in self.fisher)
            self.log_terms(ce=loss, penalty=penalty)
            loss = loss + 0.5 * self.hp.ewc_lambda * penalty
        return loss

    def after_task(self, task):
        super().after_task(task)
        fisher = {n: torch.zeros_like(p) for n, p in self.model.named_parameters()}
        self.model.eval()  # deterministic forward passes for the estimate
        count = 0
        for batch in batches(task.train, self.hp.fisher_batch_size):
            self.model.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(batch)["logits"], batch["label"]).backward()
            n = len(batch["label"])
            for name, p in self.model.named_parameters():
                if p.grad is not None:
                    fisher[name] += p.grad.detach() ** 2 * n
            count += n
        self.model.zero_grad(set_to_none=True)
        self.model.train()
        for name, value in fisher.items():
            value /= max(count, 1)
            if name in self.fisher:  # merge with the old estimate on the rows that existed before
                _overlap(value, self.fisher[name]).add_(self.hp.gamma * self.fisher[name])
        self.fisher = fisher
        self.anchor = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def state_dict(self):
        return {**super().state_dict(), "fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.fisher, self.anchor = state["fisher"], state["anchor"]

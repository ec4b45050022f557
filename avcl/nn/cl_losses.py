"""Continual-learning losses that several methods share: logit distillation (LwF, SS-IL, AV-CIL, HAD), SS-IL's
separated softmax (SS-IL, AV-CIL) and the embedding MSE of the replay baselines (DER++, CLS-ER)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_kl(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(old/T) || softmax(new/T)), averaged over the batch."""
    return F.kl_div(F.log_softmax(new_logits / temperature, dim=1),
                    F.log_softmax(old_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def taskwise_kd(new_logits: torch.Tensor, old_logits: torch.Tensor, task_ranges, temperature: float):
    """SS-IL's task-wise KD: one softmax per old task, KL summed over tasks, mean over the batch."""
    return sum(distillation_kl(new_logits[:, s:e], old_logits[:, s:e], temperature) for s, e in task_ranges)


def separated_softmax_ce(logits: torch.Tensor, labels: torch.Tensor, from_memory: torch.Tensor,
                         old_classes: int) -> torch.Tensor:
    """(B_n CE over new logits + B_e CE over old logits) / B."""
    new, old = ~from_memory, from_memory
    total = logits.new_zeros(())
    if new.any():
        total = total + F.cross_entropy(logits[new, old_classes:], labels[new] - old_classes,
                                        reduction="sum")
    if old.any():
        total = total + F.cross_entropy(logits[old, :old_classes], labels[old], reduction="sum")
    return total / len(labels)


def embedding_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all B x D elements of the squared difference (DER++'s and CLS-ER's penalties), in float32."""
    return F.mse_loss(pred.float(), target.detach().float())

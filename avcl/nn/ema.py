"""Exponential moving averages of a model's weights (CLS-ER's plastic/stable models, XKD's teacher)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``theta_target <- decay * theta_target + (1 - decay) * theta_source`` for every parameter;
    buffers (if any) are copied. ``target`` is a structural copy of ``source`` (e.g. a deepcopy)."""
    targets, sources = list(target.parameters()), list(source.parameters())
    if len(targets) != len(sources):
        raise ValueError(f"ema_update: target has {len(targets)} parameters, source {len(sources)}")
    if targets:
        torch._foreach_mul_(targets, decay)
        torch._foreach_add_(targets, [s.detach() for s in sources], alpha=1 - decay)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)


def ema_decay(step: int, decay: float) -> float:
    """The warm-up used by CLS-ER (and Mean Teacher): ``min(1 - 1/(step + 1), decay)``."""
    return min(1.0 - 1.0 / (step + 1), decay)

"""Exponential moving averages of a model's weights (CLS-ER's plastic/stable models, XKD's teachers)
and the cosine momentum schedule of EMA teachers (DINO, XKD)."""
from __future__ import annotations

import math

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


def cosine_momentum(step: int, total_steps: int, base: float = 0.997, final: float = 1.0) -> float:
    """DINO's / XKD's per-iteration cosine schedule of an EMA teacher's momentum:
    ``final - (final - base) * (1 + cos(pi * step / total_steps)) / 2``: ``base`` at step 0, ``final``
    at ``total_steps`` and after (clamped)."""
    if total_steps <= 0:
        return final
    progress = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (1 + math.cos(math.pi * progress)) / 2


@torch.no_grad()
def ema_update_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], decay: float) -> None:
    """``t <- decay * t + (1 - decay) * s`` for each (target, source) pair, in the given order (a target
    listed twice is updated twice: XKD-MATS's shared teacher blocks, XKD's ``xkd_mats.py``)."""
    if not pairs:
        return
    targets = [t for t, _ in pairs]
    sources = [s.detach() for _, s in pairs]
    if len({id(t) for t in targets}) == len(targets):
        torch._foreach_mul_(targets, decay)
        torch._foreach_add_(targets, sources, alpha=1 - decay)
        return
    for t, s in pairs:  # repeated targets: sequential updates
        t.mul_(decay).add_(s, alpha=1 - decay)

"""Replicas stay identical: a checksum of what every rank must hold alike, compared across ranks after a task."""
from __future__ import annotations

import torch
import torch.distributed as dist

from avcl.core.errors import AvclError
from avcl.parallel.group import collective, current


@torch.no_grad()
def checksum(tensors, device: torch.device) -> torch.Tensor:
    """Two float64 numbers on ``device`` (where the backend reduces) that differ when any value differs
    (the sum, and a position-weighted sum)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.numel() or t.is_complex():
            continue
        v = t.detach().reshape(-1).to(device, torch.float64)
        total[0] += v.sum()
        total[1] += (v * torch.linspace(1, 2, len(v), dtype=torch.float64, device=device)).sum()
    return total


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def check_replicas(parts, what: str) -> None:
    """Every rank must hold the same ``parts`` (tensors, or dicts / lists of them: the model's state and its
    exemplar memory) after ``what`` (AvclError otherwise). What is per rank by design (a reservoir) is not
    passed in."""
    group = current()
    if group is None:
        return
    mine = checksum(_tensors(parts), group.device)
    every = [torch.zeros_like(mine) for _ in range(group.world)]
    with collective(f"comparing replicas after {what}"):
        dist.all_gather(every, mine)
    if any(not torch.equal(every[0], other) for other in every[1:]):
        raise AvclError(f"the ranks' models or exemplar memories differ after {what} (checksums "
                        f"{[e.tolist() for e in every]}): a method that is not rank-deterministic")

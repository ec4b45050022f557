"""Averaging every parameter's gradient over the ranks after backward, in bounded buckets."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from avcl.parallel.group import collective, current


BUCKET = 1 << 24  # elements per all-reduce (64 MiB of float32): bounded extra memory on large models


@torch.no_grad()
def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Average every parameter's gradient over the ranks (what DDP does, without its forward wrapper:
    methods call many model functions besides forward). Parameters without a gradient are left alone:
    every rank runs the same code on batches of the same shape, so the same ones have none everywhere."""
    group = current()
    if group is None:
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    w = group.world
    with collective("all-reducing gradients"):
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= w
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _buckets(grads: list) -> Iterator[list]:
    bucket, size = [], 0
    for g in grads:
        if bucket and (size + g.numel() > BUCKET or g.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel()
    if bucket:
        yield bucket

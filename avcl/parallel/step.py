"""This rank's share of one training step: its slice of each global batch, the per-rank count of what a method
draws itself, and the batch-level terms that see every rank's rows (gathered with their gradient, or averaged)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from avcl.parallel import rng
from avcl.parallel.group import collective, rank, world


@dataclass
class Step:
    """This rank's share of one global batch: an equal slice of it, or every row when not ``sliced``."""
    sliced: bool
    sizes: list  # new-data rows of each rank (all equal when sliced)


_STEP: Optional[Step] = None  # the step being computed (gathering is on only inside a sliced step)


def shard_rows(order: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, Step]]:
    """The global batches of the epoch's permutation ``order`` cut for this rank: this rank's equal slice of
    each global batch, or the whole batch when W does not divide its size (then ``step.sliced`` is False)."""
    w, r, out = world(), rank(), []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        if len(rows) % w == 0:
            share = len(rows) // w
            out.append((rows[r * share:(r + 1) * share], Step(True, [share] * w)))
        else:
            out.append((rows, Step(False, [len(rows)] * w)))
    return out


def slice_rows(index: torch.Tensor, step: Step) -> torch.Tensor:
    """This rank's slice of rows drawn for the whole global batch (e.g. the replay picks)."""
    if not step.sliced:
        return index
    share = len(index) // world()
    return index[rank() * share:(rank() + 1) * share]


def per_rank(count: int) -> int:
    """This rank's share of a per-step global count (a replay batch drawn by the method itself)."""
    if _STEP is None or not _STEP.sliced:
        return count
    return count // world() + (rank() < count % world())


@contextlib.contextmanager
def step(s: Step):
    """Inside a training step: gathering on (when sliced), and the rank's own random stream (``RankRandom``)."""
    global _STEP
    _STEP = s
    try:
        with rng.rank_stream():
            yield
    finally:
        _STEP = None


def all_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows of ``x`` of every rank, concatenated in rank order, with their gradient; the offset of this
    rank's rows in it). Inside a sliced training step only (every rank holds as many rows); otherwise ``(x, 0)``.

    The backward sums every rank's gradient for this rank's rows, so after the gradient average each
    replica holds the gradient of the global loss."""
    if _STEP is None or not _STEP.sliced:
        return x, 0
    with collective("gathering rows (contrastive negatives)"):
        return _GatherRows.apply(x), rank() * len(x)


class _GatherRows(torch.autograd.Function):
    """all_gather forward; backward: the sum over ranks of the gradient of the gathered rows (one all-reduce),
    this rank's rows of it (what torch.distributed.nn.functional.all_gather does, without its deprecation)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = len(x), rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        with collective("sending back the gathered rows' gradients"):
            dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def is_gathering() -> bool:
    return _STEP is not None and _STEP.sliced


def mean_rows(mean: torch.Tensor) -> torch.Tensor:
    """The global batch's mean from each rank's mean over its equal slice (all-reduce; no gradient):
    XKD's DINO centre (all-reduced in XKD's code). Outside a sliced step, ``mean`` itself."""
    if _STEP is None or not _STEP.sliced:
        return mean
    mean = mean.clone()
    with collective("all-reducing the DINO centre"):
        dist.all_reduce(mean)
    return mean / world()

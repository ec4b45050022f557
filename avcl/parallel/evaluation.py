"""Sharded evaluation: each rank computes a contiguous run of the batches one process makes, and the per-row
results are gathered in row order, so every number is the one-process number."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist

from avcl.core.samples import batches, num_samples, select
from avcl.parallel.group import collective, current


def eval_shares(n: int, batch_size: int) -> Optional[list[tuple[int, int]]]:
    """[start, stop) rows of an evaluation pass over ``n`` rows that each rank computes: contiguous runs of
    whole batches of ``batch_size``, the very batches one process makes, so every number is the one-process
    number. None when the pass is not sharded (one process, or fewer batches than ranks: every rank
    computes it all)."""
    batches_, group = -(-n // batch_size), current()
    if group is None or batches_ < group.world:
        return None
    cuts = [batches_ * r // group.world * batch_size for r in range(group.world + 1)]
    return [(start, min(stop, n)) for start, stop in zip(cuts[:-1], cuts[1:])]


def _eval_batches(samples, batch_size: int) -> Iterator[dict]:
    """``batches(samples, batch_size)``, this rank's share of them (``eval_shares``)."""
    shares = eval_shares(num_samples(samples), batch_size)
    if shares is not None:
        samples = select(samples, torch.arange(*shares[current().rank]))
    yield from batches(samples, batch_size)


def _join_eval(rows: torch.Tensor, n: int, batch_size: int) -> torch.Tensor:
    """The per-row results of every rank's ``_eval_batches`` share, in row order, on every rank (on
    ``rows``' device); ``rows`` itself when the pass over ``n`` rows was not sharded. One all-gather on the
    process group's device (each share padded to the largest)."""
    shares = eval_shares(n, batch_size)
    if shares is None:
        return rows
    sizes = [stop - start for start, stop in shares]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]), device=current().device)
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    with collective("gathering evaluation results"):
        dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(rows.device)


def eval_pass(compute, samples, batch_size: int):
    """``compute(batch)`` over ``batches(samples, batch_size)``, concatenated in row order: a tensor, or a dict
    of tensors, with one row per row of the batch. Several processes: each rank computes its share of the
    batches (``eval_shares``) and the shares are all-gathered, so every rank gets every row's result, the
    one-process numbers. Every rank must call it (a collective)."""
    n = num_samples(samples)
    parts = [compute(batch) for batch in _eval_batches(samples, batch_size)]
    if isinstance(parts[0], dict):
        return {key: _join_eval(torch.cat([part[key] for part in parts]), n, batch_size) for key in parts[0]}
    return _join_eval(torch.cat(parts), n, batch_size)

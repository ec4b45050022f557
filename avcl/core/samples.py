"""Samples: a dict of tensors sharing the first dimension, keyed by modality.

Every dataset, task split, memory and batch in avcl is such a dict, e.g.
``{"audio": (N, F, M) float, "video": (N, T, H, W) uint8, "label": (N,) int64}``.
A modality may be missing for some samples: then ``"<modality>_mask"`` (N,) bool says
which samples have it. Methods never assume a single input tensor.
"""
from __future__ import annotations

from typing import Iterator

import torch


Samples = dict[str, torch.Tensor]


def num_samples(samples: Samples) -> int:
    return len(next(iter(samples.values())))  # every field shares the first dim (label-free data has no "label")


def select(samples: Samples, index: torch.Tensor) -> Samples:
    """Rows ``index`` (an index or boolean tensor) of every field, batched."""
    return {key: value[index] for key, value in samples.items()}


def concat(parts: list[Samples]) -> Samples:
    """Concatenate along the sample axis; every part must have the same fields."""
    parts = [p for p in parts if p and num_samples(p) > 0]
    if not parts:
        return {}
    keys = parts[0].keys()
    return {key: torch.cat([p[key] for p in parts]) for key in keys}


def to_device(samples: Samples, device: torch.device | str) -> Samples:
    return {key: value.to(device, non_blocking=True) for key, value in samples.items()}


def batches(samples: Samples, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[Samples]:
    """Batch-index resident tensors: one gather per field per batch, no per-sample Python."""
    n = num_samples(samples)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield select(samples, order[start:start + batch_size])

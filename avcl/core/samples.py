"""Samples: a dict of tensors sharing the first dimension, keyed by modality.

Every dataset, task split, memory and batch in avcl is such a dict, e.g.
``{"audio": (N, F, M) float, "video": (N, T, H, W) uint8, "label": (N,) int64}``.
A modality may be missing for some samples: then ``"<modality>_mask"`` (N,) bool says
which samples have it. Methods never assume a single input tensor.

A field may also be *streamed*: a ``LazyRows`` (e.g. ``avcl.data.stream.StoreRows``, rows of an
HDF5 store) stands for the tensor without holding it. ``select`` and ``concat`` keep it lazy (a
task split or the union of tasks costs an index array), ``batches`` and ``gather`` read the rows of
each batch, and ``resident`` reads it whole (what a replay memory keeps).
"""
from __future__ import annotations

import abc
from typing import Iterator, Union

import numpy as np
import torch


class LazyRows(abc.ABC):
    """A field's rows, read only when a batch needs them. Subclasses give ``__len__``, ``row_shape``
    (the shape of one row), ``dtype`` (what ``read`` returns), ``take`` (a lazy subset), ``read`` (rows as
    a tensor, in the given order) and ``cat`` (lazy union of parts of one kind). ``shape``, ``dim()`` and
    ``nbytes`` answer as the tensor it stands for would."""

    row_shape: tuple
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.row_shape))

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    ndim = property(dim)

    @abc.abstractmethod
    def __len__(self) -> int:
        ...

    @abc.abstractmethod
    def take(self, index: np.ndarray) -> "LazyRows":
        ...

    @abc.abstractmethod
    def read(self, index: np.ndarray | None = None) -> torch.Tensor:
        ...

    @classmethod
    @abc.abstractmethod
    def cat(cls, parts: list["LazyRows"]) -> "LazyRows":
        ...

    def to(self, *args, **kwargs) -> "LazyRows":  # stays where it is read from: batches move to the device
        return self

    @property
    def nbytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return len(self) * int(np.prod(self.row_shape, dtype=np.int64)) * itemsize


Field = Union[torch.Tensor, LazyRows]
Samples = dict[str, Field]


def _rows(index, n: int) -> np.ndarray:
    """An index (tensor, array, boolean mask or int list) as int64 row positions."""
    index = index.cpu().numpy() if torch.is_tensor(index) else np.asarray(index)
    if index.dtype == bool:
        if len(index) != n:
            raise IndexError(f"boolean index of length {len(index)} for {n} rows")
        return np.flatnonzero(index)
    return index.astype(np.int64, copy=False).reshape(-1)


def is_streamed(samples: Samples) -> bool:
    """True when some field is read lazily (``LazyRows``)."""
    return any(isinstance(value, LazyRows) for value in samples.values())


def gather(samples: Samples, index) -> dict[str, torch.Tensor]:
    """Rows ``index`` of every field as tensors: resident fields indexed, lazy ones read."""
    return {key: value.read(_rows(index, len(value))) if isinstance(value, LazyRows) else value[index]
            for key, value in samples.items()}


def resident(samples: Samples) -> dict[str, torch.Tensor]:
    """Every field as a tensor (lazy fields read whole)."""
    return {key: value.read() if isinstance(value, LazyRows) else value for key, value in samples.items()}


def num_samples(samples: Samples) -> int:
    return len(next(iter(samples.values())))  # every field shares the first dim (label-free data has no "label")


def select(samples: Samples, index: torch.Tensor) -> Samples:
    """Rows ``index`` (an index or boolean tensor) of every field, batched (lazy fields stay lazy)."""
    return {key: value.take(_rows(index, len(value))) if isinstance(value, LazyRows) else value[index]
            for key, value in samples.items()}


def concat(parts: list[Samples]) -> Samples:
    """Concatenate along the sample axis; every part must have the same fields. Lazy parts of one
    kind stay lazy; a lazy part beside resident ones is read (e.g. new data merged with a memory)."""
    parts = [p for p in parts if p and num_samples(p) > 0]
    if not parts:
        return {}
    keys = parts[0].keys()

    def join(values):
        if all(isinstance(v, LazyRows) for v in values) and len({type(v) for v in values}) == 1:
            return type(values[0]).cat(values)
        return torch.cat([v.read() if isinstance(v, LazyRows) else v for v in values])
    return {key: join([p[key] for p in parts]) for key in keys}


def to_device(samples: Samples, device: torch.device | str) -> Samples:
    return {key: value.to(device, non_blocking=True) for key, value in samples.items()}


def batches(samples: Samples, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[Samples]:
    """Batch-index resident tensors: one gather per field per batch, no per-sample Python (lazy fields:
    one sorted read per field per batch)."""
    n = num_samples(samples)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    lazy = is_streamed(samples)
    for start in range(0, stop, batch_size):
        rows = order[start:start + batch_size]
        yield gather(samples, rows) if lazy else select(samples, rows)

"""Streaming from the store: a dataset's clips read batch by batch instead of held in memory.

``data.residency`` (every dataset's options, ``ResidencyOptions``) chooses per run:

* ``memory``: every split resident in host memory (then on the device), as before;
* ``stream``: the large fields (frames, filterbanks, features) stay in the HDF5 store as ``StoreRows``
  (``avcl.core.samples.LazyRows``); labels and masks stay resident. A dataset built in memory (AV-Digits,
  synthetic) is written once to a temporary HDF5 file (``data.cache_dir``) and streamed from it;
* ``auto`` (default): resident when the fields fit in ``data.resident_limit_gib`` (None: ``data.memory_share``
  of the machine's memory, its cgroup limit if lower), streamed otherwise. A dataset that was built in
  memory is already resident, so ``auto`` keeps it there. The run says which (``AVDataset.info["residency"]``).

The trainer reads a streamed task through ``StreamLoader``: a ``torch.utils.data.DataLoader`` whose workers
(``data.workers`` per process, ``data.prefetch`` batches ahead each, pinned memory on CUDA, persistent across
the task's epochs) each open their own h5py handle and read whole batches of sorted, de-duplicated rows
(contiguous runs as one slice), in the stored dtype (uint8 frames, float16 fbank); the batch is converted
to the in-memory dtype on the device, where augmentation runs. The epoch's order is the trainer's (the same
seeded permutation as resident data), so a streamed run gives the resident run's metrics. Evaluation,
the retrieval set, the probe's features and the init stage read streamed splits batch by batch in the
main process (``avcl.core.samples.batches``). Replay memories are always resident (bounded by ``memory.size``).
"""
from __future__ import annotations

import atexit
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import h5py
import numpy as np
import torch
import torch.utils.data

from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.core.samples import LazyRows, Samples, num_samples, select


@dataclass
class ResidencyOptions:
    """Where a dataset's clips live during a run (module docstring); every dataset's options inherit these."""
    residency: str = option("auto", choices=("auto", "memory", "stream"))  # auto | memory | stream
    memory_share: float = option(0.5, range="(0,1]")  # auto: resident when the data fits in this share of RAM
    resident_limit_gib: Optional[float] = option(None, range=">0")  # auto: this limit instead of memory_share x RAM
    workers: int = option(2, range=">=0")  # streamed training: DataLoader worker processes per process (0: none)
    prefetch: int = option(2, range=">=1")  # batches each worker reads ahead
    cache_dir: str = ""  # stream of a dataset built in memory: where its temporary HDF5 goes ("" = $TMPDIR)


# ----- lazy rows of an HDF5 dataset ---------------------------------------------------------------------

_HANDLES: dict[tuple[int, str], h5py.File] = {}  # (pid, path) -> handle, in DataLoader workers only


def _worker_handle(path: str) -> h5py.File:
    """The worker's own handle of ``path`` (opened in the worker, never inherited across a fork)."""
    key = (os.getpid(), path)
    if key not in _HANDLES:
        _HANDLES[key] = h5py.File(path, "r")
    return _HANDLES[key]


class StoreRows(LazyRows):
    """Rows ``rows`` of the HDF5 dataset ``key`` in ``path``, read as ``dtype`` (None: as stored)."""

    def __init__(self, path, key: str, rows: np.ndarray, shape: tuple, stored: str, dtype: torch.dtype | None):
        self.path, self.key = str(path), key
        self.rows = np.asarray(rows, dtype=np.int64)
        self.row_shape, self.stored = tuple(shape), np.dtype(stored)
        self.stored_torch = torch.from_numpy(np.empty(0, dtype=self.stored)).dtype
        self.dtype = dtype or self.stored_torch

    @classmethod
    def of(cls, path, key: str, rows=None, dtype: torch.dtype | None = None) -> "StoreRows":
        with h5py.File(path, "r") as h5:
            data = h5[key]
            shape, stored, n = data.shape[1:], data.dtype, data.shape[0]
        return cls(path, key, np.arange(n) if rows is None else rows, shape, stored, dtype)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"StoreRows({self.path}:{self.key}, {len(self)} rows of {self.row_shape} {self.stored})"

    def take(self, index: np.ndarray) -> "StoreRows":
        return StoreRows(self.path, self.key, self.rows[index], self.row_shape, str(self.stored), self.dtype)

    @classmethod
    def cat(cls, parts: list["StoreRows"]):
        """One StoreRows when every part reads the same HDF5 dataset; otherwise the rows, read (resident)."""
        first = parts[0]
        if any((p.path, p.key, p.dtype) != (first.path, first.key, first.dtype) for p in parts):
            return torch.cat([p.read() for p in parts])
        return StoreRows(first.path, first.key, np.concatenate([p.rows for p in parts]), first.row_shape,
                         str(first.stored), first.dtype)

    def read(self, index: np.ndarray | None = None, convert: bool = True) -> torch.Tensor:
        """The rows at positions ``index`` (all by default), in that order; ``convert=False``: in the
        stored dtype (what a worker ships: the device converts)."""
        wanted = self.rows if index is None else self.rows[index]
        worker = torch.utils.data.get_worker_info() is not None
        values = torch.empty((len(wanted), *self.row_shape), dtype=self.stored_torch)
        if worker:  # the batch goes to the main process through shared memory: put it there at once (no copy)
            values.share_memory_()
        try:
            if worker:
                read_into(_worker_handle(self.path)[self.key], wanted, values.numpy())
            else:  # the main process opens the file per read: no handle is inherited by forked workers
                with h5py.File(self.path, "r") as h5:
                    read_into(h5[self.key], wanted, values.numpy())
        except (OSError, KeyError) as err:
            raise AvclError(f"{self.path}: cannot read rows {_some(np.unique(wanted))} of '{self.key}' ({err}); the "
                            "store may be truncated or still being written: re-run the extraction (it resumes)") from None
        return values.to(self.dtype) if convert and self.dtype != self.stored_torch else values


def read_into(dataset, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = dataset[rows[i]]``: in sorted row order (sequential in the file), each row straight to its place
    (contiguous runs already in order as one slice); a repeated row is read once and copied."""
    if len(rows) and (np.diff(rows) == 1).all():
        dataset.read_direct(out, np.s_[int(rows[0]):int(rows[-1]) + 1])
        return
    order = np.argsort(rows, kind="stable")
    previous, last = -1, 0
    for position in order:
        row = int(rows[position])
        if row == previous:
            out[position] = out[last]
            continue
        dataset.read_direct(out, np.s_[row:row + 1], np.s_[position:position + 1])
        previous, last = row, position


def _some(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:5])
    return f"[{shown}{', ...' if len(rows) > 5 else ''}]"


# ----- where a dataset lives ---------------------------------------------------------------------------

def memory_bytes() -> int:
    """The machine's memory, or this process's cgroup limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def resident_limit(opts) -> int:
    """Bytes a dataset may take resident under ``data.residency=auto``."""
    if opts.resident_limit_gib is not None:
        return int(opts.resident_limit_gib * 2**30)
    return int(opts.memory_share * memory_bytes())


def choose(opts, nbytes: int) -> tuple[bool, str]:
    """(stream?, why) for a dataset of ``nbytes`` in memory."""
    gib = nbytes / 2**30
    if opts.residency != "auto":
        return opts.residency == "stream", f"data.residency={opts.residency} ({gib:.2f} GiB of clips)"
    limit = resident_limit(opts) / 2**30
    if nbytes > resident_limit(opts):
        return True, f"streamed: {gib:.2f} GiB of clips > the resident limit {limit:.2f} GiB (data.residency=auto)"
    return False, f"resident: {gib:.2f} GiB of clips fits the resident limit {limit:.2f} GiB (data.residency=auto)"


_SPILLED: list[tuple[int, str]] = []


def _remove_spilled() -> None:
    for pid, path in _SPILLED:
        if pid == os.getpid():  # the process that wrote it, never a forked worker
            Path(path).unlink(missing_ok=True)


atexit.register(_remove_spilled)


def spill(splits: dict[str, Samples], cache_dir: str = "", keep: tuple[str, ...] = ("label",)) -> dict[str, Samples]:
    """Every large field of ``splits`` (name -> Samples) written to one temporary HDF5 file, the splits one
    after another in one dataset per field, and replaced by its ``StoreRows`` (read back bit-identical, in the
    same dtype; bfloat16 is kept as float32 on disk). Fields in ``keep``, masks and one-dimensional fields
    stay resident. The file is removed when the process exits."""
    directory = cache_dir or None
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix="avcl-stream-", suffix=".h5", dir=directory)
    os.close(handle)
    _SPILLED.append((os.getpid(), path))
    out: dict[str, Samples] = {split: {} for split in splits}
    fields = {key: value for samples in splits.values() for key, value in samples.items()
              if key not in keep and not key.endswith("_mask") and torch.is_tensor(value) and value.dim() >= 2}
    try:
        with h5py.File(path, "w") as h5:
            for key, example in fields.items():
                dtype = example.dtype
                parts = [samples[key].detach().cpu() for samples in splits.values() if key in samples]
                total = sum(len(part) for part in parts)
                stored = torch.float32 if dtype == torch.bfloat16 else dtype
                data = h5.create_dataset(key, shape=(total, *example.shape[1:]),
                                         dtype=torch.empty(0, dtype=stored).numpy().dtype,
                                         chunks=(1, *example.shape[1:]) if total else None)
                offset = 0
                for split, samples in splits.items():
                    if key not in samples:
                        continue
                    n = len(samples[key])
                    if n:
                        data[offset:offset + n] = samples[key].detach().cpu().to(stored).numpy()
                    out[split][key] = StoreRows(path, key, np.arange(offset, offset + n), example.shape[1:],
                                                str(data.dtype), dtype)
                    offset += n
    except OSError as err:
        raise AvclError(f"{path}: cannot write the streamed copy of the dataset ({err}); set data.cache_dir to a "
                        "disk with room, or data.residency=memory") from None
    for split, samples in splits.items():
        for key, value in samples.items():
            out[split].setdefault(key, value)
        out[split] = {key: out[split][key] for key in samples}  # the fields' own order
    return out


# ----- the training loader --------------------------------------------------------------------------------

class _Batches(torch.utils.data.Sampler):
    """The current epoch's batches of row positions (set by the trainer before each epoch)."""

    def __init__(self):
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Reader(torch.utils.data.Dataset):
    """What a worker does: read one batch of rows of every lazy field, in the stored dtype."""

    def __init__(self, lazy: dict[str, LazyRows]):
        self.lazy = lazy

    def __getitem__(self, rows: np.ndarray) -> dict:
        try:
            return {key: value.read(rows, convert=False) if isinstance(value, StoreRows) else value.read(rows)
                    for key, value in self.lazy.items()}
        except Exception as err:  # reported by the main process as one message, not a worker traceback
            return {"__error__": str(err) if isinstance(err, AvclError) else f"{type(err).__name__}: {err}"}

    def __len__(self) -> int:
        return num_samples(self.lazy)


class StreamLoader:
    """Batches of a streamed task, in the order the trainer gives, read ahead by DataLoader workers."""

    def __init__(self, samples: Samples, device: torch.device, workers: int = 2, prefetch: int = 2):
        self.lazy = {k: v for k, v in samples.items() if isinstance(v, LazyRows)}
        self.resident = {k: v for k, v in samples.items() if not isinstance(v, LazyRows)}
        self.device, self.sampler = device, _Batches()
        kwargs = {"prefetch_factor": prefetch, "persistent_workers": True} if workers else {}
        self.loader = torch.utils.data.DataLoader(
            _Reader(self.lazy), batch_size=None, sampler=self.sampler, num_workers=workers,
            pin_memory=device.type == "cuda", **kwargs,
            generator=torch.Generator().manual_seed(0))  # its workers' seeds: never drawn from the run's RNG

    def epoch(self, index_batches: list) -> Iterator[dict]:
        """The batches of rows ``index_batches`` (tensors or arrays of positions), on the device."""
        self.sampler.batches = [np.asarray(b.cpu() if torch.is_tensor(b) else b, dtype=np.int64) for b in index_batches]
        iterator = iter(self.loader)
        for rows in self.sampler.batches:
            try:
                read = next(iterator)
            except RuntimeError as err:
                if "DataLoader worker" in str(err):
                    raise AvclError(f"a data-loader worker stopped: {err} (data.workers=0 reads in this process)") \
                        from None
                raise
            if "__error__" in read:
                raise AvclError(read["__error__"])
            batch = select(self.resident, torch.from_numpy(rows).to(next(iter(self.resident.values())).device)) \
                if self.resident else {}
            for key, value in read.items():
                batch[key] = value.to(self.device, non_blocking=True).to(self.lazy[key].dtype)
            yield batch

    def close(self) -> None:
        self.loader = None


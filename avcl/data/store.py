"""avcl's feature store: one HDF5 file of per-sample features, written resumably.

Layout::

    attrs: format="avcl-feature-store", version, complete, manifest (JSON), class_names (JSON),
           fields (JSON: name -> [shape, dtype])
    ids      (N,) str      sample ids (video ids, file paths)
    labels   (N,) int64    class index, -1 when unknown
    splits   (N,) str      "train" / "val" / "test" / ""
    status   (N,) uint8    0 pending, 1 written, 2 failed
    errors   (N,) str      why a row failed ("" otherwise)
    features/<field>  (N, *shape)  float16 features, or the decoded inputs of ``avcl extract --output raw``
                                   (video uint8 frames, audio float16 fbank); chunked one row per chunk
    masks/<field>     (N,) bool    the modality is present for that row

Rows are written as they are computed and flushed, so an interrupted writer loses at most the
rows in flight; ``create_store`` on an incomplete store with the same ids and fields resumes
it. ``finalize`` marks the store complete only when no row is pending; readers that need a
finished store check ``complete``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np
import torch

from avcl.core.errors import AvclError


FORMAT = "avcl-feature-store"
VERSION = 1
PENDING, WRITTEN, FAILED = 0, 1, 2
_STR = h5py.string_dtype()


def _strings(values) -> list[str]:
    """An HDF5 string dataset's values as str (h5py returns bytes for variable-length strings)."""
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def _fields_json(fields: dict[str, tuple[tuple[int, ...], str]]) -> str:
    return json.dumps({name: [list(shape), str(dtype)] for name, (shape, dtype) in sorted(fields.items())})


class FeatureStoreWriter:
    """Write rows of a store; use ``create_store`` to get one."""

    def __init__(self, path: Path, handle: h5py.File):
        self.path, self.h5 = path, handle
        self.ids = _strings(handle["ids"][:])
        self.fields = {name: (tuple(shape), dtype) for name, (shape, dtype) in
                       json.loads(handle.attrs["fields"]).items()}
        self._status = handle["status"][:]

    @property
    def done(self) -> np.ndarray:
        """True for rows already written or failed."""
        return self._status != PENDING

    def pending(self) -> np.ndarray:
        return np.flatnonzero(self._status == PENDING)

    def write(self, rows, values: dict[str, np.ndarray], masks: dict[str, np.ndarray] | None = None) -> None:
        """Write ``values[field]`` (shape (len(rows), *shape) or (*shape) for one row) at ``rows``."""
        single = np.ndim(rows) == 0
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        order = np.argsort(rows)  # h5py wants increasing indices
        for name in values:
            if name not in self.fields:
                raise KeyError(f"{self.path}: no field '{name}' (fields: {sorted(self.fields)})")
        try:
            for name, value in values.items():
                array = np.asarray(value)
                array = array[None] if single else array
                self.h5["features"][name][rows[order]] = array[order]
            for name in self.fields:
                present = np.ones(len(rows), dtype=bool) if masks is None or name not in masks \
                    else np.atleast_1d(np.asarray(masks[name], dtype=bool))
                self.h5["masks"][name][rows[order]] = present[order]
            self._set_status(rows[order], WRITTEN, "")
        except OSError as err:  # a full disk, a lost mount: the rows written so far are kept (the store resumes)
            first = self.ids[int(rows[order][0])] if len(rows) else "?"
            raise AvclError(f"{self.path}: cannot write row {int(rows[order][0])} ('{first}'"
                            f"{f' and {len(rows) - 1} more' if len(rows) > 1 else ''}): {err}; free space "
                            "(the extraction resumes where it stopped) or write elsewhere with --out") from None

    def fail(self, row: int, reason: str) -> None:
        self._set_status(np.array([row]), FAILED, reason)

    def _set_status(self, rows: np.ndarray, status: int, reason: str) -> None:
        self._status[rows] = status
        self.h5["status"][rows] = status
        self.h5["errors"][rows] = [reason] * len(rows)
        self.h5.flush()

    def finalize(self, extra_manifest: dict | None = None) -> None:
        """Mark the store complete; refuses while rows are pending."""
        pending = self.pending()
        if len(pending):
            raise AvclError(f"{self.path}: {len(pending)} rows still pending (first: {self.ids[pending[0]]})")
        if extra_manifest:
            manifest = json.loads(self.h5.attrs["manifest"])
            manifest.update(extra_manifest)
            self.h5.attrs["manifest"] = json.dumps(manifest)
        self.h5.attrs["complete"] = True
        self.h5.flush()

    def close(self) -> None:
        if self.h5.id.valid:
            self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


COMPRESSIONS = ("none", "lzf", "gzip")  # what `avcl extract --compression` offers (benchmarks/loader.py)


def create_store(path, ids: list[str], fields: dict[str, tuple[tuple[int, ...], str]], *,
                 labels: Iterable[int] | None = None, splits: Iterable[str] | None = None,
                 class_names: list[str] | None = None, manifest: dict | None = None,
                 compression: str = "none") -> FeatureStoreWriter:
    """Create a store at ``path``, or reopen an incomplete one with the same ids and fields.

    ``fields`` maps a name to (per-row shape, dtype). A complete store is never overwritten. Every
    field is chunked one row per chunk (a random row is one chunk read), compressed with ``compression``
    (none | lzf | gzip: h5py's filters; measured in docs/scaling.md).
    """
    if compression not in COMPRESSIONS:
        raise AvclError(f"unknown compression '{compression}' (one of {', '.join(COMPRESSIONS)})")
    path = Path(path)
    fields = {name: (tuple(int(s) for s in shape), str(np.dtype(dt))) for name, (shape, dt) in fields.items()}
    if path.exists():
        handle = _open(path, "r+")
        same = (json.loads(handle.attrs["fields"]) == json.loads(_fields_json(fields))
                and _strings(handle["ids"][:]) == list(ids))
        if handle.attrs["complete"]:
            handle.close()
            raise AvclError(f"{path} is already a complete feature store; choose another output or delete it")
        if not same:
            handle.close()
            raise AvclError(f"{path} is an unfinished store of different samples or fields; "
                            "delete it or choose another output")
        return FeatureStoreWriter(path, handle)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    handle = h5py.File(path, "w")
    handle.attrs.update({"format": FORMAT, "version": VERSION, "complete": False,
                         "manifest": json.dumps(manifest or {}), "class_names": json.dumps(class_names or []),
                         "fields": _fields_json(fields)})
    handle.create_dataset("ids", data=list(ids), dtype=_STR)
    handle.create_dataset("labels", data=np.asarray(list(labels) if labels is not None else [-1] * n, dtype=np.int64))
    handle.create_dataset("splits", data=list(splits) if splits is not None else [""] * n, dtype=_STR)
    handle.create_dataset("status", data=np.zeros(n, dtype=np.uint8))
    handle.create_dataset("errors", data=[""] * n, dtype=_STR)
    for name, (shape, dt) in fields.items():
        handle.create_dataset(f"features/{name}", shape=(n, *shape), dtype=dt, chunks=(1, *shape) if n else None,
                              compression=None if compression == "none" or not n else compression)
        handle.create_dataset(f"masks/{name}", shape=(n,), dtype=bool)
    handle.flush()
    return FeatureStoreWriter(path, handle)


def _open(path: Path, mode: str) -> h5py.File:
    try:
        handle = h5py.File(path, mode)
    except OSError as err:
        raise AvclError(f"{path}: not a readable HDF5 feature store ({err})") from None
    if handle.attrs.get("format") != FORMAT:
        handle.close()
        raise AvclError(f"{path}: not an avcl feature store (no format={FORMAT!r} attribute)")
    return handle


class FeatureStore:
    """Read-only view of a store; ``load`` reads a field into a tensor."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise AvclError(f"feature store not found: {self.path}")
        with _open(self.path, "r") as h5:
            self.ids = _strings(h5["ids"][:])
            self.labels = h5["labels"][:]
            self.splits = _strings(h5["splits"][:])
            self.status = h5["status"][:]
            self.errors = {i: e for i, e in enumerate(_strings(h5["errors"][:])) if e}
            self.complete = bool(h5.attrs["complete"])
            self.manifest = json.loads(h5.attrs["manifest"])
            self.class_names = json.loads(h5.attrs["class_names"])
            self.fields = {name: (tuple(shape), dtype) for name, (shape, dtype) in json.loads(h5.attrs["fields"]).items()}

    def __len__(self) -> int:
        return len(self.ids)

    def _rows(self, rows) -> np.ndarray:
        return np.arange(len(self)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))

    def load(self, field: str, rows=None, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Rows (sorted; all by default) of ``field`` as one tensor, read in large slabs;
        converted to ``dtype``, or in the stored dtype when ``dtype`` is None."""
        if field not in self.fields:
            raise AvclError(f"{self.path}: no field '{field}' (fields: {sorted(self.fields)})")
        rows = self._rows(rows)
        with h5py.File(self.path, "r") as h5:
            data = h5["features"][field]
            out = np.empty((len(rows), *data.shape[1:]), dtype=data.dtype)
            # Contiguous runs are read as slices (fast); h5py's fancy indexing is per row.
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            start = 0
            for run in np.split(rows, breaks):
                if len(run):
                    out[start:start + len(run)] = data[run[0]:run[-1] + 1]
                    start += len(run)
        values = torch.from_numpy(out)
        return values if dtype is None else values.to(dtype)

    def mask(self, field: str, rows=None) -> np.ndarray:
        with h5py.File(self.path, "r") as h5:
            return h5["masks"][field][:][self._rows(rows)]


def open_store(path) -> FeatureStore:
    return FeatureStore(path)

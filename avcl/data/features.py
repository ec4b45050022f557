"""Dataset ``features``: train on a feature store (``avcl extract``, ``avcl convert-features``).

Every field of the store becomes a sample field of the same name (e.g. "audio", "video"),
loaded resident in memory: float fields as float32 (or ``dtype``), integer fields in their
stored dtype (the uint8 frames of an ``avcl extract --output raw`` store stay uint8); a field
whose mask is False for some rows also gets ``<field>_mask``. ``require_raw`` checks that a
dataset, its samples or a store hold raw inputs (uint8 frames and float fbank), as the
pre-training models need. Rows that failed extraction, or have no label, are left out.
Splits come from the store; when it has no "val" rows, ``val_fraction`` of each training
class is held out (seeded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.core.samples import LazyRows
from avcl.data import AVDataset, register_dataset
from avcl.data.sources import find_under_roots
from avcl.data.store import WRITTEN, FeatureStore, open_store
from avcl.data.stream import ResidencyOptions, StoreRows, choose


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLOATS = ("float16", "float32", "float64", "bfloat16")  # dtype names of float fields (numpy and torch)


def torch_dtype(name: str) -> torch.dtype:
    """The in-memory dtype ``data.dtype`` names."""
    if name not in DTYPES:
        raise AvclError(f"data.dtype must be one of {sorted(DTYPES)}, got '{name}'")
    return DTYPES[name]


@dataclass
class FeaturesOptions(ResidencyOptions):
    name: str = "features"
    store: str = ""  # path of the .h5 feature store
    fields: Optional[List[str]] = None  # None: every field of the store
    dtype: str = "float32"  # in memory: float32 | float16 | bfloat16
    val_fraction: float = option(0.1, range="[0,1)")  # used only when the store has no "val" rows
    require_complete: bool = True  # refuse a store whose extraction has not finished


def resolve_store(path: str, data_root: str | None, require_complete: bool):
    """Open a store; a relative path is looked up under the data root first ($AVCL_DATA_DIR)."""
    if not path:
        raise AvclError("data.store is empty: give the path of a feature store (data.store=PATH.h5)")
    store = open_store(find_under_roots(path, data_root))
    if require_complete and not store.complete:
        raise AvclError(f"{store.path}: extraction has not finished (resume it, or set data.require_complete=false)")
    return store


def field_dtype(store, field: str, dtype: torch.dtype) -> torch.dtype | None:
    """The in-memory dtype of a store field: ``dtype`` for floats, None (kept as stored) for
    integers and booleans, e.g. uint8 frames are never blown up to floats."""
    return dtype if np.dtype(store.fields[field][1]).kind == "f" else None


def _describe(name: str, fields: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """'field NAME is float features (float16) of shape (...) per clip', or that there is no such field."""
    if name not in fields:
        return f"no field '{name}'; fields: {sorted(fields)}"
    shape, dtype = fields[name]
    kind = f"float features ({dtype})" if dtype in FLOATS else f"{dtype} values"
    return f"field '{name}' is {kind} of shape {tuple(shape)} per clip"


def require_raw(data, where: str | None = None) -> None:
    """Raise one AvclError unless ``data`` holds raw inputs: ``video`` uint8 frames (N, T, H, W) or
    (N, T, H, W, 3), ``audio`` a float (N, frames, mel_bins) filterbank.

    ``data`` is an AVDataset (its train split is checked), a Samples dict, or a FeatureStore (its
    field metadata, nothing is loaded). ``where`` names it in the message (default: the store).
    """
    if isinstance(data, FeatureStore):
        where = where or str(data.path)
        fields = {name: (tuple(shape), str(dtype)) for name, (shape, dtype) in data.fields.items()}
    else:
        if isinstance(data, AVDataset):
            where = where or str(data.info.get("store", f"dataset '{data.name}'"))
            data = data.train
        where = where or "samples"
        fields = {name: (tuple(value.shape[1:]), str(value.dtype).removeprefix("torch."))
                  for name, value in data.items() if torch.is_tensor(value) or isinstance(value, LazyRows)}
    video, audio = fields.get("video"), fields.get("audio")
    frames_ok = video is not None and video[1] == "uint8" and (
        len(video[0]) == 3 or (len(video[0]) == 4 and video[0][-1] == 3))
    if not frames_ok:
        raise AvclError(f"{where}: no raw frames ({_describe('video', fields)}; need uint8 (T, H, W) or "
                        "(T, H, W, 3) frames): extract with --output raw")
    if audio is None or audio[1] not in FLOATS or len(audio[0]) != 2:
        raise AvclError(f"{where}: no raw audio ({_describe('audio', fields)}; need a float (frames, "
                        "mel_bins) filterbank): extract with --output raw")


def check_fields(store, fields: list[str] | None) -> list[str]:
    fields = list(fields) if fields is not None else sorted(store.fields)
    unknown = [f for f in fields if f not in store.fields]
    if unknown:
        raise AvclError(f"{store.path}: no field(s) {unknown} (fields: {sorted(store.fields)})")
    return fields


def stratified_pick(labels: np.ndarray, candidates: np.ndarray, fraction: float, rng) -> np.ndarray:
    """Boolean mask choosing ``fraction`` of the candidate rows of each label; when ``fraction`` > 0, at
    least one of them and never all, so that no class with two or more rows is left without rows on
    either side (an empty class would be a NaN cell in the accuracy matrix)."""
    chosen = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels[candidates]):
        rows = rng.permutation(np.flatnonzero(candidates & (labels == label)))
        count = int(round(fraction * len(rows)))
        if fraction > 0:
            count = min(max(count, 1), len(rows) - 1)
        chosen[rows[:count]] = True
    return chosen


def dataset_from_rows(name: str, store, rows_of: dict[str, np.ndarray], labels: np.ndarray, fields: list[str],
                      dtype: str, class_names: list[str], info: dict, residency=None) -> AVDataset:
    """An AVDataset of the store rows in ``rows_of[split]`` with ``labels[row]``; an optional
    ``rows_of["held_out"]`` becomes ``AVDataset.held_out`` (clips kept out of the stream).

    Resident (``residency``: the dataset's ``ResidencyOptions``; avcl.data.stream): each split is read on
    its own (one read per field and split), so the features are held once, never as a whole-store tensor
    plus per-split copies. Streamed: each field is a ``StoreRows`` of the split's rows, read batch by batch.
    """
    dtype = torch_dtype(dtype)
    names = ("train", "val", "test") + (("held_out",) if "held_out" in rows_of else ())
    used = np.concatenate([rows_of[s] for s in names])
    masks = {f: store.mask(f) for f in fields}  # every split carries a field's mask if any used row lacks it
    masked = [f for f in fields if not masks[f][used].all()]
    dtypes = {f: field_dtype(store, f, dtype) for f in fields}
    itemsize = {f: torch.empty((), dtype=dtypes[f]).element_size() if dtypes[f] else np.dtype(store.fields[f][1]).itemsize
                for f in fields}  # in memory: floats as data.dtype, integers as stored
    nbytes = sum(len(used) * int(np.prod(store.fields[f][0], dtype=np.int64)) * itemsize[f] for f in fields)
    streamed, why = choose(residency or ResidencyOptions(residency="memory"), nbytes)

    def split(which: str) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows_of[which])
        if streamed:
            samples = {f: StoreRows(store.path, f"features/{f}", rows, store.fields[f][0], store.fields[f][1], dtypes[f])
                       for f in fields}
        else:
            order = np.argsort(rows, kind="stable")  # the store reads sorted rows in contiguous runs
            samples = {f: store.load(f, rows[order], dtypes[f]) for f in fields}
            if (np.diff(rows) < 0).any():  # back to the split's own order
                inverse = torch.from_numpy(np.argsort(order))
                samples = {f: values[inverse] for f, values in samples.items()}
        samples.update({f"{f}_mask": torch.from_numpy(masks[f][rows]) for f in masked})
        samples["label"] = torch.from_numpy(labels[rows]).long()
        return samples

    return AVDataset(name=name, train=split("train"), val=split("val"), test=split("test"),
                     held_out=split("held_out") if "held_out" in rows_of else {},
                     class_names=list(class_names), info={"store": str(store.path), "manifest": store.manifest, **info,
                                                          "residency": why})


@register_dataset("features", FeaturesOptions, "a feature store written by avcl extract / convert-features")
def build_features(opts: FeaturesOptions, data_root: str | None, seed: int) -> AVDataset:
    store = resolve_store(opts.store, data_root, opts.require_complete)
    fields = check_fields(store, opts.fields)
    usable = (store.status == WRITTEN) & (store.labels >= 0)
    splits = np.array(store.splits)
    if not ((splits == "train") & usable).any() or not ((splits == "test") & usable).any():
        raise AvclError(f"{store.path}: needs labelled 'train' and 'test' rows (splits found: {sorted(set(splits))})")
    if not ((splits == "val") & usable).any() and opts.val_fraction > 0:
        train = usable & (splits == "train")
        splits = np.where(stratified_pick(store.labels, train, opts.val_fraction, np.random.default_rng(seed)),
                          "val", splits)
    rows_of = {name: np.flatnonzero(usable & (splits == name)) for name in ("train", "val", "test")}
    num_classes = int(store.labels[usable].max()) + 1
    names = store.class_names or [f"class{c}" for c in range(num_classes)]
    return dataset_from_rows("features", store, rows_of, store.labels, fields, opts.dtype, names,
                             {"failed_rows": int((store.status != WRITTEN).sum())}, opts)

"""Dataset ``features``: train on a feature store (``avcl extract``, ``avcl convert-features``).

Every field of the store becomes a sample field of the same name (e.g. "audio", "video"),
loaded resident in memory as float32 (or ``dtype``); a field whose mask is False for some rows
also gets ``<field>_mask``. Rows that failed extraction, or have no label, are left out.
Splits come from the store; when it has no "val" rows, ``val_fraction`` of each training
class is held out (seeded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from avcl.data import AVDataset, register_dataset
from avcl.data.store import WRITTEN, open_store
from avcl.errors import AvclError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The in-memory dtype ``data.dtype`` names."""
    if name not in DTYPES:
        raise AvclError(f"data.dtype must be one of {sorted(DTYPES)}, got '{name}'")
    return DTYPES[name]


@dataclass
class FeaturesOptions:
    name: str = "features"
    store: str = ""  # path of the .h5 feature store
    fields: Optional[List[str]] = None  # None: every field of the store
    dtype: str = "float32"  # in memory: float32 | float16 | bfloat16
    val_fraction: float = 0.1  # used only when the store has no "val" rows
    require_complete: bool = True  # refuse a store whose extraction has not finished


def resolve_store(path: str, data_root: str | None, require_complete: bool):
    """Open a store; a relative path is looked up under the data root first ($AVCL_DATA_DIR)."""
    from avcl.data.sources import find_under_roots
    if not path:
        raise AvclError("data.store is empty: give the path of a feature store (data.store=PATH.h5)")
    store = open_store(find_under_roots(path, data_root))
    if require_complete and not store.complete:
        raise AvclError(f"{store.path}: extraction has not finished (resume it, or set data.require_complete=false)")
    return store


def check_fields(store, fields: list[str] | None) -> list[str]:
    fields = list(fields) if fields is not None else sorted(store.fields)
    unknown = [f for f in fields if f not in store.fields]
    if unknown:
        raise AvclError(f"{store.path}: no field(s) {unknown} (fields: {sorted(store.fields)})")
    return fields


def stratified_pick(labels: np.ndarray, candidates: np.ndarray, fraction: float, rng) -> np.ndarray:
    """Boolean mask choosing ``fraction`` of the candidate rows of each label."""
    chosen = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels[candidates]):
        rows = rng.permutation(np.flatnonzero(candidates & (labels == label)))
        chosen[rows[:int(round(fraction * len(rows)))]] = True
    return chosen


def dataset_from_rows(name: str, store, rows_of: dict[str, np.ndarray], labels: np.ndarray, fields: list[str],
                      dtype: str, class_names: list[str], info: dict) -> AVDataset:
    """An AVDataset of the store rows in ``rows_of[split]`` with ``labels[row]``.

    Each split is read on its own (one read per field and split), so the features are held
    once, never as a whole-store tensor plus per-split copies.
    """
    dtype = torch_dtype(dtype)
    used = np.concatenate([rows_of[s] for s in ("train", "val", "test")])
    masks = {f: store.mask(f) for f in fields}  # every split carries a field's mask if any used row lacks it
    masked = [f for f in fields if not masks[f][used].all()]

    def split(which: str) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows_of[which])
        order = np.argsort(rows, kind="stable")  # the store reads sorted rows in contiguous runs
        samples = {f: store.load(f, rows[order], dtype) for f in fields}
        if (np.diff(rows) < 0).any():  # back to the split's own order
            inverse = torch.from_numpy(np.argsort(order))
            samples = {f: values[inverse] for f, values in samples.items()}
        samples.update({f"{f}_mask": torch.from_numpy(masks[f][rows]) for f in masked})
        samples["label"] = torch.from_numpy(labels[rows]).long()
        return samples

    return AVDataset(name=name, train=split("train"), val=split("val"), test=split("test"),
                     class_names=list(class_names), info={"store": str(store.path), "manifest": store.manifest, **info})


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
                             {"failed_rows": int((store.status != WRITTEN).sum())})

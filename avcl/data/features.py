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


@dataclass
class FeaturesOptions:
    name: str = "features"
    store: str = ""  # path of the .h5 feature store
    fields: Optional[List[str]] = None  # None: every field of the store
    dtype: str = "float32"  # in memory: float32 | float16 | bfloat16
    val_fraction: float = 0.1  # used only when the store has no "val" rows
    require_complete: bool = True  # refuse a store whose extraction has not finished


@register_dataset("features", FeaturesOptions, "a feature store written by avcl extract / convert-features")
def build_features(opts: FeaturesOptions, data_root: str | None, seed: int) -> AVDataset:
    if not opts.store:
        raise AvclError("data.store is empty: give the path of a feature store (data.store=PATH.h5)")
    if opts.dtype not in DTYPES:
        raise AvclError(f"data.dtype must be one of {sorted(DTYPES)}, got '{opts.dtype}'")
    store = open_store(opts.store)
    if opts.require_complete and not store.complete:
        raise AvclError(f"{store.path}: extraction has not finished (resume it, or set data.require_complete=false)")
    fields = list(opts.fields) if opts.fields is not None else sorted(store.fields)
    unknown = [f for f in fields if f not in store.fields]
    if unknown:
        raise AvclError(f"{store.path}: no field(s) {unknown} (fields: {sorted(store.fields)})")
    usable = (store.status == WRITTEN) & (store.labels >= 0)
    splits = np.array(store.splits)
    if not ((splits == "train") & usable).any() or not ((splits == "test") & usable).any():
        raise AvclError(f"{store.path}: needs labelled 'train' and 'test' rows (splits found: {sorted(set(splits))})")
    if not ((splits == "val") & usable).any() and opts.val_fraction > 0:
        rng = np.random.default_rng(seed)
        splits = splits.copy()
        for label in np.unique(store.labels[usable & (splits == "train")]):
            rows = rng.permutation(np.flatnonzero(usable & (splits == "train") & (store.labels == label)))
            splits[rows[:int(round(opts.val_fraction * len(rows)))]] = "val"
    rows_of = {name: np.flatnonzero(usable & (splits == name)) for name in ("train", "val", "test")}
    all_rows = np.sort(np.concatenate(list(rows_of.values())))
    position = {row: i for i, row in enumerate(all_rows)}
    loaded = {f: store.load(f, all_rows, DTYPES[opts.dtype]) for f in fields}
    masks = {f: torch.from_numpy(store.mask(f, all_rows)) for f in fields}
    labels = torch.from_numpy(store.labels[all_rows]).long()

    def split(name: str) -> dict[str, torch.Tensor]:
        index = torch.tensor([position[r] for r in rows_of[name]], dtype=torch.long)
        samples = {f: loaded[f][index] for f in fields}
        samples.update({f"{f}_mask": masks[f][index] for f in fields if not masks[f].all()})
        samples["label"] = labels[index]
        return samples

    num_classes = int(store.labels[usable].max()) + 1
    names = store.class_names or [f"class{c}" for c in range(num_classes)]
    return AVDataset(name="features", train=split("train"), val=split("val"), test=split("test"),
                     class_names=list(names), info={"store": str(store.path), "manifest": store.manifest,
                                                     "failed_rows": int((store.status != WRITTEN).sum())})

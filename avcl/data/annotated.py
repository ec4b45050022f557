"""Benchmarks defined by an annotation list joined with a snippet feature store (HAD's data).

* ``ave``: the AVE dataset's ``Annotations.txt`` (``Category&VideoID&Quality&Start&End``, 4,143
  videos, 28 classes in alphabetical order) and a store of per-video snippet features (by
  default 10 one-second snippets: fields "audio" (10, Da) and "video" (10, Dv)) keyed by video id.
  AVE's official ``trainSet.txt`` / ``valSet.txt`` / ``testSet.txt`` (same format) are used when
  they sit next to the annotations; otherwise a seeded, per-class split (ours) is drawn.
* ``avk``: AVK-k, OUR construction (HAD's is not public): from a Kinetics-400 style CSV
  (youtube_id, time_start, time_end, label, split) keep the videos whose features are in the
  store with an audio track, pick ``num_classes`` classes (seeded, or alphabetically), train on
  the CSV's train rows (``val_fraction`` of them held out) and test on its val/validate rows.
  The classes and the video ids of every split are saved with the run (``dataset.json``).

The lists are read by ``avcl.media.manifests`` and store rows are matched by the clip ids it
gives, which are the ids ``avcl extract`` writes for the same list: the video id for AVE
(``<id>#1`` for a video listed a second time), ``<id>_<start:06d>_<end:06d>`` for Kinetics.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.data import AVDataset, register_dataset
from avcl.data.features import check_fields, dataset_from_rows, resolve_store, stratified_pick
from avcl.data.sources import find_under_roots
from avcl.data.store import WRITTEN
from avcl.data.stream import ResidencyOptions
from avcl.media.manifests import read_ave, read_kinetics


def _find(path: str, data_root: str | None) -> Path:
    found = find_under_roots(path, data_root)
    if not found.is_file():
        raise AvclError(f"annotation file not found: {path} (looked under the data root and as given)")
    return found


def _store_rows(store, ids: list[str], require_audio: bool) -> np.ndarray:
    """Store row of each clip id, -1 when absent or unusable (failed, or no audio when required)."""
    index = {vid: row for row, vid in enumerate(store.ids)}
    usable = store.status == WRITTEN
    if require_audio and "audio" in store.fields:
        usable &= store.mask("audio")
    rows = np.array([index.get(i, -1) for i in ids], dtype=np.int64)
    return np.where((rows >= 0) & usable[rows.clip(min=0)], rows, -1)


@dataclass
class AVEOptions(ResidencyOptions):
    name: str = "ave"
    annotations: str = "ave/Annotations.txt"  # relative to the data root, or absolute
    store: str = "ave/snippets.h5"  # snippet features keyed by video id
    fields: Optional[List[str]] = None
    dtype: str = "float32"
    val_fraction: float = option(0.1, range="[0,1)")  # only without official split files
    test_fraction: float = option(0.1, range="[0,1)")
    require_complete: bool = True


@register_dataset("ave", AVEOptions, "AVE: Annotations.txt + a snippet feature store (HAD's AVE benchmark)")
def build_ave(opts: AVEOptions, data_root: str | None, seed: int) -> AVDataset:
    annotations = _find(opts.annotations, data_root)
    clips = read_ave(annotations)
    classes = clips.class_names
    store = resolve_store(opts.store, data_root, opts.require_complete)
    fields = check_fields(store, opts.fields)
    ids = [item.id for item in clips.items]
    rows = _store_rows(store, ids, require_audio=False)
    labels = np.array(clips.label_index())
    present = rows >= 0
    official = {name: annotations.parent / f"{name}Set.txt" for name in ("train", "val", "test")}
    if all(p.is_file() for p in official.values()):
        split_of = {item.id: name for name, p in official.items() for item in read_ave(p).items}
        splits = np.array([split_of.get(i, "") for i in ids])
        split_source = "official AVE split files"
    else:
        rng = np.random.default_rng(seed)
        test = stratified_pick(labels, present, opts.test_fraction, rng)
        val = stratified_pick(labels, present & ~test, opts.val_fraction / max(1 - opts.test_fraction, 1e-9), rng)
        splits = np.where(test, "test", np.where(val, "val", "train"))
        split_source = f"seeded per-class split (ours): test {opts.test_fraction}, val {opts.val_fraction}"
    rows_of = {name: rows[present & (splits == name)] for name in ("train", "val", "test")}
    missing = int((~present).sum())
    store_labels = np.full(len(store), -1)
    store_labels[rows[present]] = labels[present]
    return dataset_from_rows("ave", store, rows_of, store_labels, fields, opts.dtype, classes, {
        "annotations": str(annotations), "split": split_source, "videos_without_features": missing}, opts)


@dataclass
class AVKOptions(ResidencyOptions):
    name: str = "avk"
    annotations: str = "kinetics400/annotations.csv"  # youtube_id,time_start,time_end,label,split
    store: str = "kinetics400/snippets.h5"
    num_classes: int = option(100, range=">=1")  # AVK-100 / 200 / 400
    class_selection: str = "seeded"  # seeded | alphabetical
    val_fraction: float = option(0.1, range="[0,1)")  # of the train rows of each class
    fields: Optional[List[str]] = None
    dtype: str = "float32"
    require_complete: bool = True


@register_dataset("avk", AVKOptions, "AVK-k (our construction): Kinetics classes with audio + a snippet store")
def build_avk(opts: AVKOptions, data_root: str | None, seed: int) -> AVDataset:
    annotations = _find(opts.annotations, data_root)
    clips = read_kinetics(annotations)
    store = resolve_store(opts.store, data_root, opts.require_complete)
    fields = check_fields(store, opts.fields)
    rows = _store_rows(store, [item.id for item in clips.items], require_audio=True)
    present = rows >= 0
    available = sorted({clips.items[i].label for i in np.flatnonzero(present)})
    if opts.num_classes > len(available):
        raise AvclError(f"data.num_classes={opts.num_classes} but only {len(available)} classes have videos with "
                        f"audio features in {store.path}")
    if opts.class_selection == "alphabetical":
        classes = available[:opts.num_classes]
    elif opts.class_selection == "seeded":
        classes = sorted(np.random.default_rng(seed).choice(available, opts.num_classes, replace=False).tolist())
    else:
        raise AvclError(f"data.class_selection must be seeded or alphabetical, got '{opts.class_selection}'")
    label_of = {name: i for i, name in enumerate(classes)}
    labels = np.array([label_of.get(item.label, -1) for item in clips.items])
    kept = present & (labels >= 0)
    split = np.array([item.split for item in clips.items])
    train = kept & (split == "train")
    val = stratified_pick(labels, train, opts.val_fraction, np.random.default_rng(seed))
    test = kept & np.isin(split, ["val", "test"])
    rows_of = {"train": rows[train & ~val], "val": rows[val], "test": rows[test]}
    store_labels = np.full(len(store), -1)
    store_labels[rows[kept]] = labels[kept]
    ids = {name: [store.ids[r] for r in rows_of[name]] for name in rows_of}
    return dataset_from_rows(f"avk{opts.num_classes}", store, rows_of, store_labels, fields, opts.dtype, classes, {
        "annotations": str(annotations), "construction": "ours (HAD's AVK construction is not public)",
        "classes": classes, "video_ids": ids, "videos_without_audio_features": int((~present).sum())}, opts)

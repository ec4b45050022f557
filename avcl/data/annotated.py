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

Store rows are matched by id: the video id itself, or ``<id>_<start:06d>_<end:06d>`` /
``<id>_<start:06d>`` (the usual clip namings).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from avcl.data import AVDataset, register_dataset
from avcl.data.features import check_fields, dataset_from_rows, resolve_store, stratified_pick
from avcl.data.sources import data_roots
from avcl.data.store import WRITTEN
from avcl.errors import AvclError


def _find(path: str, data_root: str | None) -> Path:
    candidates = [root / path for root in data_roots(data_root)] if not Path(path).is_absolute() else []
    found = next((c for c in candidates if c.is_file()), Path(path))
    if not found.is_file():
        raise AvclError(f"annotation file not found: {path} (looked in {[str(c) for c in candidates] or [path]})")
    return found


def _store_rows(store, keys: list[list[str]], require_audio: bool) -> np.ndarray:
    """Store row of each video (first matching id among its candidate keys), -1 when absent or unusable."""
    index = {vid: row for row, vid in enumerate(store.ids)}
    usable = store.status == WRITTEN
    if require_audio and "audio" in store.fields:
        usable &= store.mask("audio")
    rows = np.full(len(keys), -1)
    for i, candidates in enumerate(keys):
        row = next((index[k] for k in candidates if k in index), -1)
        rows[i] = row if row >= 0 and usable[row] else -1
    return rows


def _clip_keys(vid: str, start: float, end: float) -> list[str]:
    s, e = int(float(start)), int(float(end))
    return [vid, f"{vid}_{s:06d}_{e:06d}", f"{vid}_{s:06d}"]


@dataclass
class AVEOptions:
    name: str = "ave"
    annotations: str = "ave/Annotations.txt"  # relative to the data root, or absolute
    store: str = "ave/snippets.h5"  # snippet features keyed by video id
    fields: Optional[List[str]] = None
    dtype: str = "float32"
    val_fraction: float = 0.1  # only without official split files
    test_fraction: float = 0.1
    require_complete: bool = True


def read_ave_annotations(path: Path) -> list[tuple[str, str, float, float]]:
    """(category, video id, start, end) per line of an AVE annotation file."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.strip().split("&")
        if not line.strip() or parts[0] == "Category":
            continue
        if len(parts) != 5:
            raise AvclError(f"{path}:{number}: expected Category&VideoID&Quality&StartTime&EndTime, got {line!r}")
        rows.append((parts[0], parts[1], float(parts[3]), float(parts[4])))
    return rows


@register_dataset("ave", AVEOptions, "AVE: Annotations.txt + a snippet feature store (HAD's AVE benchmark)")
def build_ave(opts: AVEOptions, data_root: str | None, seed: int) -> AVDataset:
    annotations = _find(opts.annotations, data_root)
    entries = read_ave_annotations(annotations)
    classes = sorted({category for category, *_ in entries})
    store = resolve_store(opts.store, data_root, opts.require_complete)
    fields = check_fields(store, opts.fields)
    rows = _store_rows(store, [[vid] for _, vid, _, _ in entries], require_audio=False)
    labels = np.array([classes.index(category) for category, *_ in entries])
    present = rows >= 0
    official = {name: annotations.parent / f"{name}Set.txt" for name in ("train", "val", "test")}
    if all(p.is_file() for p in official.values()):
        split_of = {vid: name for name, p in official.items() for _, vid, _, _ in read_ave_annotations(p)}
        splits = np.array([split_of.get(vid, "") for _, vid, _, _ in entries])
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
        "annotations": str(annotations), "split": split_source, "videos_without_features": missing})


@dataclass
class AVKOptions:
    name: str = "avk"
    annotations: str = "kinetics400/annotations.csv"  # youtube_id,time_start,time_end,label,split
    store: str = "kinetics400/snippets.h5"
    num_classes: int = 100  # AVK-100 / 200 / 400
    class_selection: str = "seeded"  # seeded | alphabetical
    val_fraction: float = 0.1  # of the train rows of each class
    fields: Optional[List[str]] = None
    dtype: str = "float32"
    require_complete: bool = True


def read_kinetics_csv(path: Path) -> list[tuple[str, float, float, str, str]]:
    """(youtube_id, start, end, label, split) per row of a Kinetics-style CSV with a header."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        needed = {"youtube_id", "time_start", "time_end", "label", "split"}
        if not reader.fieldnames or not needed <= set(reader.fieldnames):
            raise AvclError(f"{path}: needs the columns {sorted(needed)}, found {reader.fieldnames}")
        return [(r["youtube_id"], float(r["time_start"]), float(r["time_end"]), r["label"], r["split"])
                for r in reader]


@register_dataset("avk", AVKOptions, "AVK-k (our construction): Kinetics classes with audio + a snippet store")
def build_avk(opts: AVKOptions, data_root: str | None, seed: int) -> AVDataset:
    annotations = _find(opts.annotations, data_root)
    entries = read_kinetics_csv(annotations)
    store = resolve_store(opts.store, data_root, opts.require_complete)
    fields = check_fields(store, opts.fields)
    rows = _store_rows(store, [_clip_keys(vid, s, e) for vid, s, e, _, _ in entries], require_audio=True)
    present = rows >= 0
    available = sorted({entries[i][3] for i in np.flatnonzero(present)})
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
    labels = np.array([label_of.get(e[3], -1) for e in entries])
    kept = present & (labels >= 0)
    split = np.array([e[4] for e in entries])
    train = kept & (split == "train")
    val = stratified_pick(labels, train, opts.val_fraction, np.random.default_rng(seed))
    test = kept & np.isin(split, ["val", "validate", "validation", "test"])
    rows_of = {"train": rows[train & ~val], "val": rows[val], "test": rows[test]}
    store_labels = np.full(len(store), -1)
    store_labels[rows[kept]] = labels[kept]
    ids = {name: [store.ids[r] for r in rows_of[name]] for name in rows_of}
    return dataset_from_rows(f"avk{opts.num_classes}", store, rows_of, store_labels, fields, opts.dtype, classes, {
        "annotations": str(annotations), "construction": "ours (HAD's AVK construction is not public)",
        "classes": classes, "video_ids": ids, "videos_without_audio_features": int((~present).sum())})

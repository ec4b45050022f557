"""Dataset ``vggsound_stream``: the VGGSound continual pre-training stream of FLAVA/STELLA (their ``split_vggsound.py``).

Eight tasks by high-level category, in order: sports, music, vehicle, people, animals,
home_nature, others_part1, others_part2; 20 classes per task, at most 400 training clips per
class. The class choice is OUR construction (the official ``split_vggsound.py`` is not
available):

* a task name is a category of ``stat.csv`` (``class name, clip count, category``), or a group
  of categories (``groups``: ``home_nature`` = home + nature, ``others`` = others + tools);
* ``<name>_part<k>`` tasks share their pool: ``others_part1`` and ``others_part2`` are the two
  halves of the others + tools classes;
* a task's pool is the classes of its categories in ``stat.csv`` order (``class_selection:
  stat``; the file is sorted by clip count) or in a seeded order (``seeded``) that have at least
  ``min_train_per_class`` training and ``min_test_per_class`` test clips with audio in the
  store; the task takes the first ``classes_per_task`` of them (of its half, for parts);
* the class list is ordered task by task, so ``scenario.num_tasks=8`` with
  ``scenario.shuffle_classes=false`` gives the tasks above in order;
* ``max_train_per_class`` training clips of each class (a seeded choice), of which
  ``val_fraction`` (per class) are validation; every test clip of a chosen class is a test clip;
* the training clips of the classes NOT chosen become ``AVDataset.held_out`` (at most
  ``max_held_out``, a seeded choice; their labels index ``info["held_out_classes"]``), for the
  stage before the stream (config ``init``; the papers start from an AudioSet-20K model).

The clips come from an ``avcl extract --output raw`` store of the user's videos, extracted from
the same VGGSound list (store rows are matched by the clip ids ``avcl extract`` gives a VGGSound
list: ``<youtube_id>_<start_seconds:06d>``). The classes of every task, the clip ids of every
split and the counts are saved with the run (``dataset.json``).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np

from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.data import AVDataset, register_dataset
from avcl.data.annotated import _store_rows
from avcl.data.features import dataset_from_rows, require_raw, resolve_store, stratified_pick
from avcl.data.sources import find_under_roots
from avcl.data.stream import ResidencyOptions
from avcl.media.manifests import read_vggsound


TASKS = ["sports", "music", "vehicle", "people", "animals", "home_nature", "others_part1", "others_part2"]
GROUPS = {"home_nature": ["home", "nature"], "others": ["others", "tools"]}
_PART = re.compile(r"^(.+)_part(\d+)$")


@dataclass
class VGGSoundStreamOptions(ResidencyOptions):
    name: str = "vggsound_stream"
    # the official list, youtube_id,start_seconds,label,split (split train|test); a file,label list
    # (the released test.csv) is read too, its split from the file name
    csv: str = "meta/vggsound/vggsound.csv"
    stat: str = "meta/vggsound/stat.csv"  # class name, clip count, category (VGGSound's stat.csv)
    store: str = "vggsound/raw.h5"  # avcl extract --output raw of the videos of `csv`
    tasks: List[str] = field(default_factory=lambda: list(TASKS))
    groups: Dict[str, List[str]] = field(default_factory=lambda: {k: list(v) for k, v in GROUPS.items()})
    classes_per_task: int = option(20, range=">=1")
    class_selection: str = "stat"  # stat: stat.csv order (by clip count) | seeded
    allow_fewer: bool = False  # a task with fewer usable classes: every task gets that many (else an error)
    min_train_per_class: int = 1  # a class is usable with this many training clips with audio in the store,
    min_test_per_class: int = 1  # and this many test clips
    max_train_per_class: int = 400
    val_fraction: float = option(0.0, range="[0,1)")  # of each class's training clips
    max_held_out: int = 20000  # training clips of the other classes kept for the init stage (0: none)
    dtype: str = "float16"  # audio in memory (frames stay uint8)
    require_complete: bool = True


def _find(path: str, data_root: str | None, key: str) -> Path:
    found = find_under_roots(path, data_root)
    if not found.is_file():
        raise AvclError(f"data.{key}: file not found: {path} (looked under the data root and as given)")
    return found


def read_stat(path: Path) -> list[tuple[str, str]]:
    """(class name, category) of every row of VGGSound's ``stat.csv``, in file order."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            row = [c.strip() for c in row]
            if not any(row):
                continue
            if len(row) != 3 or not row[0] or not row[2]:
                raise AvclError(f"{path}:{line}: expected 'class name,count,category', got {row}")
            if not row[1].isdigit():
                if line == 1:  # a header
                    continue
                raise AvclError(f"{path}:{line}: clip count is not a number: '{row[1]}'")
            rows.append((row[0], row[2]))
    if not rows:
        raise AvclError(f"{path}: no classes")
    names = [name for name, _ in rows]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise AvclError(f"{path}: class(es) listed twice: {twice}")
    return rows


def task_categories(tasks: list[str], groups: dict[str, list[str]], categories: set[str]) -> list[tuple[str, int, int]]:
    """For each task: (pool name, part index from 1, number of parts of that pool); checks the names."""
    if not tasks:
        raise AvclError("data.tasks is empty")
    if len(set(tasks)) != len(tasks):
        raise AvclError(f"data.tasks lists a task twice: {tasks}")
    parsed = [(m[1], int(m[2])) if (m := _PART.match(task)) else (task, 0) for task in tasks]
    parts_of: dict[str, list[int]] = {}
    for base, part in parsed:
        parts_of.setdefault(base, []).append(part)
    seen: dict[str, str] = {}
    for base, parts in parts_of.items():
        if parts != [0] and sorted(parts) != list(range(1, len(parts) + 1)):
            raise AvclError(f"data.tasks: the tasks of '{base}' must be {base}_part1 .. {base}_partN, without "
                            f"'{base}' itself (got {[t for t, (b, _) in zip(tasks, parsed) if b == base]})")
        unknown = [c for c in groups.get(base, [base]) if c not in categories]
        if unknown:
            raise AvclError(f"data.tasks: '{base}' names unknown categor{'ies' if len(unknown) > 1 else 'y'} "
                            f"{unknown} (stat.csv categories: {', '.join(sorted(categories))}; "
                            f"data.groups: {groups})")
        for category in groups.get(base, [base]):
            if seen.setdefault(category, base) != base:
                raise AvclError(f"data.tasks: category '{category}' is in two tasks ('{seen[category]}' and '{base}')")
    return [(base, max(part, 1), len(parts_of[base]) if part else 1) for base, part in parsed]


@register_dataset("vggsound_stream", VGGSoundStreamOptions,
                  "the VGGSound continual pre-training stream (8 category tasks, our class choice) on a raw store")
def build_vggsound_stream(opts: VGGSoundStreamOptions, data_root: str | None, seed: int) -> AVDataset:
    if opts.classes_per_task < 1 or opts.max_train_per_class < 1 or opts.max_held_out < 0:
        raise AvclError("data.classes_per_task and data.max_train_per_class must be >= 1, data.max_held_out >= 0")
    if not 0 <= opts.val_fraction < 1:
        raise AvclError(f"data.val_fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.class_selection not in ("stat", "seeded"):
        raise AvclError(f"data.class_selection must be stat or seeded, got '{opts.class_selection}'")
    stat_path, csv_path = _find(opts.stat, data_root, "stat"), _find(opts.csv, data_root, "csv")
    stat = read_stat(stat_path)
    groups = {str(k): [str(c) for c in v] for k, v in dict(opts.groups).items()}
    plan = task_categories([str(t) for t in opts.tasks], groups, {category for _, category in stat})

    clips = read_vggsound(csv_path)
    store = resolve_store(opts.store, data_root, opts.require_complete)
    require_raw(store)
    items = clips.items
    rows = _store_rows(store, [item.id for item in items], require_audio=True)
    present = rows >= 0
    if not present.any():
        raise AvclError(f"{store.path}: none of the {len(items)} clips of {csv_path} is in the store with audio "
                        "(extract the videos of that list: avcl extract CSV --video-dir VIDEOS --preset cav "
                        "--output raw)")
    label_names = np.array([item.label for item in items])
    split = np.array([item.split for item in items])
    names, label = np.unique(label_names, return_inverse=True)  # label: index into `names`
    per_class = {s: np.bincount(label[present & (split == s)], minlength=len(names)) for s in ("train", "test")}
    counts = {name: (int(per_class["train"][i]), int(per_class["test"][i])) for i, name in enumerate(names)}

    # ---- the classes of every task
    rng = np.random.default_rng(seed)
    usable = {name for name, (train, test) in counts.items()
              if train >= opts.min_train_per_class and test >= opts.min_test_per_class}
    pools: dict[str, list[str]] = {}
    for base, _, _ in plan:
        if base not in pools:
            wanted = set(groups.get(base, [base]))
            pool = [name for name, category in stat if category in wanted]
            if opts.class_selection == "seeded":
                pool = [pool[i] for i in rng.permutation(len(pool))]
            pools[base] = pool
    candidates = []  # per task: (name, its categories, its usable classes, the pool's size)
    for (base, part, parts), task in zip(plan, opts.tasks):
        pool = pools[base]
        halves = np.array_split(np.array([c for c in pool if c in usable], dtype=object), parts)
        candidates.append((task, groups.get(base, [base]), list(halves[part - 1]), len(pool) // parts))
    per_task = opts.classes_per_task
    short = [(task, cats, len(found), size) for task, cats, found, size in candidates if len(found) < per_task]
    if short and not opts.allow_fewer:
        task, cats, found, size = short[0]
        raise AvclError(f"data.tasks: task '{task}' (categories {cats}) has {found} usable classes (>= "
                        f"{opts.min_train_per_class} train and >= {opts.min_test_per_class} test clips with audio "
                        f"in {store.path}) of {size} in {stat_path.name}; data.classes_per_task={per_task} needs "
                        f"{per_task} (or set data.allow_fewer=true)"
                        + (f"; also short: {[(t, n) for t, _, n, _ in short[1:]]}" if len(short) > 1 else ""))
    per_task = min([per_task] + [len(found) for _, _, found, _ in candidates])
    if per_task == 0:
        empty = [task for task, _, found, _ in candidates if not found]
        raise AvclError(f"data.tasks: task(s) {empty} have no usable classes in {store.path}")
    tasks = [{"name": task, "categories": cats, "classes": [str(c) for c in found[:per_task]],
              "usable_classes": len(found)} for task, cats, found, _ in candidates]
    class_names = [c for t in tasks for c in t["classes"]]

    # ---- splits: capped train (val out of it) and all test clips of the chosen classes; held-out
    index_of = {name: i for i, name in enumerate(class_names)}
    stream_label = np.array([index_of.get(str(n), -1) for n in names])[label]
    chosen, train_all = stream_label >= 0, present & (split == "train")
    capped = np.zeros(len(items), dtype=bool)
    for c in range(len(class_names)):  # dataset construction only: one seeded choice per class
        where = rng.permutation(np.flatnonzero(train_all & (stream_label == c)))
        capped[where[:opts.max_train_per_class]] = True
    val = stratified_pick(stream_label, capped, opts.val_fraction, rng) | (present & chosen & (split == "val"))
    train, test = capped & ~val, present & chosen & (split == "test")
    if not train.any() or not test.any():
        raise AvclError(f"{csv_path}: no {'training' if not train.any() else 'test'} clips of the chosen classes "
                        f"in {store.path} (splits in the list: {sorted(set(split.tolist()))}; the stream needs the full list "
                        "with its train and test rows, e.g. VGGSound's vggsound.csv)")
    others = np.flatnonzero(train_all & ~chosen)
    held = np.sort(rng.permutation(others)[:opts.max_held_out])
    held_classes = sorted({str(n) for n in label_names[held]})
    held_index = {name: i for i, name in enumerate(held_classes)}

    store_labels = np.full(len(store), -1, dtype=np.int64)
    store_labels[rows[chosen & present]] = stream_label[chosen & present]
    store_labels[rows[held]] = [held_index[str(n)] for n in label_names[held]]
    rows_of = {"train": rows[train], "val": rows[val], "test": rows[test]}
    ids = {s: [items[i].id for i in np.flatnonzero(mask)] for s, mask in
           (("train", train), ("val", val), ("test", test))}
    if len(held):
        rows_of["held_out"], ids["held_out"] = rows[held], [items[i].id for i in held]
    return dataset_from_rows("vggsound_stream", store, rows_of, store_labels, ["audio", "video"], opts.dtype,
                             class_names, {
        "construction": "ours (split_vggsound.py is not available): per task, the first classes of its "
                        f"categories in {'stat.csv' if opts.class_selection == 'stat' else 'a seeded'} order "
                        "with clips in the store",
        "csv": str(csv_path), "stat": str(stat_path), "classes_per_task": per_task, "tasks": tasks,
        "held_out_classes": held_classes,
        "counts": {s: len(v) for s, v in ids.items()},
        "clips_without_store_audio": int((~present).sum()),
        "video_ids": ids}, opts)

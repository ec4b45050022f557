"""Class-incremental scenario: classes split into tasks, each with its own train/val/test.

Labels are remapped to the position of the class in the class order, so task t holds the
contiguous label range ``[offset_t, offset_t + size_t)`` and a growing classifier only ever
appends rows. ``class_order[new_label]`` gives the dataset's original label back.

Config ``scenario`` (``from_config``):

* ``num_tasks`` equal tasks, or with ``first_task_classes`` > 0 a base task of that many classes
  plus ``num_tasks - 1`` equal increments (PyCIL's "B50-10" style: e.g. 10 classes,
  ``first_task_classes=4``, ``num_tasks=4`` -> 4 + 2 + 2 + 2); a split that does not divide is
  refused with a message naming both keys. ``initial_classes`` is the older name of the same key
  (configs of earlier runs still load); giving both with different values is refused.
* ``blurry`` (pre-training stream only): a fraction in [0, 1) of each task's *training* clips
  moved to the training data of another task, drawn uniformly among the other tasks (seeded by
  ``seed``), so each task's stream holds about that share of clips of classes that are not its
  own, and task boundaries blur (the "Blurry-M" setting of Rainbow Memory / i-Blurry, with
  M = 100 x blurry). Which classes a task owns is unchanged, and so are the val and test data and
  every evaluation (grouped by class). A label-free model only: a class-incremental head learns a
  task's classes at that task's step. ``train.epochs=1`` makes it a single pass over the stream
  (online: every clip is seen once, at its place in the stream).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional

import numpy as np
import torch

from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.core.samples import Samples, concat, select
from avcl.data import AVDataset


@dataclass
class ScenarioConfig:
    """The ``scenario`` section (``from_config``)."""
    num_tasks: int = option(5, range=">=1")
    first_task_classes: int = 0  # classes in the first (base) task, the rest split over num_tasks-1; 0 = equal
    initial_classes: int = 0  # older name of first_task_classes (configs of earlier runs)
    class_order: Optional[List[int]] = None  # explicit order; None = see shuffle_classes
    shuffle_classes: bool = True  # None order: a permutation seeded by `seed`, else natural order
    # pre-training stream: fraction in [0, 1) of each task's training clips moved to other tasks
    # (blurry task boundaries; avcl/data/scenario.py). Online: train.epochs=1
    blurry: float = option(0.0, range="[0,1)")


@dataclass
class Task:
    index: int
    classes: list[int]  # remapped labels of this task's classes
    train: Samples
    val: Samples
    test: Samples


@dataclass
class Scenario:
    tasks: list[Task]
    class_order: list[int]  # remapped label -> original dataset label
    class_names: list[str]  # in remapped order
    info: dict = field(default_factory=dict)  # the dataset's provenance (AVDataset.info)
    held_out: Samples = field(default_factory=dict)  # clips kept out of the stream (AVDataset.held_out)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    def task_of_class(self) -> torch.Tensor:
        """(num_classes,) task index of each remapped label."""
        owner = torch.empty(self.num_classes, dtype=torch.long)
        for task in self.tasks:
            owner[task.classes] = task.index
        return owner


def task_sizes(num_classes: int, num_tasks: int, first_task_classes: int = 0) -> list[int]:
    """Equal split, or a base task of ``first_task_classes`` plus equal increments."""
    if first_task_classes < 0:
        raise AvclError(f"bad config: 'scenario.first_task_classes' must be >= 0 (0: equal tasks), "
                        f"got {first_task_classes}")
    if first_task_classes:
        rest, steps = num_classes - first_task_classes, num_tasks - 1
        if rest < 0 or (steps == 0 and rest) or (steps and (rest <= 0 or rest % steps)):
            divisors = [k + 1 for k in range(1, rest + 1) if rest % k == 0] if rest > 0 else []
            hint = (f"; with {first_task_classes} in the first task, num_tasks can be one of {divisors}"
                    if divisors else f"; first_task_classes must be below {num_classes}")
            raise AvclError(f"cannot split {num_classes} classes into a first task of {first_task_classes} "
                            f"plus {steps} equal tasks (scenario.first_task_classes={first_task_classes}, "
                            f"scenario.num_tasks={num_tasks}){hint}")
        return [first_task_classes] + [rest // steps] * steps if steps else [first_task_classes]
    if num_classes % num_tasks:
        raise AvclError(f"cannot split {num_classes} classes into {num_tasks} equal tasks "
                        "(set scenario.num_tasks to a divisor, or scenario.first_task_classes)")
    return [num_classes // num_tasks] * num_tasks


def check_class_splits(dataset: AVDataset) -> None:
    """Every class has train and test clips, and val clips when the dataset has any: a class with none
    would leave an empty cell (NaN) in the accuracy matrix, or no data to learn it from."""
    counts = {name: torch.bincount(getattr(dataset, name)["label"].long().cpu(), minlength=dataset.num_classes)
              if getattr(dataset, name) and len(getattr(dataset, name)["label"]) else torch.zeros(dataset.num_classes,
                                                                                                  dtype=torch.long)
              for name in ("train", "val", "test")}
    needed = ("train", "test") + (("val",) if counts["val"].sum() > 0 else ())
    for split in needed:
        empty = torch.nonzero(counts[split] == 0).flatten().tolist()
        if empty:
            names = ", ".join(f"'{dataset.class_names[c]}'" for c in empty[:10]) + (" ..." if len(empty) > 10 else "")
            noun = "class" if len(empty) == 1 else f"{len(empty)} classes"
            raise AvclError(f"{noun} {names} of dataset '{dataset.name}' {'has' if len(empty) == 1 else 'have'} no "
                            f"{split} clips (train/val/test clips of the first: {counts['train'][empty[0]]}/"
                            f"{counts['val'][empty[0]]}/{counts['test'][empty[0]]}): every class needs train and "
                            "test clips, and val clips when any class has some; fix the dataset's splits (or leave "
                            "the class out)")


def class_incremental(dataset: AVDataset, num_tasks: int, first_task_classes: int = 0,
                      class_order: list[int] | None = None, shuffle_classes: bool = True,
                      seed: int = 0) -> Scenario:
    n = dataset.num_classes
    check_class_splits(dataset)
    if class_order is None:
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
                 if shuffle_classes else list(range(n)))
    else:
        order = [int(c) for c in class_order]
        if sorted(order) != list(range(n)):
            raise AvclError(f"scenario.class_order must be a permutation of 0..{n - 1}, got {order}")
    remap = torch.empty(n, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(n)

    def relabel(samples: Samples) -> Samples:
        return {**samples, "label": remap[samples["label"]]}

    splits = {name: relabel(getattr(dataset, name)) for name in ("train", "val", "test")}
    tasks, offset = [], 0
    for index, size in enumerate(task_sizes(n, num_tasks, first_task_classes)):
        classes = list(range(offset, offset + size))

        def part(samples: Samples) -> Samples:
            labels = samples["label"]
            return select(samples, (labels >= offset) & (labels < offset + size))

        tasks.append(Task(index, classes, part(splits["train"]), part(splits["val"]), part(splits["test"])))
        offset += size
    # held-out clips keep the dataset's labels: they may come from other classes (VGGSound's held-out
    # classes), and the label-free init stage never reads them
    return Scenario(tasks, order, [dataset.class_names[c] for c in order], dataset.info, dataset.held_out)


def merged_task(scenario: Scenario) -> Task:
    """Every task's data as one task (the multitask upper bound's single step)."""
    return Task(0, list(range(scenario.num_classes)),
                *(concat([getattr(t, split) for t in scenario.tasks]) for split in ("train", "val", "test")))


def blur(scenario: Scenario, fraction: float, seed: int = 0) -> Scenario:
    """Move ``fraction`` of each task's training clips to another task's, chosen uniformly among
    the other tasks (module docstring: ``scenario.blurry``). Val, test and class ownership stay."""
    if not 0 <= fraction < 1:
        raise AvclError(f"bad config: 'scenario.blurry' must be in [0, 1) (the fraction of each task's training "
                        f"clips moved to other tasks), got {fraction}")
    tasks = scenario.tasks
    if fraction == 0 or len(tasks) < 2:
        return scenario
    rng = np.random.default_rng([seed, 0xB1])
    kept, arrivals = [], [[] for _ in tasks]
    moved = [[0] * len(tasks) for _ in tasks]  # moved[src][dst]
    for t, task in enumerate(tasks):
        n = len(task.train["label"])
        leaving = np.zeros(n, dtype=bool)
        leaving[rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
        dest = rng.integers(0, len(tasks) - 1, size=n)
        dest += dest >= t  # uniform over the other tasks
        kept.append(select(task.train, torch.from_numpy(~leaving)))
        for d in range(len(tasks)):
            go = leaving & (dest == d)
            if go.any():
                arrivals[d].append(select(task.train, torch.from_numpy(go)))
                moved[t][d] = int(go.sum())
    new_tasks = [replace(task, train=concat([kept[t]] + arrivals[t])) for t, task in enumerate(tasks)]
    info = {**scenario.info, "blurry": {"fraction": fraction, "moved_train_clips": moved,
                                        "foreign_train_clips": [sum(moved[s][t] for s in range(len(tasks)))
                                                                for t in range(len(tasks))]}}
    return replace(scenario, tasks=new_tasks, info=info)


def from_config(dataset: AVDataset, cfg) -> Scenario:
    """The scenario of a run config (section ``scenario``; module docstring), validated by ``avcl.config.validate``
    (a split that the dataset's classes do not divide raises AvclError here)."""
    sc = cfg.scenario
    scenario = class_incremental(dataset, sc.num_tasks, int(sc.first_task_classes or sc.initial_classes or 0),
                                 list(sc.class_order) if sc.class_order is not None else None,
                                 sc.shuffle_classes, cfg.seed)
    return blur(scenario, float(sc.blurry or 0.0), cfg.seed)

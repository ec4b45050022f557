"""Class-incremental scenario: classes split into tasks, each with its own train/val/test.

Labels are remapped to the position of the class in the class order, so task t holds the
contiguous label range ``[offset_t, offset_t + size_t)`` and a growing classifier only ever
appends rows. ``class_order[new_label]`` gives the dataset's original label back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from avcl.data import AVDataset
from avcl.data.samples import Samples, concat, select
from avcl.errors import AvclError


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


def task_sizes(num_classes: int, num_tasks: int, initial_classes: int = 0) -> list[int]:
    """Equal split, or a base task of ``initial_classes`` plus equal increments."""
    if initial_classes:
        rest, steps = num_classes - initial_classes, num_tasks - 1
        if rest < 0 or (steps == 0 and rest) or (steps and (rest <= 0 or rest % steps)):
            raise AvclError(f"cannot split {num_classes} classes into a base task of {initial_classes} "
                            f"plus {steps} equal tasks (scenario.initial_classes / scenario.num_tasks)")
        return [initial_classes] + [rest // steps] * steps if steps else [initial_classes]
    if num_classes % num_tasks:
        raise AvclError(f"cannot split {num_classes} classes into {num_tasks} equal tasks "
                        "(set scenario.num_tasks to a divisor, or scenario.initial_classes)")
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


def class_incremental(dataset: AVDataset, num_tasks: int, initial_classes: int = 0,
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
    for index, size in enumerate(task_sizes(n, num_tasks, initial_classes)):
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

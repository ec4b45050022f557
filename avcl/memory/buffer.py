"""Exemplar memory: a fixed total budget shared equally by all classes seen so far.

After each task the per-class quota is recomputed as ``budget // seen_classes``; old classes
keep the first ``quota`` of their exemplars (selection order is kept, so herding's best
picks survive), and the new classes get ``quota`` fresh picks. ``budget=None`` keeps every
sample (used by the joint upper bound).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from avcl.core.samples import Samples, concat, num_samples, resident, select


SELECTIONS = ("random", "herding")


def herding(features: torch.Tensor, count: int) -> torch.Tensor:
    """iCaRL herding: greedily pick samples whose running mean stays closest to the class mean."""
    features = F.normalize(features.float(), dim=1)
    target = features.mean(dim=0)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool)
    for k in range(1, min(count, len(features)) + 1):
        candidate_means = (running[None] + features) / k
        distance = (candidate_means - target[None]).norm(dim=1)
        distance[~available] = float("inf")
        pick = int(distance.argmin())
        chosen.append(pick)
        available[pick] = False
        running += features[pick]
    return torch.tensor(chosen, dtype=torch.long)


class ExemplarMemory:
    def __init__(self, budget: int | None, selection: str = "random"):
        if selection not in SELECTIONS:
            raise ValueError(f"unknown exemplar selection '{selection}' (known: {SELECTIONS})")
        self.budget, self.selection = budget, selection
        self.samples: Samples = {}

    def __len__(self) -> int:
        return num_samples(self.samples) if self.samples else 0

    def classes(self) -> list[int]:
        return sorted(self.samples["label"].unique().tolist()) if self.samples else []

    def update(self, data: Samples, embed: Callable[[Samples], torch.Tensor] | None = None,
               generator: torch.Generator | None = None) -> None:
        """Add the classes of ``data`` (the task just learned) and shrink old classes to the new quota.

        ``embed`` maps a batch to features; herding needs it. ``generator`` drives random picks.
        """
        new_classes = data["label"].unique().tolist()
        seen = len(set(self.classes()) | set(new_classes))
        quota = None if self.budget is None else self.budget // max(seen, 1)
        parts = []
        for c in self.classes():  # old classes: truncate, keeping the earliest (best) picks
            rows = select(self.samples, self.samples["label"] == c)
            parts.append(rows if quota is None else select(rows, torch.arange(min(quota, num_samples(rows)))))
        for c in new_classes:
            rows = select(data, data["label"] == c)
            count = num_samples(rows) if quota is None else min(quota, num_samples(rows))
            if count == 0:
                continue
            if self.selection == "herding" and quota is not None:
                order = herding(embed(rows), count)
            else:
                order = torch.randperm(num_samples(rows), generator=generator)[:count]
            parts.append(select(rows, order))
        self.samples = resident(concat(parts))  # a streamed task's exemplars are read: memories stay resident

    def state_dict(self) -> dict:
        return {"budget": self.budget, "selection": self.selection, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.budget, self.selection, self.samples = state["budget"], state["selection"], state["samples"]

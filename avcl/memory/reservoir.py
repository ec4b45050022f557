"""Task-free reservoir buffer (as the STELLA code's ``utils/buffer.py``), shared by every label-free method.

Every row offered counts as one presentation (``seen``); a clip met again in a later epoch is
offered again. The first ``capacity`` rows fill slots 0, 1, ... in order; after that the row
with global index ``n`` draws ``j ~ U{0..n}`` and replaces slot ``j`` when ``j < capacity``.
``add`` does this for a whole batch at once (one draw per row, all rows of the batch drawn
together) and writes each slot once, with the last of the batch's rows that hit it, so the
result is the one of the sequential algorithm. ``sample(k)`` draws ``min(k, len)`` filled slots
uniformly without replacement. Both draws use the buffer's own ``torch.Generator`` (seeded by
``seed``), whose state is part of ``state_dict`` so a resumed run draws the same slots.

Rows are dicts of per-row tensors (prepared audio/video, embeddings, scores...); the fields are
fixed by the first ``add``, which allocates ``(capacity, ...)`` storage with the rows' dtype on
the rows' device (the STELLA code keeps float32 arrays on the CPU; here the buffer lives where
the data does, so replay costs no host-device copy).
"""
from __future__ import annotations

from typing import Optional

import torch

from avcl.core.samples import Samples


class ReservoirBuffer:
    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 0:
            raise ValueError(f"reservoir capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.seen = 0  # rows offered so far (presentations, not unique clips)
        self.storage: Samples = {}
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    @property
    def device(self) -> Optional[torch.device]:
        return next(iter(self.storage.values())).device if self.storage else None

    # ----- insertion -----------------------------------------------------------------------
    def add(self, rows: Samples) -> None:
        """Offer every row of ``rows`` (a dict of tensors with a shared first dim) to the reservoir."""
        if not rows:
            return
        count = len(next(iter(rows.values())))
        if count == 0:
            return
        index = self.seen + torch.arange(count, dtype=torch.float64)  # global index n + i of each row
        draw = (torch.rand(count, dtype=torch.float64, generator=self.generator) * (index + 1)).floor()
        slots = torch.where(index < self.capacity, index, torch.minimum(draw, index)).long()
        self.seen += count
        keep = slots < self.capacity
        if not bool(keep.any()):
            return
        # a slot hit by several rows of the batch keeps the last of them (sequential order)
        order = torch.arange(count)
        last = torch.full((self.capacity,), -1, dtype=torch.long)
        last.scatter_reduce_(0, slots[keep], order[keep], reduce="amax")
        winners = order[keep][last[slots[keep]] == order[keep]]
        self._ensure_storage(rows)
        target = slots[winners]
        for key, value in rows.items():
            store = self.storage[key]
            store[target.to(store.device)] = value[winners.to(value.device)].detach().to(store.device, store.dtype)

    def _ensure_storage(self, rows: Samples) -> None:
        if not self.storage:
            self.storage = {key: torch.zeros((self.capacity, *value.shape[1:]), dtype=value.dtype,
                                             device=value.device) for key, value in rows.items()}
            return
        if set(rows) != set(self.storage):
            raise ValueError(f"reservoir rows must keep the fields {sorted(self.storage)}, got {sorted(rows)}")
        device = next(iter(rows.values())).device
        if self.device != device:  # e.g. resumed from a CPU checkpoint while training on a GPU
            self.storage = {key: value.to(device) for key, value in self.storage.items()}

    # ----- retrieval / editing --------------------------------------------------------------
    def sample(self, k: int) -> tuple[torch.Tensor, Samples]:
        """``min(k, len)`` distinct filled slots drawn uniformly, and their rows."""
        k = min(int(k), len(self))
        slots = torch.randperm(len(self), generator=self.generator)[:k]
        if not self.storage:
            return slots, {}
        slots = slots.to(self.device)
        return slots, {key: value[slots] for key, value in self.storage.items()}

    def write(self, slots: torch.Tensor, rows: Samples) -> None:
        """Overwrite the given fields of ``slots`` (e.g. GMED's edited inputs); not a new presentation."""
        for key, value in rows.items():
            if key not in self.storage:
                raise KeyError(f"reservoir has no field '{key}' (fields: {sorted(self.storage)})")
            store = self.storage[key]
            store[slots.to(store.device)] = value.detach().to(store.device, store.dtype)

    def rows(self) -> Samples:
        """All filled rows (a view of the storage)."""
        return {key: value[:len(self)] for key, value in self.storage.items()}

    # ----- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        full = len(self) == self.capacity  # a view of part of the storage would save all of it
        rows = {key: value if full else value.clone() for key, value in self.rows().items()}
        return {"capacity": self.capacity, "seen": self.seen, "rows": rows,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.seen = int(state["capacity"]), int(state["seen"])
        self.generator.set_state(state["generator"])
        filled = state["rows"]
        self.storage = {}
        for key, value in filled.items():
            store = torch.zeros((self.capacity, *value.shape[1:]), dtype=value.dtype, device=value.device)
            store[:len(value)] = value
            self.storage[key] = store

"""Per-rank random streams inside a training step (what each rank draws for its own rows), beside the shared
stream every rank draws alike (permutations, replay picks, exemplar selection)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from avcl.parallel.group import current


class RankRandom:
    """Each rank's own random stream for what its step draws for its rows (CAV-MAE/XKD masks, crops, noise).

    The default generators (CPU, and the rank's CUDA device) are the *shared* stream: the same seed and
    the same draws on every rank, so permutations, replay picks and exemplar selection agree. Left
    alone, every rank's step would draw the same masks for its slice as every other rank (the same
    state, the same number of rows): correlated augmentations. So inside a step the default generators
    are swapped for this rank's own (seeded by seed, rank and task), and swapped back after: the shared
    stream advances only by the trainer's draws, identically on every rank. A draw that must agree
    across ranks inside a step (CLS-ER's EMA update coin) goes through ``shared_random()``."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device if device.type == "cuda" else None
        with torch.random.fork_rng(devices=[self.device] if self.device is not None else []):
            torch.manual_seed(seed)
            self.cpu = torch.get_rng_state()
            self.cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None
        self.inside = False  # within a step (the rank's stream is the default one)

    def _swap(self) -> None:
        cpu, cuda = torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.device is not None else None)
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        self.cpu, self.cuda = cpu, cuda

    @contextlib.contextmanager
    def swapped(self):
        self._swap()
        self.inside = True
        try:
            yield
        finally:
            self.inside = False
            self._swap()


_RANDOM: Optional[RankRandom] = None


def seed_rank_random(seed: int, task: int, device: torch.device) -> None:
    """A fresh rank stream for a task (from seed, rank and task: a resumed task draws the same)."""
    global _RANDOM
    group = current()
    if group is not None:
        _RANDOM = RankRandom(seed * 1_000_003 + 7919 * (task + 1) + 104_729 * (group.rank + 1), device)


def rank_random_state() -> Optional[dict]:
    """This rank's own stream (a mid-task checkpoint keeps it); None in one process."""
    if _RANDOM is None:
        return None
    return {"cpu": _RANDOM.cpu, **({"cuda": _RANDOM.cuda} if _RANDOM.cuda is not None else {})}


def set_rank_random_state(state: Optional[dict]) -> None:
    if _RANDOM is not None and state is not None:
        _RANDOM.cpu = state["cpu"]
        if "cuda" in state and _RANDOM.device is not None:
            _RANDOM.cuda = state["cuda"]


@contextlib.contextmanager
def shared_random():
    """Inside a step, draw from the shared stream (the same on every rank); a no-op elsewhere."""
    if _RANDOM is None or not _RANDOM.inside:
        yield
        return
    _RANDOM._swap()
    try:
        yield
    finally:
        _RANDOM._swap()


def rank_stream():
    """The context of a training step: this rank's own stream as the default generators (when several processes
    run), the shared stream back after it."""
    return _RANDOM.swapped() if _RANDOM is not None else contextlib.nullcontext()

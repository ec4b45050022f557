"""Per-rank reservoirs (label-free methods): each rank keeps its share of ``memory.size`` slots with its own
seed, as the STELLA code keeps one buffer of M / GPUs per rank; the checkpoint holds every rank's, and a
resume with another number of processes deals the stored rows out again."""
from __future__ import annotations

import torch
import torch.distributed as dist

from avcl import parallel
from avcl.memory.reservoir import ReservoirBuffer


def memory_share(size: int) -> int:
    """This rank's reservoir slots: the budget divided by the number of processes (M / GPUs)."""
    w, r = parallel.world(), parallel.rank()
    return size // w + (r < size % w)


def memory_seed(seed: int) -> int:
    """This rank's reservoir seed: ranks keep different shards, so they draw their slots independently."""
    return seed + 1_000_003 * parallel.rank()


def rank_memory(memory) -> dict:
    """``{"rank_memory": [state of rank 0's reservoir, rank 1's, ...]}`` on rank 0 for the checkpoint (a
    collective: every rank calls it); ``{}`` in one process or for a memory that is not a reservoir."""
    group = parallel.current()
    if group is None or not isinstance(memory, ReservoirBuffer):
        return {}
    state = _tensors_to_cpu(memory.state_dict())
    every = [None] * group.world if group.rank == 0 else None
    with parallel.collective("gathering the ranks' reservoirs"):
        dist.gather_object(state, every, dst=0)
    return {"rank_memory": every} if group.rank == 0 else {}


def _tensors_to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _tensors_to_cpu(v) for k, v in obj.items()}
    return obj


def load_rank_memory(memory, state: dict, seed: int) -> None:
    """Resume each rank's reservoir from a checkpoint of W' processes: with W' = W, rank r's own; else
    every stored row dealt round-robin to the W ranks (rank r: rows r, r + W, ...), each keeping at most
    its share of slots, with the presentations seen split evenly and a fresh generator (from ``seed``, the
    run's). A memory that is not a reservoir is left alone."""
    saved = state.get("rank_memory")
    if not saved or not isinstance(memory, ReservoirBuffer):
        return
    w, r = parallel.world(), parallel.rank()
    if len(saved) == w:
        memory.load_state_dict(saved[r])
        return
    rows = {key: torch.cat([s["rows"][key] for s in saved if s["rows"]]) for key in saved[0]["rows"]}
    capacity = memory_share(sum(s["capacity"] for s in saved))
    mine = {key: value[r::w][:capacity] for key, value in rows.items()}
    generator = torch.Generator()
    generator.manual_seed(memory_seed(int(seed)) + 7919 * len(saved))
    memory.load_state_dict({"capacity": capacity, "seen": max(sum(s["seen"] for s in saved) // w,
                                                               len(next(iter(mine.values()), []))),
                            "rows": mine, "generator": generator.get_state()})

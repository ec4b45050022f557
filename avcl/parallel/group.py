"""The process group: who this process is (rank, world), joining and leaving, collectives that fail as one
line naming the rank that stopped, and the few whole-group operations (barrier, average, gather)."""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from avcl.core.device import pick_device
from avcl.core.errors import AvclError


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    pids: list  # "host:pid" of every rank (to name the one that stopped)


_DIST: Optional[Dist] = None


class RankFailure(AvclError):
    """A collective failed: another rank stopped, or none answered within train.dist_timeout."""


def launched() -> bool:
    """True under torchrun (or any launcher setting the same variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def current() -> Optional[Dist]:
    return _DIST


def world() -> int:
    return _DIST.world if _DIST else 1


def rank() -> int:
    return _DIST.rank if _DIST else 0


def is_main() -> bool:
    """Whether this process writes (config, events, metrics, plots, checkpoints, logs): rank 0, or the only one."""
    return _DIST is None or _DIST.rank == 0


def setup(train_cfg) -> Optional[Dist]:
    """Join the process group torchrun describes (no-op with one process); returns it.

    Each rank runs on its device: ``cuda:LOCAL_RANK`` when the run is on CUDA, else the CPU.
    """
    global _DIST
    if _DIST is not None or not launched():
        return _DIST
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise AvclError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {key} is not set: start several processes "
                            "with torchrun (torchrun --nproc-per-node N -m avcl run ...)")
    rank_, world_, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(train_cfg.device)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise AvclError(f"LOCAL_RANK={local}, but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                            "start at most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise AvclError(f"several processes run on CUDA (NCCL) or the CPU (gloo), not on {device.type}: "
                        "set train.device=cuda or cpu")
    timeout = datetime.timedelta(seconds=float(train_cfg.dist_timeout))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                            **({"device_id": device} if device.type == "cuda" else {}))
    pids = [None] * world_
    dist.all_gather_object(pids, f"{socket.gethostname()}:{os.getpid()}")
    _DIST = Dist(rank_, world_, local, device, pids)
    # torchrun stops the other ranks with SIGTERM when one fails: say so in one line, not a traceback
    signal.signal(signal.SIGTERM, _on_sigterm)
    return _DIST


def close() -> None:
    """Leave the process group (end of the run)."""
    global _DIST
    if _DIST is not None:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        _DIST = None


def speaks(err: Exception) -> bool:
    """Whether this process prints ``err``: every error in one process; with several, the errors every
    rank meets alike (bad input) from rank 0 only, and a rank failure from the lowest rank still running."""
    if _DIST is None:
        return True
    if not isinstance(err, RankFailure):
        return _DIST.rank == 0
    alive = [r for r in range(_DIST.world) if r not in stopped_ranks()]
    return _DIST.rank == min(alive)


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise RankFailure(failure_message("stopped by torchrun"))


def stopped_ranks() -> list[int]:
    """Ranks of this host whose process is gone (or a zombie); other hosts' ranks cannot be checked here."""
    if _DIST is None:
        return []
    host, gone = socket.gethostname(), []
    for r, entry in enumerate(_DIST.pids):
        where, _, pid = entry.rpartition(":")
        if where != host or r == _DIST.rank:
            continue
        stat = Path(f"/proc/{pid}/stat")
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            gone.append(r)
            continue
        if state in ("Z", "X"):
            gone.append(r)
    return gone


def failure_message(what: str) -> str:
    gone = stopped_ranks()
    who = (", ".join(f"rank {r} (pid {_DIST.pids[r].rpartition(':')[2]})" for r in gone) + " stopped"
           if gone else "another rank stopped or stalled (torchrun's summary names it)")
    return (f"rank {rank()}: {what}: {who}; the run stops here and resumes with any number of processes: "
            f"avcl run --resume RUN_DIR")


@contextlib.contextmanager
def collective(what: str):
    """Turn a failing collective (a peer died, or the timeout passed) into one RankFailure line."""
    try:
        yield
    except RankFailure:
        raise
    except (RuntimeError, OSError) as err:
        if _DIST is None or not is_collective_error(err):
            raise
        first = _first_words(err)
        raise RankFailure(failure_message(f"{what} failed ({first})")) from None


# what gloo, NCCL and the store say when a peer is gone or silent (torch.distributed.DistError aside)
COLLECTIVE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out",
                    "timeout", "socket", "peer", "store")


def is_collective_error(err: BaseException) -> bool:
    """A failure of the process group (a peer died or stalled), not a bug of the step itself."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(word in text for word in COLLECTIVE_WORDS)


def _first_words(err: BaseException) -> str:
    """The backend's message without its source location, up to its first full stop: "Read error
    [127.0.0.1]:2459: Connection reset by peer" from gloo's "[.../pair.cc:537] Read error ... by peer. This..."."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|py):\d+\]\s*", "", text)
    return text.split(". ")[0][:160]


def barrier(what: str = "barrier") -> None:
    if _DIST is not None:
        with collective(what):
            dist.barrier()


def check_world(cfg) -> None:
    """Refuse, before anything is written, global batches that W processes cannot cut in equal slices."""
    w = world()
    if w == 1:
        return
    sizes = {"train.batch_size": cfg.train.batch_size, "train.replay_batch_size": cfg.train.replay_batch_size}
    if cfg.init.batch_size:
        sizes["init.batch_size"] = cfg.init.batch_size
    for key, size in sizes.items():
        if size % w:
            raise AvclError(f"{key}={size} is the global batch, cut in {w} equal slices (one per process): "
                            f"make it a multiple of {w}")


def average(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (e.g. the epoch's loss); ``value`` in one process."""
    if _DIST is None:
        return value
    value = value.detach().clone()
    with collective("averaging the epoch loss"):
        dist.all_reduce(value)
    return value / _DIST.world


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. "a checkpoint is due" by rank 0's clock); ``flag`` in one process."""
    if _DIST is None:
        return flag
    value = torch.tensor([int(flag)], device=_DIST.device if _DIST.device.type == "cuda" else "cpu")
    with collective("agreeing on a checkpoint"):
        dist.broadcast(value, 0)
    return bool(value.item())


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (on every rank); ``[obj]`` in one process."""
    if _DIST is None:
        return [obj]
    out = [None] * _DIST.world
    with collective("gathering per-rank state"):
        dist.all_gather_object(out, obj)
    return out

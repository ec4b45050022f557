"""Data-parallel training across processes: ``torchrun --nproc-per-node N -m avcl run ...``.

PyTorch's own engine (``torch.distributed``: gloo on CPU, NCCL on CUDA), detected from the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...). With
``WORLD_SIZE`` unset or 1 nothing here is used and a run is exactly the single-process one.

How a run with W processes equals one process with the same global batch (docs/scaling.md):

* Every rank holds the whole task in memory and draws the same permutation and replay picks
  from the same seeded RNG (``torch.randperm`` / ``torch.randint``, as one process does);
  rank r trains on its slice r of each global batch (``train.batch_size`` / W new rows, and
  ``train.replay_batch_size`` / W replayed rows). Equal slices, so the mean of the ranks'
  per-row-mean losses is the global batch's mean, and gradients are averaged by one bucketed
  all-reduce after backward (``average_gradients``): every replica takes the same step.
* A global batch whose size W does not divide (the epoch's last partial batch) is not cut:
  every rank computes the whole batch (``Step.sliced`` False), so each rank's gradient is the
  one-process gradient and their average too: exact, at the cost of one duplicated batch per epoch.
* Batch-level terms see the global batch: InfoNCE (CAV-MAE, AV-CIL's D-AVSC) gathers the rows
  of every rank with their gradient (``all_rows``), XKD's DINO centre is all-reduced (``mean_rows``).
* Replicas stay identical (same initial weights from the seed, same averaged step, same RNG),
  so exemplar selection (herding, random) gives the same result on every rank; ``check_replicas``
  compares a checksum of model and memory across ranks after every task.
* Evaluation is sharded (``eval_pass``): each rank computes a contiguous run of the batches one
  process makes, and the per-row results are gathered in row order, so the metrics are the
  one-process metrics, computed W times faster. AV-CIL's teacher cache is made the
  same way: each rank computes the teacher's outputs for its share of the step's rows.
* Rank 0 alone writes (``is_main``). A collective that fails (a rank died, or none answered
  within ``train.dist_timeout`` seconds) ends the run with one line naming the rank that stopped.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from avcl.errors import AvclError


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
    import torch.distributed as dist
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise AvclError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {key} is not set: start several processes "
                            "with torchrun (torchrun --nproc-per-node N -m avcl run ...)")
    from avcl.engine.trainer import pick_device
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
        import torch.distributed as dist
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
    import torch.distributed as dist
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(word in text for word in COLLECTIVE_WORDS)


def _first_words(err: BaseException) -> str:
    """The backend's message without its source location, up to its first full stop: "Read error
    [127.0.0.1]:2459: Connection reset by peer" from gloo's "[.../pair.cc:537] Read error ... by peer. This..."."""
    import re
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|py):\d+\]\s*", "", text)
    return text.split(". ")[0][:160]


def barrier(what: str = "barrier") -> None:
    if _DIST is not None:
        import torch.distributed as dist
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


# ----- the training step's slice ----------------------------------------------------------------

@dataclass
class Step:
    """This rank's share of one global batch: an equal slice of it, or every row when not ``sliced``."""
    sliced: bool
    sizes: list  # new-data rows of each rank (all equal when sliced)


_STEP: Optional[Step] = None  # the step being computed (gathering is on only inside a sliced step)


def shard_batches(samples, batch_size: int) -> Iterator[tuple[dict, Step]]:
    """``batches(samples, batch_size, shuffle=True)`` cut for this rank: the same permutation on every
    rank (the shared RNG), then this rank's equal slice of each global batch, or the whole batch when
    W does not divide its size (then ``step.sliced`` is False)."""
    from avcl.data.samples import num_samples, select
    n, w, r = num_samples(samples), world(), rank()
    order = torch.randperm(n)  # as batches(shuffle=True) draws it: the same stream as one process
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        if len(rows) % w == 0:
            share = len(rows) // w
            yield select(samples, rows[r * share:(r + 1) * share]), Step(True, [share] * w)
        else:
            yield select(samples, rows), Step(False, [len(rows)] * w)


def slice_rows(index: torch.Tensor, step: Step) -> torch.Tensor:
    """This rank's slice of rows drawn for the whole global batch (e.g. the replay picks)."""
    if not step.sliced:
        return index
    share = len(index) // world()
    return index[rank() * share:(rank() + 1) * share]


def per_rank(count: int) -> int:
    """This rank's share of a per-step global count (a replay batch drawn by the method itself)."""
    if _STEP is None or not _STEP.sliced:
        return count
    return count // world() + (rank() < count % world())


@contextlib.contextmanager
def step(s: Step):
    """Inside a training step: gathering on (when sliced), and the rank's own random stream (``RankRandom``)."""
    global _STEP
    _STEP = s
    try:
        with _RANDOM.swapped() if _RANDOM is not None else contextlib.nullcontext():
            yield
    finally:
        _STEP = None


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
    if _DIST is not None:
        _RANDOM = RankRandom(seed * 1_000_003 + 7919 * (task + 1) + 104_729 * (_DIST.rank + 1), device)


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


def all_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows of ``x`` of every rank, concatenated in rank order, with their gradient; the offset of this
    rank's rows in it). Inside a sliced training step only (every rank holds as many rows); otherwise ``(x, 0)``.

    The backward sums every rank's gradient for this rank's rows, so after the gradient average each
    replica holds the gradient of the global loss."""
    if _STEP is None or not _STEP.sliced:
        return x, 0
    with collective("gathering rows (contrastive negatives)"):
        return _GatherRows.apply(x), _DIST.rank * len(x)


class _GatherRows(torch.autograd.Function):
    """all_gather forward; backward: the sum over ranks of the gradient of the gathered rows (one all-reduce),
    this rank's rows of it (what torch.distributed.nn.functional.all_gather does, without its deprecation)."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(_DIST.world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = len(x), _DIST.rank
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        with collective("sending back the gathered rows' gradients"):
            dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def is_gathering() -> bool:
    return _STEP is not None and _STEP.sliced


def mean_rows(mean: torch.Tensor) -> torch.Tensor:
    """The global batch's mean from each rank's mean over its equal slice (all-reduce; no gradient):
    XKD's DINO centre (spec B.4). Outside a sliced step, ``mean`` itself."""
    if _STEP is None or not _STEP.sliced:
        return mean
    import torch.distributed as dist
    mean = mean.clone()
    with collective("all-reducing the DINO centre"):
        dist.all_reduce(mean)
    return mean / world()


def average(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (e.g. the epoch's loss); ``value`` in one process."""
    if _DIST is None:
        return value
    import torch.distributed as dist
    value = value.detach().clone()
    with collective("averaging the epoch loss"):
        dist.all_reduce(value)
    return value / _DIST.world


BUCKET = 1 << 24  # elements per all-reduce (64 MiB of float32): bounded extra memory on large models


@torch.no_grad()
def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Average every parameter's gradient over the ranks (what DDP does, without its forward wrapper:
    methods call many model functions besides forward). Parameters without a gradient are left alone:
    every rank runs the same code on batches of the same shape, so the same ones have none everywhere."""
    if _DIST is None:
        return
    import torch.distributed as dist
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    w = _DIST.world
    with collective("all-reducing gradients"):
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= w
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _buckets(grads: list) -> Iterator[list]:
    bucket, size = [], 0
    for g in grads:
        if bucket and (size + g.numel() > BUCKET or g.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel()
    if bucket:
        yield bucket


# ----- replicas --------------------------------------------------------------------------------

@torch.no_grad()
def checksum(tensors, device: torch.device) -> torch.Tensor:
    """Two float64 numbers on ``device`` (where the backend reduces) that differ when any value differs
    (the sum, and a position-weighted sum)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.numel() or t.is_complex():
            continue
        v = t.detach().reshape(-1).to(device, torch.float64)
        total[0] += v.sum()
        total[1] += (v * torch.linspace(1, 2, len(v), dtype=torch.float64, device=device)).sum()
    return total


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def check_replicas(method, what: str) -> None:
    """Every rank must hold the same model and exemplar memory after a task (AvclError otherwise).

    A reservoir (label-free methods) is per rank by design (spec A.8) and is not compared."""
    if _DIST is None:
        return
    import torch.distributed as dist
    from avcl.memory.buffer import ExemplarMemory
    parts = [method.model.state_dict()]
    if isinstance(method.memory, ExemplarMemory):
        parts.append(method.memory.samples)
    mine = checksum(_tensors(parts), _DIST.device)
    every = [torch.zeros_like(mine) for _ in range(_DIST.world)]
    with collective(f"comparing replicas after {what}"):
        dist.all_gather(every, mine)
    if any(not torch.equal(every[0], other) for other in every[1:]):
        raise AvclError(f"the ranks' models or exemplar memories differ after {what} (checksums "
                        f"{[e.tolist() for e in every]}): a method that is not rank-deterministic")


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (on every rank); ``[obj]`` in one process."""
    if _DIST is None:
        return [obj]
    import torch.distributed as dist
    out = [None] * _DIST.world
    with collective("gathering per-rank state"):
        dist.all_gather_object(out, obj)
    return out


# ----- sharded evaluation: each rank a contiguous run of the one-process batches ---------------------

def eval_shares(n: int, batch_size: int) -> Optional[list[tuple[int, int]]]:
    """[start, stop) rows of an evaluation pass over ``n`` rows that each rank computes: contiguous runs of
    whole batches of ``batch_size``, the very batches one process makes, so every number is the one-process
    number. None when the pass is not sharded (one process, or fewer batches than ranks: every rank
    computes it all)."""
    batches_ = -(-n // batch_size)
    if _DIST is None or batches_ < _DIST.world:
        return None
    cuts = [batches_ * r // _DIST.world * batch_size for r in range(_DIST.world + 1)]
    return [(start, min(stop, n)) for start, stop in zip(cuts[:-1], cuts[1:])]


def _eval_batches(samples, batch_size: int) -> Iterator[dict]:
    """``batches(samples, batch_size)``, this rank's share of them (``eval_shares``)."""
    from avcl.data.samples import batches, num_samples, select
    shares = eval_shares(num_samples(samples), batch_size)
    if shares is not None:
        samples = select(samples, torch.arange(*shares[_DIST.rank]))
    yield from batches(samples, batch_size)


def _join_eval(rows: torch.Tensor, n: int, batch_size: int) -> torch.Tensor:
    """The per-row results of every rank's ``_eval_batches`` share, in row order, on every rank (on
    ``rows``' device); ``rows`` itself when the pass over ``n`` rows was not sharded. One all-gather on the
    process group's device (each share padded to the largest)."""
    shares = eval_shares(n, batch_size)
    if shares is None:
        return rows
    import torch.distributed as dist
    sizes = [stop - start for start, stop in shares]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]), device=_DIST.device)
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    with collective("gathering evaluation results"):
        dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(rows.device)


def eval_pass(compute, samples, batch_size: int):
    """``compute(batch)`` over ``batches(samples, batch_size)``, concatenated in row order: a tensor, or a dict
    of tensors, with one row per row of the batch. Several processes: each rank computes its share of the
    batches (``eval_shares``) and the shares are all-gathered, so every rank gets every row's result, the
    one-process numbers. Every rank must call it (a collective)."""
    from avcl.data.samples import num_samples
    n = num_samples(samples)
    parts = [compute(batch) for batch in _eval_batches(samples, batch_size)]
    if isinstance(parts[0], dict):
        return {key: _join_eval(torch.cat([part[key] for part in parts]), n, batch_size) for key in parts[0]}
    return _join_eval(torch.cat(parts), n, batch_size)


def test_stop(where: str) -> None:
    """Tests only: ``AVCL_TEST_STOP_RANK=R:WHERE`` makes rank R exit at once (status 3) at ``WHERE``
    (e.g. ``er:1:2``: method er, task 1, epoch 2), as a killed or crashed process would."""
    spec = os.environ.get("AVCL_TEST_STOP_RANK")
    if not spec or _DIST is None:
        return
    target, _, at = spec.partition(":")
    if int(target) == _DIST.rank and at == where:
        sys.stderr.flush()
        os._exit(3)


# ----- per-rank reservoirs (label-free methods, spec A.8) -----------------------------------------

def memory_share(size: int) -> int:
    """This rank's reservoir slots: the budget divided by the number of processes (spec A.8: M / GPUs)."""
    w, r = world(), rank()
    return size // w + (r < size % w)


def memory_seed(seed: int) -> int:
    """This rank's reservoir seed: ranks keep different shards, so they draw their slots independently."""
    return seed + 1_000_003 * rank()


def _reservoir(method):
    from avcl.memory.reservoir import ReservoirBuffer
    return method.memory if isinstance(method.memory, ReservoirBuffer) else None


def rank_memory(method) -> dict:
    """``{"rank_memory": [state of rank 0's reservoir, rank 1's, ...]}`` on rank 0 for the checkpoint (a
    collective: every rank calls it); ``{}`` in one process or without a reservoir."""
    if _DIST is None or _reservoir(method) is None:
        return {}
    import torch.distributed as dist
    state = _tensors_to_cpu(method.memory.state_dict())
    every = [None] * _DIST.world if _DIST.rank == 0 else None
    with collective("gathering the ranks' reservoirs"):
        dist.gather_object(state, every, dst=0)
    return {"rank_memory": every} if _DIST.rank == 0 else {}


def _tensors_to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _tensors_to_cpu(v) for k, v in obj.items()}
    return obj


def load_rank_memory(method, state: dict) -> None:
    """Resume each rank's reservoir from a checkpoint of W' processes: with W' = W, rank r's own; else
    every stored row dealt round-robin to the W ranks (rank r: rows r, r + W, ...), each keeping at most
    its share of slots, with the presentations seen split evenly and a fresh generator."""
    saved = state.get("rank_memory")
    memory = _reservoir(method)
    if not saved or memory is None:
        return
    w, r = world(), rank()
    if len(saved) == w:
        memory.load_state_dict(saved[r])
        return
    rows = {key: torch.cat([s["rows"][key] for s in saved if s["rows"]]) for key in saved[0]["rows"]}
    capacity = memory_share(sum(s["capacity"] for s in saved))
    mine = {key: value[r::w][:capacity] for key, value in rows.items()}
    generator = torch.Generator()
    generator.manual_seed(memory_seed(int(method.cfg.seed)) + 7919 * len(saved))
    memory.load_state_dict({"capacity": capacity, "seen": max(sum(s["seen"] for s in saved) // w,
                                                               len(next(iter(mine.values()), []))),
                            "rows": mine, "generator": generator.get_state()})


class NoLog:
    """What a rank other than 0 logs: nothing (rank 0 writes every method's logs)."""

    def epoch(self, *args, **kwargs) -> None: ...

    def val(self, *args, **kwargs) -> None: ...

    def task(self, *args, **kwargs) -> None: ...

    def close(self) -> None: ...

"""The device a run trains on, its autocast, and the CPU allocator setting (``train.device``, ``train.precision``,
``train.cpu_keep_heap``)."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from typing import Callable, Optional

import torch

from avcl.core.errors import AvclError


def pick_device(name: str = "auto") -> torch.device:
    """The torch device ``train.device`` names ("auto": CUDA, else MPS, else CPU); AvclError if it is absent."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AvclError(f"train.device={name}, but CUDA is not available here (torch {torch.__version__}"
                            f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU visible'}): "
                            "use train.device=auto or cpu")
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if index >= torch.cuda.device_count():
            raise AvclError(f"train.device={name}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise AvclError("train.device=mps, but MPS is not available here: use train.device=auto or cpu")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_cpu_heap() -> bool:
    """Make glibc malloc serve every allocation from its heap and keep freed memory for reuse.

    By default glibc maps each large block (every activation of a big batch) fresh from the OS
    and unmaps it on free, so every op's output page-faults on first touch; on AV-CIL's
    (B, T, P, D) attention tensors that cost as much as the arithmetic (sys time ~ user time,
    and far more inside VMs). This is what a caching allocator (jemalloc, tcmalloc, CUDA's)
    avoids. Cost: the process keeps its peak heap until it exits. Linux with glibc only;
    returns whether it was applied (elsewhere malloc is left alone).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def resolved_precision(precision: Optional[str], device: torch.device) -> str:
    """``train.precision``; unset: bf16 on CUDA, fp32 elsewhere."""
    return precision or ("bf16" if device.type == "cuda" else "fp32")


def autocast_factory(device: torch.device, precision: Optional[str]) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast of ``train.precision`` (bf16 | fp16 | fp32; None: bf16 on CUDA, fp32 elsewhere): a context
    factory (fp32: a no-op). fp16's GradScaler is the optimizer step's (avcl.engine.regime)."""
    precision = resolved_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def default_threads(processes: int = 1) -> tuple[int, str]:
    """torch CPU threads per process when ``train.num_threads`` is unset, and why: the cores this process may
    run on, less those other jobs keep busy (the 1-minute load average), shared by ``processes`` processes
    (``--jobs`` workers, torchrun's local ranks). torch's own default takes every core even when another job
    holds them, and its OpenMP threads then spin against it (a 36x slower init stage was measured so)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (OSError, AttributeError):  # no load average on this platform
        busy = 0
    free = max(1, cores - busy)
    threads = max(1, free // max(1, processes))
    why = (f"{cores} core(s), {min(busy, cores)} busy with other work (load average)"
           + (f", shared by {processes} processes" if processes > 1 else "") + "; train.num_threads sets it")
    return threads, why

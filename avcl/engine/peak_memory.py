"""Peak memory of a stretch of work: the CUDA allocator's peak on a GPU, sampled RSS on the CPU.

On the CPU the process's resident set is sampled from ``/proc/self/statm`` every ``interval``
seconds by a background thread (``ru_maxrss`` cannot be reset between methods of one run). It is
the whole process: the resident dataset and Python count too, so compare methods of one run.
"""
from __future__ import annotations

import os
import threading

import torch


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * PAGE
    except OSError:  # not Linux: the peak so far is the best we have
        import resource  # POSIX only, and only needed off Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(device) as meter: ...`` then ``meter.mib``."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval, self.peak = torch.device(device), interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def mib(self) -> float:
        return self.peak / 2 ** 20

"""What a run says while it works: a line per start-up stage, one progress bar over the whole run.

* :func:`stage`: one line on stderr per start-up stage (loading data, building the scenario,
  checking, the init stage, training), so the seconds before the first epoch are never silent.
* :class:`RunProgress`: the run's progress over every method x task, counted in epochs (so the
  estimate of the time left moves within a task). On a terminal a tqdm bar with the time left;
  elsewhere (logs, CI) a heartbeat thread prints one line every ``log.progress_seconds`` seconds
  (default 30), whatever the training loop is doing, with the method, task, epoch and time left.
"""
from __future__ import annotations

import sys
import threading
import time

from tqdm.auto import tqdm

from avcl import parallel


def stage(message: str) -> None:
    """One start-up line on stderr (through tqdm, so an open bar stays intact); rank 0's alone."""
    if not parallel.is_main():
        return
    tqdm.write(f"avcl: {message}", file=sys.stderr)
    sys.stderr.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class RunProgress:
    """Progress over ``total`` epochs (all methods x tasks x epochs); ``initial`` already done (resume).

    ``enabled`` False: silent. ``interactive`` (default: stderr is a terminal): a tqdm bar;
    otherwise a line every ``interval`` seconds from a daemon thread until :meth:`close`.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, interactive: bool | None = None,
                 interval: float = 30.0):
        self.total, self.initial, self.done = total, initial, initial
        self.enabled = enabled
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.where = "starting"
        self.started = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, desc="avcl", unit="epoch", dynamic_ncols=True,
                        disable=not (enabled and self.interactive), file=sys.stderr)
        self._stop = threading.Event()
        self._thread = None
        if enabled and not self.interactive:
            self._thread = threading.Thread(target=self._heartbeat, args=(interval,), daemon=True)
            self._thread.start()

    def at(self, method: str, task: int, tasks: int, epoch: int | None = None, epochs: int | None = None,
           **postfix) -> None:
        """Where the run is now (what the bar's postfix and the heartbeat line show)."""
        doing = "" if epoch is None else f" epoch {epoch + 1}/{epochs}" if epoch < epochs else " evaluating"
        self.note(f"{method} task {task + 1}/{tasks}{doing}", **postfix)

    def note(self, where: str, **postfix) -> None:
        self.where = where
        self.bar.set_postfix_str(", ".join([where] + [f"{k} {v}" for k, v in postfix.items()]), refresh=False)

    def advance(self, epochs: int = 1) -> None:
        self.done += epochs
        self.bar.update(epochs)

    def time_left(self) -> float | None:
        progressed = self.done - self.initial
        if progressed <= 0:
            return None
        return (time.monotonic() - self.started) / progressed * (self.total - self.done)

    def line(self) -> str:
        percent = 100.0 * self.done / max(self.total, 1)
        left = self.time_left()
        return (f"avcl: {percent:3.0f}% ({self.done}/{self.total} epochs) {self.where}; "
                f"{_clock(time.monotonic() - self.started)} elapsed, "
                + (f"~{_clock(left)} left" if left is not None else "time left unknown yet"))

    def _heartbeat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bar.close()

    def __enter__(self) -> "RunProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

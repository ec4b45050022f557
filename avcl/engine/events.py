"""``events.jsonl`` of a run directory: one JSON event per line (run, method, task and epoch start and end),
appended by rank 0 alone; a line torn by a kill is dropped on resume."""
from __future__ import annotations

import json
import time
from pathlib import Path

from avcl import parallel


class EventLog:
    """``events.jsonl``; ``listener(event, fields)``, if given, hears every event once it is written
    (`avcl tune` reports a trial's objective to its pruner at each ``task_end``)."""

    def __init__(self, path: Path, listener=None):
        self.path, self.listener = path, listener
        # a killed run may have left a torn last line: drop it before appending (rank 0 alone writes)
        if path.is_file() and parallel.is_main():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                path.write_bytes(data[:data.rfind(b"\n") + 1])

    def __call__(self, event: str, **fields) -> None:
        if not parallel.is_main():  # several processes: rank 0 alone writes
            return
        line = json.dumps({"time": round(time.time(), 3), "event": event, **fields})
        with open(self.path, "a") as handle:  # one short append per event; a torn last line is dropped on resume
            handle.write(line + "\n")
        if self.listener is not None:
            self.listener(event, fields)

"""A run killed in the middle of task 3 and resumed gives the same metrics as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, run_cli

# 5 tasks; epochs long enough that a kill lands inside a task, not between tasks.
ARGS = ["synthetic", "methods=[ewc,icarl]", "data.train_per_class=30", "data.test_per_class=10",
        "data.val_per_class=4", "train.epochs=40", "memory.size=40", "--quiet"]
TIMING = {"train_seconds", "task_seconds", "peak_memory_mib"}  # measurements, not results


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING}


def wait_for_event(path, predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:  # the line being written
                    continue
                if predicate(event):
                    return event
        time.sleep(0.01)
    raise AssertionError(f"no such event in {path} after {timeout} s")


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    reference = tmp_path / "reference"
    assert run_cli("run", *ARGS, "--out", str(reference)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "avcl", "run", *ARGS, "--out", str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        wait_for_event(killed / "events.jsonl",
                       lambda e: e["event"] == "task_start" and e["method"] == "icarl" and e["task"] == 2)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    partial = json.loads((killed / "icarl" / "metrics.json").read_text())
    assert partial["tasks_done"] == 2 and not partial["complete"], "the kill should land inside task 3"
    assert json.loads((killed / "ewc" / "metrics.json").read_text())["complete"]

    resumed = run_cli("run", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    for method in ("ewc", "icarl"):
        want = json.loads((reference / method / "metrics.json").read_text())
        got = json.loads((killed / method / "metrics.json").read_text())
        assert without_timing(got) == without_timing(want), method
    events = [json.loads(line) for line in (killed / "events.jsonl").read_text().splitlines() if line.strip()]
    assert any(e["event"] == "method_resume" and e["task"] == 2 for e in events)

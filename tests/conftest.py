import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = os.environ.get("AVCL_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR or not Path(DATA_DIR).is_dir(),
                                reason="AVCL_DATA_DIR not set: real-data tests need ../shared/data")

# Small and fast: every method learns a 3-task synthetic scenario in about a second.
TINY = ["data.train_per_class=40", "data.val_per_class=5", "data.test_per_class=20", "data.num_classes=6",
        "scenario.num_tasks=3", "train.epochs=15", "memory.size=30"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/avcl from tests."""
    monkeypatch.setenv("AVCL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "avcl-cache"))


def run_cli(*args, env=None, timeout=300):
    """Run ``python -m avcl ...`` in a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "avcl", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster, and much faster on a shared, loaded CPU."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


START_UP = ("avcl: loading data", "avcl: building the scenario", "avcl: checking the run",
            "avcl: AV-Digits: building")  # progress stage lines


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not start-up stage lines (what an error must be alone in)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(START_UP)]

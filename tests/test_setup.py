"""`./avcl-setup bench|test`, the README's two commands: set up, then run; a second call reuses it all.

The virtual environment is made beforehand with this interpreter's libraries visible (a .pth line),
so torch is found and nothing heavy is downloaded; the fresh-clone route (torch installed from
the CPU index) is what `.ci/run` and the README's closing note exercise.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_setup_script_installs_once_then_reuses(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".ci-venv", ".ci-cache", "__pycache__", "*.egg-info", "build", "runs", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. from this env
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(AVCL_VENV=str(venv), MPLBACKEND="Agg")
    args = ["./avcl-setup", "bench", "synthetic", "methods=[finetune]", "train.epochs=1", "--quiet"]

    first = subprocess.run([*args, "--out", "r1"], capture_output=True, text=True, cwd=clone, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "avcl-setup: reusing the virtual environment" in first.stderr
    assert "avcl-setup: torch " in first.stderr and "already installed" in first.stderr
    assert "avcl-setup: installing avcl (editable" in first.stderr
    assert "avcl-setup: running: avcl run synthetic" in first.stderr and "| finetune" in first.stdout
    assert (clone / "r1" / "finetune" / "metrics.json").is_file()
    origin = subprocess.run([str(venv / "bin" / "python"), "-c", "import avcl; print(avcl.__file__)"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert origin.stdout.strip() == str(clone / "avcl" / "__init__.py")  # the clone, editable

    second = subprocess.run([*args, "--out", "r2"], capture_output=True, text=True, cwd=clone, env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "avcl-setup: avcl already installed" in second.stderr and "installing" not in second.stderr
    assert "| finetune" in second.stdout

    usage = subprocess.run(["./avcl-setup"], capture_output=True, text=True, cwd=clone, env=env)
    assert usage.returncode == 2 and "usage: ./avcl-setup bench" in usage.stderr

"""A non-editable install (`pip install .`, as a wheel) carries the recipes: `avcl list`, `avcl run synthetic`.

The wheel is built from a copy of the source tree, installed into a fresh virtual environment that
reuses this interpreter's libraries (torch & co., through a .pth line: no download), and run from
outside the repository, so only the installed package can answer.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # ~30 s: build, install, two commands


def test_wheel_ships_the_recipes(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".ci-venv", ".ci-cache", "__pycache__", "*.egg-info", "build", "runs", "tests", "docs",
        "benchmarks", ".pytest_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("avcl-*.whl"))
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert "avcl/recipes/avdigits.yaml" in names and "avcl/recipes/avcil/_protocol.yaml" in names
    assert len([n for n in names if n.startswith("avcl/recipes/") and n.endswith(".yaml")]) == \
        len(list((REPO / "recipes").rglob("*.yaml")))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. from this env
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AVCL_RECIPES_DIR")}
    env["MPLBACKEND"] = "Agg"
    where = tmp_path / "elsewhere"
    where.mkdir()
    avcl = str(venv / "bin" / "avcl")
    origin = subprocess.run([str(python), "-c", "import avcl; print(avcl.__file__)"], capture_output=True, text=True,
                            env=env, cwd=where)
    assert origin.stdout.startswith(str(site)), origin.stdout + origin.stderr
    listed = subprocess.run([avcl, "list"], capture_output=True, text=True, env=env, cwd=where)
    assert listed.returncode == 0, listed.stderr
    for recipe in ("avdigits", "synthetic", "avcil/ave", "pretrain/synthetic", "features"):
        assert f"  {recipe} " in listed.stdout, listed.stdout
    run = subprocess.run([avcl, "run", "synthetic", "methods=[finetune,er]", "train.epochs=2", "--out", "r", "--quiet"],
                         capture_output=True, text=True, env=env, cwd=where, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "| finetune" in run.stdout and "| er" in run.stdout

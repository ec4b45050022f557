"""Many runs at once: ``seeds=[...]`` (one complete run per seed) and ``avcl run --jobs N``.

Layout: with ``seeds=[0, 1]`` the run directory holds ``seed-0/`` and ``seed-1/``, each a complete
run directory of its own (its ``config.yaml`` with that seed, ``dataset.json``, ``events.jsonl``,
``init/`` and ``<method>/``), so ``avcl report``, ``avcl compare``, ``avcl probe`` and ``--resume``
work on one seed as on any run; ``avcl report RUN_DIR`` gives mean ± std over the seeds
(``avcl.report.tables``). The issue that asked for this suggested ``<method>/seed-<s>/``; a seed
directory is kept whole instead because a seed changes the data split and the init model too.

``--jobs N`` runs the (seed, method) units in N worker processes (spawned, each with
``torch.set_num_threads(cores // N)`` unless ``train.num_threads`` is set). Each seed's init stage
runs first, in this process, so the workers of one seed share it. Every unit is seeded on its own
(``run_method`` seeds each method), so the numbers do not depend on N given the same thread count.
A unit that fails is reported in one line and the others go on; a killed sweep resumes per unit.
"""
from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from avcl import parallel
from avcl.config import build_config, save_config
from avcl.core.device import default_threads, pick_device
from avcl.core.errors import AvclError
from avcl.engine import runner  # runner.execute, looked up at each call (tests stand in for it)
from avcl.engine.events import EventLog
from avcl.engine.init_stage import run_init_stage, wants_init
from avcl.engine.progress import stage
from avcl.engine.runner import make_scenario
from avcl.report.plots import plot_run
from avcl.report.tables import load_results


def seed_configs(cfg: DictConfig, run_dir: Path) -> list[tuple[DictConfig, Path]]:
    """(config, run directory) of each run of ``cfg``: one per seed of ``seeds``, else ``cfg`` itself."""
    if not cfg.seeds:
        return [(cfg, run_dir)]
    out = []
    for seed in cfg.seeds:
        one = OmegaConf.merge(cfg, {"seed": int(seed), "seeds": []})
        OmegaConf.set_readonly(one, True)
        out.append((one, run_dir / f"seed-{seed}"))
    return out


def write_seed_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").is_file():  # a resumed sweep keeps what it wrote
        save_config(cfg, run_dir / "config.yaml")


def run_all(cfg: DictConfig, run_dir: Path, data_root: str | None, jobs: int, show_progress: bool,
            scenario=None) -> int:
    """Every run of ``cfg`` (each seed), in this process (``jobs == 1``) or in ``jobs`` workers.
    ``scenario``: the first run's, already built by the caller's checks. Returns the number of failed units."""


    runs = seed_configs(cfg, run_dir)
    if jobs <= 1:
        for i, (one, directory) in enumerate(runs):
            if cfg.seeds and parallel.is_main():  # under torchrun: rank 0 alone writes
                write_seed_config(one, directory)
                print(f"avcl: seed {one.seed} ({i + 1}/{len(runs)}) -> {directory}", file=sys.stderr, flush=True)
            runner.execute(one, directory, data_root, show_progress=show_progress, scenario=scenario if i == 0 else None)
        return 0
    return _parallel(runs, data_root, jobs, show_progress)


def _parallel(runs, data_root, jobs: int, show_progress: bool) -> int:


    threads, why = runs[0][0].train.num_threads, "train.num_threads"
    if not threads:
        threads, why = default_threads(jobs)
    units = [(one, directory, name) for one, directory in runs for name in one.methods]
    # the init stages run here, alone: this process's share is every free core
    torch.set_num_threads(runs[0][0].train.num_threads or default_threads(1)[0])
    for one, directory in runs:  # each seed's init stage once, before its workers load it
        write_seed_config(one, directory)
        if wants_init(one) or one.init.row:
            stage(f"init stage of {directory}")
            run_init_stage(one, make_scenario(one, data_root), directory, EventLog(directory / "events.jsonl"),
                           pick_device(one.train.device), show_progress)
    stage(f"running {len(units)} unit(s) (methods x seeds) in {jobs} worker processes, {threads} thread(s) each "
          f"({why})")
    failed, started = 0, time.perf_counter()
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools or open files
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_unit, OmegaConf.to_container(one), str(directory), name, data_root, threads):
                   (one.seed, name, directory) for one, directory, name in units}
        for done, future in enumerate(as_completed(futures), 1):
            seed, name, directory = futures[future]
            try:
                seconds = future.result()
                print(f"avcl: [{done}/{len(units)}] {name}, seed {seed}: done in {seconds:.1f} s "
                      f"({time.perf_counter() - started:.0f} s elapsed)", file=sys.stderr, flush=True)
            except AvclError as err:
                failed += 1
                print(f"avcl: [{done}/{len(units)}] {name}, seed {seed}: failed: {err}", file=sys.stderr, flush=True)
    for one, directory in runs:  # the run's plots hold every method (each worker plotted its own)
        _replot(one, directory)
    return failed


def _unit(raw: dict, directory: str, name: str, data_root: str | None, threads: int) -> float:
    """One method of one run, in a worker process: the run's other methods are other units."""


    torch.set_num_threads(threads)
    cfg = build_config({**raw, "methods": [name], "train": {**raw["train"], "num_threads": threads}})
    started = time.perf_counter()
    runner.execute(cfg, Path(directory), data_root, show_progress=False)
    return time.perf_counter() - started


def _replot(cfg: DictConfig, directory: Path) -> None:
    try:
        results = load_results(directory)
    except AvclError:
        return  # nothing finished there
    plot_run(directory, {k: v for k, v in results.items() if k != "init"}, cfg.eval.protocol)

"""The whole search: everything refused before a folder is written (``prepare``), a new folder (``start``), the
ask-run-tell loop of one process, and ``--jobs`` worker processes sharing the study."""
from __future__ import annotations

import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from avcl.apps.tune.outputs import write_outputs
from avcl.apps.tune.space import Param, search_space
from avcl.apps.tune.study import best_trial, counted, folder_lock, open_study, optuna_module, recover_killed
from avcl.apps.tune.trials import (describe_objective, known_objectives, objective_name, run_trial, shares_init,
                                   trial_base, trial_config, validation_scenario)
from avcl.config import build_config, save_config
from avcl.core.device import default_threads, pick_device
from avcl.core.errors import AvclError
from avcl.core.io import atomic_write_json
from avcl.engine.checks import check_run
from avcl.engine.events import EventLog
from avcl.engine.init_stage import run_init_stage, wants_init
from avcl.engine.progress import stage
from avcl.engine.runner import make_scenario


def prepare(cfg: DictConfig, data_root: str | None) -> tuple[list[Param], Any]:
    """Everything refused before a folder is written: the space, the objective, the validation scenario, the
    run checks. Returns (space, validation scenario)."""

    optuna_module()
    space = search_space(cfg)
    name = objective_name(cfg)
    if name not in known_objectives(cfg):
        raise AvclError(f"tune.objective={name} is not a number eval.protocol={cfg.eval.protocol} measures "
                        f"(known: {', '.join(known_objectives(cfg))})")
    scenario = validation_scenario(make_scenario(cfg, data_root), cfg)
    stage(f"checking the search: {len(space)} parameter(s), {describe_objective(cfg, cfg.scenario.num_tasks)}")
    try:
        check_run(trial_config(trial_base(cfg), {}), scenario)
    except AvclError as err:
        note = " (a search evaluates each task's validation clips in place of its test clips)"
        raise AvclError(f"{err}{note if 'test' in str(err) else ''}") from None
    return space, scenario


def search_loop(folder: Path, cfg: DictConfig, space: list[Param], scenario, data_root, worker: int = 0) -> None:
    """Ask, run, tell until the study holds tune.trials counted trials (this process, or one of --jobs)."""
    from optuna.trial import TrialState  # optional extra (avcl[tune]), checked by prepare

    optuna = optuna_module()
    study = open_study(folder, cfg, worker)
    distributions = {p.name: p.distribution for p in space}
    name = objective_name(cfg)
    while True:
        with folder_lock(folder):
            if counted(study) >= cfg.tune.trials:
                return
            trial = study.ask(distributions)
        started = time.perf_counter()
        shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        try:
            value = run_trial(trial, cfg, space, folder, scenario, data_root)
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            line = f"{pruned}"
        except (KeyboardInterrupt, SystemExit):
            raise  # the trial stays RUNNING: --resume marks it killed and runs its values again
        except Exception as err:  # noqa: BLE001 - one bad point of the space must not end the search
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            trial.set_user_attr("error", message[:500])
            study.tell(trial, state=TrialState.FAIL)
            line = f"failed: {message}"
        else:
            if value is None or not math.isfinite(value):
                trial.set_user_attr("error", f"objective {name} undefined ({value})")
                study.tell(trial, state=TrialState.FAIL)
                line = f"failed: objective {name} undefined ({value})"
            else:
                study.tell(trial, value)
                line = f"{name} {value:.4f}"
        best = best_trial(study)
        best_text = f"; best {best.value:.4f} (trial {best.number})" if best is not None else ""
        print(f"avcl: trial {trial.number} ({shown}): {line} in {time.perf_counter() - started:.1f} s{best_text}",
              file=sys.stderr, flush=True)
        write_outputs(folder, study, cfg, space)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----- the whole search ---------------------------------------------------------------------------------

def start(cfg: DictConfig, folder: Path, recipe: str | None, command: str) -> None:
    """A new search's folder: config.yaml, tune.json (the command, for best.yaml's header), the study."""
    folder.mkdir(parents=True, exist_ok=True)
    open_study(folder, cfg, create=True)  # first: a storage that cannot be opened leaves no config.yaml behind
    save_config(cfg, folder / "config.yaml")
    atomic_write_json(folder / "tune.json", {"command": command, "recipe": recipe or cfg.name,
                                             "stream_tasks": cfg.scenario.num_tasks,
                                             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def search(cfg: DictConfig, folder: Path, space: list[Param], scenario, data_root: str | None, jobs: int,
           join: bool = False) -> Any:
    """Run the search to tune.trials counted trials (resuming whatever the folder holds); returns the study.
    ``join``: other processes (machines) work on the same study now: their running trials are left alone."""

    study = open_study(folder, cfg)
    killed = [] if join else recover_killed(study)
    if killed:
        print(f"avcl: trial(s) {killed} were running when the search was killed: their values run again",
              file=sys.stderr, flush=True)
    if shares_init(space) and wants_init(cfg):  # once for every trial (module docstring)
        stage(f"init stage, shared by the trials -> {folder / 'init'}")
        base = trial_config(trial_base(cfg), {})
        run_init_stage(base, scenario, folder, EventLog(folder / "events.jsonl"), pick_device(cfg.train.device))
    done = counted(study)
    stage(f"search: {cfg.tune.trials - done} trial(s) to run ({done} already), {jobs} at a time -> {folder}")
    if jobs <= 1:
        threads, why = (cfg.train.num_threads, "train.num_threads") if cfg.train.num_threads else default_threads()
        torch.set_num_threads(threads)
        stage(f"{threads} torch thread(s) ({why})")
        cfg = build_config({**OmegaConf.to_container(cfg), "train": {**OmegaConf.to_container(cfg.train),
                                                                     "num_threads": threads}})  # each trial's
        search_loop(folder, cfg, space, scenario, data_root)
    else:
        _parallel(cfg, folder, data_root, jobs)
    study = open_study(folder, cfg)
    write_outputs(folder, study, cfg, space)
    return study


def _parallel(cfg: DictConfig, folder: Path, data_root: str | None, jobs: int) -> None:

    threads, why = (cfg.train.num_threads, "train.num_threads") if cfg.train.num_threads else default_threads(jobs)
    stage(f"{jobs} worker processes, {threads} torch thread(s) each ({why})")
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools or SQLite connections
    raw = OmegaConf.to_container(cfg)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_worker, raw, str(folder), data_root, threads, w) for w in range(jobs)]
        for future in as_completed(futures):
            future.result()  # a worker's error (not a trial's: those are recorded as failed trials) ends the search


def _worker(raw: dict, folder: str, data_root: str | None, threads: int, worker: int) -> None:
    """One of --jobs: its own scenario (the same validation split) and study connection."""


    torch.set_num_threads(threads)
    cfg = build_config({**raw, "train": {**raw["train"], "num_threads": threads}})
    scenario = validation_scenario(make_scenario(cfg, data_root), cfg)
    search_loop(Path(folder), cfg, search_space(cfg), scenario, data_root, worker)

"""The study: Optuna (an optional extra), its storage (a SQLite file in the folder, or a shared RDB URL), the
folder lock that keeps the number of trials exact under ``--jobs``, and the trials it counts."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from avcl.core.errors import AvclError


STUDY_FILE = "study.db"
# Sections that define what a trial measures: searching them would compare trials on different data or metrics.
# The states a search counts towards tune.trials (a killed trial's FAIL is not counted: it is tried again).
COUNTED = ("COMPLETE", "PRUNED", "RUNNING", "FAIL")


def optuna_module():
    try:
        import optuna  # optional extra (avcl[tune]): refused here with the install line
    except ImportError:
        raise AvclError("avcl tune needs Optuna: pip install 'avcl[tune]' (or pip install 'optuna>=4')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead of Optuna's
    return optuna



def storage_url(folder: Path, cfg: DictConfig) -> str:
    """tune.storage (an Optuna RDB URL shared by several machines), else the SQLite file in the folder."""
    return cfg.tune.storage or f"sqlite:///{(folder / STUDY_FILE).resolve()}"


def open_study(folder: Path, cfg: DictConfig, worker: int = 0, create: bool = False):
    optuna = optuna_module()
    url = storage_url(folder, cfg)
    # SQLite allows one writer at a time: wait for the lock (other workers) instead of failing at once
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as err:  # noqa: BLE001 - a bad URL, a missing database driver, a server that does not answer
        raise AvclError(f"cannot open the study's storage {url}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=cfg.tune.pruner_startup_trials,
                                          n_warmup_steps=cfg.tune.pruner_warmup_tasks)
              if cfg.tune.pruner else optuna.pruners.NopPruner())
    name = f"{cfg.name}:{cfg.tune.method}"
    if create:
        try:
            study = optuna.create_study(storage=storage, pruner=pruner, study_name=name, direction=cfg.tune.direction)
        except optuna.exceptions.DuplicatedStudyError:
            raise AvclError(f"{url} already holds a study named '{name}': join it with avcl tune --resume on its "
                            "folder, or change `name`") from None
    else:
        study = optuna.load_study(storage=storage, pruner=pruner, study_name=name)
    # Seeded from `seed`, this worker and the trials already there: a fresh search is reproducible, and a
    # resumed one (or another worker) does not draw the same first values again.
    seed = int(np.random.SeedSequence([cfg.seed, worker, len(study.get_trials(deepcopy=False))]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.tune.sampler_startup_trials,
                                               constant_liar=True)  # --jobs: running trials count as poor ones
    return study


def counted(study) -> int:
    """Trials that count towards tune.trials: finished or running, not the killed ones (they are retried)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.name in COUNTED and not (t.state.name == "FAIL" and t.user_attrs.get("killed")))


def recover_killed(study) -> list[int]:
    """Trials left RUNNING by a killed search: marked failed (``killed``) and their values queued to run again."""
    from optuna.trial import TrialState  # optional extra (avcl[tune]), checked by prepare
    killed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "killed", True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        killed.append(trial.number)
    return killed


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on the folder (POSIX): one worker at a time asks for a trial, so none overshoots."""
    try:
        import fcntl  # POSIX only
    except ImportError:  # no fcntl (Windows): --jobs may run a trial or two more than tune.trials
        yield
        return
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def best_trial(study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None



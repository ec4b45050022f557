"""``avcl tune``: a hyperparameter search with Optuna, on validation data only (docs/tuning.md).

Protocol (``tune`` config section). Every trial is an ordinary run of one method (``execute``, the
same training loop, seeded by ``seed`` like any run) on a *validation scenario*: the stream's first
``tune.tasks`` tasks (``tune.protocol=first_tasks``, as Chaudhry et al. 2019 tune on the first
tasks) or all of them (``all_tasks``), where each task's test split is replaced by its validation
split and the test rows are dropped before any model or evaluator exists. Whatever the protocol
measures (``eval.protocol``) is therefore measured on validation clips, and the objective
(``tune.objective``) is a number of the trial's ``<method>/metrics.json``. After every task the
objective so far is reported to a median pruner; a TPE sampler seeded from ``seed`` proposes the
values.

The space is the recipe's ``search.<method>`` mapping: key -> spec, where a key is one of the
method's hyperparameters (``method_args.<method>.<key>``, or ``variants.<variant>.<key>`` for a
variant) or a dotted config key (``train.lr``), and a spec is ``{low, high[, log][, int][, step]}``
or ``{choices: [...]}``. Keys that define what is measured (data, scenario, seeds, evaluation) are
refused. Each spec is checked before anything is written by building the configs of its bounds
(or choices) and one inner value, so a wrong type or an out-of-range bound is the config's own message.

Folder (``--out``)::

    config.yaml     the resolved tuning config (recipe + overrides, with `search` and `tune`); --resume reads it
    study.db        the Optuna study (SQLite; `optuna-dashboard sqlite:///DIR/study.db`)
    init/           the init stage, trained once and shared by the trials when no searched key can change it
    trials/NNN/     trial NNN's run directory (trial.yaml: its config; <method>/metrics.json on validation data)
    trials.csv      one row per trial: state, objective, values, seconds, notes
    best.yaml       the best trial's method hyperparameters: `avcl run RECIPE method_args.M=@DIR/best.yaml`
    objective.png   the objective of every trial, and the best so far

A killed search resumes (``--resume``): finished trials are kept; a trial that was running is marked
failed (user attribute ``killed``, not counted) and its values are tried again first. ``--jobs N``
runs N worker processes that share the study; a file lock around Optuna's ``ask`` keeps the number
of trials exact.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from avcl.errors import AvclError

STUDY_FILE = "study.db"
# Sections that define what a trial measures: searching them would compare trials on different data or metrics.
FIXED = ("name", "description", "seed", "seeds", "methods", "data", "scenario", "eval", "log", "variants",
         "expected", "search", "tune")
SPEC_KEYS = ("low", "high", "log", "int", "step")
AUTO_OBJECTIVE = {"accuracy": "average_incremental_accuracy", "retrieval": "retrieval_average",
                  "probe": "probe_av_accuracy"}
# The states a search counts towards tune.trials (a killed trial's FAIL is not counted: it is tried again).
COUNTED = ("COMPLETE", "PRUNED", "RUNNING", "FAIL")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise AvclError("avcl tune needs Optuna: pip install 'avcl[tune]' (or pip install 'optuna>=4')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead of Optuna's
    return optuna


# ----- the search space ----------------------------------------------------------------------------

@dataclass
class Param:
    name: str  # as the recipe's search.<method> names it: "lr" or "train.lr"
    key: str  # the dotted config key a value is written to
    distribution: Any  # optuna.distributions.*


def method_of(cfg: DictConfig) -> tuple[str, type]:
    """(the searched method or variant, its method class)."""
    from avcl.methods import METHODS
    name = cfg.tune.method
    if not name:
        raise AvclError("name the method to tune: avcl tune RECIPE method=NAME (a method of the recipe's search:)")
    if name in METHODS:
        return name, METHODS[name]
    if name in cfg.variants:
        return name, METHODS[cfg.variants[name]["method"]]
    raise AvclError(f"unknown method '{name}' (method=...; known: {', '.join(sorted(METHODS))}, "
                    f"or a variant of the recipe: {', '.join(cfg.variants) or 'none'})")


def search_space(cfg: DictConfig) -> list[Param]:
    """The searched parameters of ``cfg.tune.method``, every spec and every bound checked (AvclError)."""
    name, cls = method_of(cfg)
    space = cfg.search.get(name)
    if not space:
        have = f" (it has: {', '.join(cfg.search)})" if cfg.search else ""
        raise AvclError(f"the recipe has no search space for '{name}'{have}: add e.g. "
                        f"search: {{{name}: {{lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}}}}}")
    hparams = [f.name for f in fields(cls.Hparams)]
    params = []
    for key, spec in flat_space(OmegaConf.to_container(space), hparams).items():
        where = f"search.{name}.{key}"
        if "." in key:
            if key.split(".")[0] in FIXED:
                raise AvclError(f"{where}: '{key.split('.')[0]}' cannot be searched: the data, scenario, seeds and "
                                "evaluation stay fixed during a search (they define what the objective measures)")
            target = key
        elif key in hparams:
            target = f"variants.{name}.{key}" if name in cfg.variants else f"method_args.{cls.name}.{key}"
        else:
            raise AvclError(f"{where}: unknown key '{key}': {cls.name}'s hyperparameters are {', '.join(hparams)} "
                            "(or give a dotted config key, e.g. train.lr)")
        params.append(Param(key, target, distribution(where, spec)))
    base = trial_base(cfg)
    for param in params:  # a wrong type or an out-of-range value: the config's own message, before anything runs
        for value in probe_values(param.distribution):
            try:
                trial_config(base, {param.key: value})
            except AvclError as err:
                hint = " (a whole-number key: add int: true)" if "to Integer" in str(err) else ""
                raise AvclError(f"search.{name}.{param.name}: the value {value!r} is refused: {err}{hint}") from None
    return params


def flat_space(space: dict, hparams: list[str], prefix: str = "") -> dict:
    """key -> spec with dotted config keys, whether the recipe writes `train.lr: {...}` or
    `train: {lr: {...}}` (a mapping that is no spec, under a key that is no hyperparameter, is a section)."""
    out = {}
    for key, spec in space.items():
        name = f"{prefix}{key}"
        nested = (isinstance(spec, dict) and spec and name not in hparams
                  and not set(spec) & {"choices", *SPEC_KEYS})
        out.update(flat_space(spec, hparams, f"{name}.") if nested else {name: spec})
    return out


def distribution(where: str, spec: Any):
    """The Optuna distribution of one spec (AvclError naming ``where`` when it is malformed or empty)."""
    optuna = _optuna()
    dists = optuna.distributions
    shape = "{low: L, high: H[, log: true][, int: true][, step: S]} or {choices: [a, b, ...]}"
    if not isinstance(spec, dict):
        raise AvclError(f"{where}: a spec is a mapping {shape}, got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise AvclError(f"{where}: choices take no other keys, got {sorted(set(spec) - {'choices'})}")
        if not isinstance(choices, list) or not choices:
            raise AvclError(f"{where}: choices must be a non-empty list, got {choices!r}")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise AvclError(f"{where}: choices must be numbers, strings, booleans or null, got {bad[0]!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise AvclError(f"{where}: choices list a value twice: {choices}")
        return dists.CategoricalDistribution(choices)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown or not {"low", "high"} <= set(spec):
        raise AvclError(f"{where}: a spec is {shape}; got keys {sorted(spec)}")
    low, high = spec["low"], spec["high"]
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AvclError(f"{where}: '{bound}' must be a finite number, got {value!r}")
    for flag in ("log", "int"):
        if not isinstance(spec.get(flag, False), bool):
            raise AvclError(f"{where}: '{flag}' must be true or false, got {spec[flag]!r}")
    log, integer, step = spec.get("log", False), spec.get("int", False), spec.get("step")
    if not low < high:
        raise AvclError(f"{where}: empty range: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise AvclError(f"{where}: a log scale needs low > 0, got low={low}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or log):
        raise AvclError(f"{where}: 'step' must be a number > 0, without log: true; got step={step!r}")
    if integer:
        if low != int(low) or high != int(high) or (step is not None and step != int(step)):
            raise AvclError(f"{where}: int: true needs whole numbers, got low={low}, high={high}"
                            + (f", step={step}" if step is not None else ""))
        return dists.IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return dists.FloatDistribution(float(low), float(high), log=log, step=step)


def probe_values(dist) -> list:
    """The values a spec is checked with: its bounds (or choices) and, on a float range, an inner non-whole
    value, so an integer hyperparameter searched without int: true is refused at once."""
    if hasattr(dist, "choices"):
        return list(dist.choices)
    values = [dist.low, dist.high]
    if not hasattr(dist, "step") or dist.step is None or dist.step != int(dist.step):
        inner = dist.low + 0.37 * (dist.high - dist.low)
        values.append(inner if inner != int(inner) else inner + 0.5 * min(1.0, dist.high - inner))
    return values


# ----- configs, the validation scenario and the objective -------------------------------------------

def trial_base(cfg: DictConfig) -> dict:
    """The plain config every trial starts from: the one method, no seed list (every trial runs ``seed``)."""
    base = OmegaConf.to_container(cfg, resolve=True)
    base.update(methods=[cfg.tune.method], seeds=[])
    if base["train"]["save_model"] is None:  # no model.pt per trial (ViT-B trials would fill the disk)
        base["train"]["save_model"] = False
    return base


def trial_config(base: dict, values: dict[str, Any]) -> DictConfig:
    """``base`` with each dotted key of ``values`` set, validated like any run config."""
    from avcl.config import build_config
    raw = OmegaConf.create(copy.deepcopy(base))
    for key, value in values.items():
        OmegaConf.update(raw, key, value, merge=False, force_add=True)
    return build_config(raw)


def validation_scenario(scenario, cfg: DictConfig):
    """The scenario a search runs on: the tasks the protocol allows, each with its validation split in place
    of its test split. The test rows are dropped here, so no model or evaluator can reach them."""
    tasks = scenario.tasks
    if cfg.tune.protocol == "first_tasks":
        if cfg.tune.tasks >= len(tasks):
            raise AvclError(f"tune.tasks={cfg.tune.tasks} covers the whole stream of {len(tasks)} tasks: say so with "
                            "tune.protocol=all_tasks (every task's validation split), or lower tune.tasks")
        tasks = tasks[:cfg.tune.tasks]
    empty = [t.index for t in tasks if not t.val or len(t.val["label"]) == 0]
    if empty:
        raise AvclError(f"task(s) {empty} have no validation clips: a search measures on validation data only; "
                        f"give dataset '{cfg.data.name}' a validation split (e.g. data.val_per_class for synthetic)")
    kept = [replace(t, test=t.val) for t in tasks]
    info = {**scenario.info, "tune": {"protocol": cfg.tune.protocol, "tasks": len(kept),
                                      "stream_tasks": len(scenario.tasks), "evaluated_on": "val"}}
    return replace(scenario, tasks=kept, info=info)


def objective_name(cfg: DictConfig) -> str:
    return AUTO_OBJECTIVE[cfg.eval.protocol] if cfg.tune.objective == "auto" else cfg.tune.objective


def known_objectives(cfg: DictConfig) -> list[str]:
    """The numbers a trial's metrics.json holds under ``eval.protocol`` (from the functions that make them)."""
    from avcl.eval.metrics import summarize
    from avcl.eval.retrieval import summarize_retrieval
    if cfg.eval.protocol == "accuracy":
        names = [k for k in summarize([[0.5]], [0.5]) if k != "forgetting_variant"]
        return names + [f"taw_{k}" for k in names]
    if cfg.eval.protocol == "retrieval":
        ks = [int(k) for k in cfg.eval.recall_at]
        matrices = {d: {**{f"R@{k}": [[0.5]] for k in ks}, "median_rank": [[1.0]]} for d in ("a2v", "v2a")}
        return ["retrieval_average", *summarize_retrieval(matrices, ks), "probe_accuracy"]
    return [f"probe_{m}_{metric}" for m in ("video", "audio", "av") for metric in ("accuracy", "map")]


def objective_value(metrics: dict, name: str) -> float | None:
    """The objective in a trial's metrics.json (None while it is undefined, e.g. forgetting after one task).
    ``retrieval_average``: the mean of A→V and V→A R@k averaged over eval.recall_at and the tasks' groups."""
    if name == "retrieval_average":
        parts = [metrics.get("a2v_average"), metrics.get("v2a_average")]
        return None if None in parts else (parts[0] + parts[1]) / 2
    value = metrics.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def describe_objective(cfg: DictConfig, stream_tasks: int) -> str:
    where = (f"the first {cfg.tune.tasks} of {stream_tasks} tasks" if cfg.tune.protocol == "first_tasks"
             else f"all {stream_tasks} tasks (tune.protocol=all_tasks)")
    return f"validation {objective_name(cfg)} ({cfg.tune.direction}), on {where}"


def shares_init(space: list[Param]) -> bool:
    """Whether every trial starts from the same init stage: only method hyperparameters are searched (train.*,
    model.*, init.* keys change what the init stage trains)."""
    return all(p.key.startswith(("method_args.", "variants.")) for p in space)


def prepare(cfg: DictConfig, data_root: str | None) -> tuple[list[Param], Any]:
    """Everything refused before a folder is written: the space, the objective, the validation scenario, the
    run checks. Returns (space, validation scenario)."""
    from avcl.engine.progress import stage
    from avcl.engine.runner import check_run, make_scenario

    _optuna()
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


# ----- the study --------------------------------------------------------------------------------------

def storage_url(folder: Path, cfg: DictConfig) -> str:
    """tune.storage (an Optuna RDB URL shared by several machines), else the SQLite file in the folder."""
    return cfg.tune.storage or f"sqlite:///{(folder / STUDY_FILE).resolve()}"


def open_study(folder: Path, cfg: DictConfig, worker: int = 0, create: bool = False):
    optuna = _optuna()
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
    import numpy as np
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
    from optuna.trial import TrialState
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
        import fcntl
    except ImportError:  # no fcntl (Windows): --jobs may run a trial or two more than tune.trials
        yield
        return
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_trial(trial, cfg: DictConfig, space: list[Param], folder: Path, scenario, data_root) -> float | None:
    """One trial: its config, then an ordinary run (``execute``) reporting the objective after each task."""
    from avcl.config import save_config
    from avcl.engine.runner import execute

    optuna = _optuna()
    values = {p.key: trial.params[p.name] for p in space}
    init_model = folder / "init" / "model.pt"
    if shares_init(space) and init_model.is_file():
        values["init.checkpoint"] = str(init_model.resolve())
    trial_cfg = trial_config(trial_base(cfg), values)
    run_dir = folder / "trials" / f"{trial.number:03d}"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(trial_cfg, run_dir / "trial.yaml")  # not config.yaml: `avcl run --resume` would load the test data
    trial.set_user_attr("run_dir", str(run_dir.relative_to(folder)))
    method, name = cfg.tune.method, objective_name(cfg)

    def after_task(event: str, fields: dict) -> None:
        if event != "task_end" or fields.get("method") != method:
            return
        value = objective_value(json.loads((run_dir / method / "metrics.json").read_text()), name)
        if value is None:
            return
        trial.report(value, fields["task"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after task {fields['task'] + 1}: {name} {value:.4f}")

    results = execute(trial_cfg, run_dir, data_root, show_progress=False, scenario=scenario, on_event=after_task)
    return objective_value(results[method], name)


def search_loop(folder: Path, cfg: DictConfig, space: list[Param], scenario, data_root, worker: int = 0) -> None:
    """Ask, run, tell until the study holds tune.trials counted trials (this process, or one of --jobs)."""
    from optuna.trial import TrialState

    optuna = _optuna()
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
        best = _best(study)
        best_text = f"; best {best.value:.4f} (trial {best.number})" if best is not None else ""
        print(f"avcl: trial {trial.number} ({shown}): {line} in {time.perf_counter() - started:.1f} s{best_text}",
              file=sys.stderr, flush=True)
        write_outputs(folder, study, cfg, space)


def _best(study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----- what a search leaves: trials.csv, best.yaml, objective.png --------------------------------------

def write_outputs(folder: Path, study, cfg: DictConfig, space: list[Param]) -> None:
    """The study as files (each written atomically): rewritten after every trial, from the database."""
    from avcl.engine.checkpoint import atomic_write_text
    trials = study.get_trials(deepcopy=False)
    names = [p.name for p in space]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial", "state", objective_name(cfg), *names, "tasks_reported", "seconds", "run_dir", "note"])
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else ""
        note = t.user_attrs.get("error") or ("killed; values run again" if t.user_attrs.get("killed") else "") or \
            (f"retry of trial {t.user_attrs['retry_of']}" if "retry_of" in t.user_attrs else "")
        last = max(t.intermediate_values) + 1 if t.intermediate_values else ""
        writer.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                         *[t.params.get(n, "") for n in names], last,
                         round(seconds, 3) if seconds != "" else "", t.user_attrs.get("run_dir", ""), note])
    atomic_write_text(folder / "trials.csv", out.getvalue())
    best = _best(study)
    if best is not None:
        atomic_write_text(folder / "best.yaml", best_yaml(folder, study, cfg, space, best))
    plot_objective(folder / "objective.png", trials, cfg)


def use_command(folder: Path, cfg: DictConfig, space: list[Param], best) -> str:
    """The `avcl run` line that trains with the best values."""
    recipe = study_attr(folder, "recipe") or cfg.name
    method_keys = [p for p in space if "." not in p.name]
    args = [f"avcl run {recipe}"]
    if method_keys:
        section = f"variants.{cfg.tune.method}" if cfg.tune.method in cfg.variants else f"method_args.{cfg.tune.method}"
        args.append(f"{section}=@{folder / 'best.yaml'}")
    args += [f"{p.name}={best.params[p.name]}" for p in space if "." in p.name]
    if cfg.tune.method not in cfg.methods:  # the recipe's own rows do not include it
        args.append(f"methods={cfg.tune.method}")
    return " ".join(args)


def best_yaml(folder: Path, study, cfg: DictConfig, space: list[Param], best) -> str:
    """The best method hyperparameters as a mapping (what `key=@FILE` reads), under a header saying where they
    came from; searched dotted config keys are given as overrides in the header's `use:` line."""
    import yaml
    finished = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED"))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    objective = describe_objective(cfg, study_attr(folder, "stream_tasks") or cfg.scenario.num_tasks)
    header = [f"# tuned: {study_attr(folder, 'command')}, {when},",
              f"#   objective {objective} = {best.value:.4f} (trial {best.number} of {finished} finished)",
              f"# use: {use_command(folder, cfg, space, best)}"]
    body = {p.name: best.params[p.name] for p in space if "." not in p.name}
    return "\n".join(header) + "\n" + (yaml.safe_dump(body, sort_keys=False) if body else "{}\n")


def plot_objective(path: Path, trials, cfg: DictConfig) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from avcl.engine.checkpoint import atomic_write_bytes
    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.value is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.scatter([t.number for t in done], [t.value for t in done], s=18, label="complete")
    if pruned:
        ax.scatter([t.number for t in pruned], [t.value for t in pruned], s=18, marker="x", color="gray",
                   label="pruned (value when stopped)")
    if done:
        pick = max if cfg.tune.direction == "maximize" else min
        best, xs, ys = None, [], []
        for t in sorted(done, key=lambda t: t.number):
            best = t.value if best is None else pick(best, t.value)
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(objective_name(cfg) + " (validation)")
    ax.set_title(f"avcl tune: {cfg.name}, {cfg.tune.method}", fontsize=10)
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def study_attr(folder: Path, key: str):
    meta = folder / "tune.json"
    return json.loads(meta.read_text()).get(key) if meta.is_file() else None


# ----- the whole search ---------------------------------------------------------------------------------

def start(cfg: DictConfig, folder: Path, recipe: str | None, command: str) -> None:
    """A new search's folder: config.yaml, tune.json (the command, for best.yaml's header), the study."""
    from avcl.config import save_config
    from avcl.engine.checkpoint import atomic_write_json
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
    from avcl.engine.init_stage import run_init_stage, wants_init
    from avcl.engine.progress import stage
    from avcl.engine.runner import EventLog
    from avcl.engine.trainer import pick_device

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
        if cfg.train.num_threads:
            import torch
            torch.set_num_threads(cfg.train.num_threads)
        search_loop(folder, cfg, space, scenario, data_root)
    else:
        _parallel(cfg, folder, data_root, jobs)
    study = open_study(folder, cfg)
    write_outputs(folder, study, cfg, space)
    return study


def _parallel(cfg: DictConfig, folder: Path, data_root: str | None, jobs: int) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools or SQLite connections
    raw = OmegaConf.to_container(cfg)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_worker, raw, str(folder), data_root, threads, w) for w in range(jobs)]
        for future in as_completed(futures):
            future.result()  # a worker's error (not a trial's: those are recorded as failed trials) ends the search


def _worker(raw: dict, folder: str, data_root: str | None, threads: int, worker: int) -> None:
    """One of --jobs: its own scenario (the same validation split) and study connection."""
    import torch

    from avcl.config import build_config
    from avcl.engine.runner import make_scenario

    torch.set_num_threads(threads)
    cfg = build_config(raw)
    scenario = validation_scenario(make_scenario(cfg, data_root), cfg)
    search_loop(Path(folder), cfg, search_space(cfg), scenario, data_root, worker)

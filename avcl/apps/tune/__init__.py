"""``avcl tune``: a hyperparameter search with Optuna, on validation data only (docs/tuning.md).

One module per concern: ``space`` (the search space), ``trials`` (one trial: config, validation scenario,
objective), ``study`` (Optuna, storage, locking), ``outputs`` (trials.csv, best.yaml, objective.png),
``search`` (the whole search, ``--jobs`` workers); the names below are re-exported here.

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
from avcl.apps.tune.outputs import best_yaml, study_attr, use_command, write_outputs
from avcl.apps.tune.search import prepare, search, search_loop, start
from avcl.apps.tune.space import FIXED, SPEC_KEYS, distribution, flat_space, method_of, probe_values, search_space
from avcl.apps.tune.study import (COUNTED, STUDY_FILE, best_trial, counted, folder_lock, open_study, optuna_module,
                                  recover_killed, storage_url)
from avcl.apps.tune.trials import (AUTO_OBJECTIVE, Param, describe_objective, known_objectives, objective_name,
                                   objective_value, run_trial, shares_init, trial_base, trial_config,
                                   validation_scenario)


__all__ = ["AUTO_OBJECTIVE", "COUNTED", "FIXED", "Param", "SPEC_KEYS", "STUDY_FILE", "best_trial", "best_yaml",
           "counted", "describe_objective", "distribution", "flat_space", "folder_lock", "known_objectives",
           "method_of", "objective_name", "objective_value", "open_study", "optuna_module",
           "prepare", "probe_values", "recover_killed", "run_trial", "search", "search_loop", "search_space",
           "shares_init", "start", "storage_url", "study_attr", "trial_base", "trial_config", "use_command",
           "validation_scenario", "write_outputs"]

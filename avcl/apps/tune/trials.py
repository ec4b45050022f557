"""One trial: its config (the recipe's, with the trial's values), the validation scenario it runs on, and the
objective it reports after every task."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from avcl.apps.tune.study import optuna_module
from avcl.config import build_config, method_hparams_for, save_config
from avcl.core.errors import AvclError
from avcl.engine import runner  # runner.execute, looked up at each call (tests stand in for it)
from avcl.eval.metrics import summarize
from avcl.eval.retrieval import summarize_retrieval
from avcl.models import check_model_options
from avcl.report.tables import divergence_text


AUTO_OBJECTIVE = {"accuracy": "average_incremental_accuracy", "retrieval": "retrieval_average",
                  "probe": "probe_av_accuracy"}


# ----- configs, the validation scenario and the objective -------------------------------------------

@dataclass
class Param:
    name: str  # as the recipe's search.<method> names it: "lr" or "train.lr"
    key: str  # the dotted config key a value is written to
    distribution: Any  # optuna.distributions.*


def trial_base(cfg: DictConfig) -> dict:
    """The plain config every trial starts from: the one method, no seed list (every trial runs ``seed``)."""
    base = OmegaConf.to_container(cfg, resolve=True)
    base.update(methods=[cfg.tune.method], seeds=[])
    if base["train"]["save_model"] is None:  # no model.pt per trial (ViT-B trials would fill the disk)
        base["train"]["save_model"] = False
    return base


def trial_config(base: dict, values: dict[str, Any]) -> DictConfig:
    """``base`` with each dotted key of ``values`` set, validated like any run config, its model section too
    (``model.*`` keys are the model layer's to check: ``check_model_options``)."""
    raw = OmegaConf.create(copy.deepcopy(base))
    for key, value in values.items():
        OmegaConf.update(raw, key, value, merge=False, force_add=True)
    cfg = build_config(raw)
    check_model_options(method_hparams_for(cfg, cfg.methods[0])[2])
    return cfg


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


def run_trial(trial, cfg: DictConfig, space: list[Param], folder: Path, scenario, data_root) -> float | None:
    """One trial: its config, then an ordinary run (``execute``) reporting the objective after each task."""

    optuna = optuna_module()
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

    results = runner.execute(trial_cfg, run_dir, data_root, show_progress=False, scenario=scenario, on_event=after_task)
    if results[method].get("diverged"):  # a non-finite loss (train.on_nan): the trial failed, whatever it scored
        raise AvclError(f"diverged: {divergence_text(results[method]['diverged'])}")
    return objective_value(results[method], name)



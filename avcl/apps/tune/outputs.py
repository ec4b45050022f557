"""What a search leaves beside the study, rewritten after every trial from the database: trials.csv, best.yaml
(the best method hyperparameters, ``key=@FILE``), objective.png."""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import yaml
from omegaconf import DictConfig

from avcl.apps.tune.study import best_trial
from avcl.apps.tune.trials import Param, describe_objective, objective_name
from avcl.core.io import atomic_write_text
from avcl.report.plots import plot_objective


def write_outputs(folder: Path, study, cfg: DictConfig, space: list[Param]) -> None:
    """The study as files (each written atomically): rewritten after every trial, from the database."""
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
    best = best_trial(study)
    if best is not None:
        atomic_write_text(folder / "best.yaml", best_yaml(folder, study, cfg, space, best))
    plot_objective(folder / "objective.png", trials, objective_name(cfg), cfg.tune.direction,
                   f"avcl tune: {cfg.name}, {cfg.tune.method}")


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
    finished = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED"))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    objective = describe_objective(cfg, study_attr(folder, "stream_tasks") or cfg.scenario.num_tasks)
    header = [f"# tuned: {study_attr(folder, 'command')}, {when},",
              f"#   objective {objective} = {best.value:.4f} (trial {best.number} of {finished} finished)",
              f"# use: {use_command(folder, cfg, space, best)}"]
    body = {p.name: best.params[p.name] for p in space if "." not in p.name}
    return "\n".join(header) + "\n" + (yaml.safe_dump(body, sort_keys=False) if body else "{}\n")


def study_attr(folder: Path, key: str):
    meta = folder / "tune.json"
    return json.loads(meta.read_text()).get(key) if meta.is_file() else None



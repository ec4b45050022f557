"""``avcl tune RECIPE method=NAME trials=N [key=value ...] --out DIR``: a hyperparameter search with Optuna over
the recipe's ``search.<method>`` space, on validation data only (avcl/apps/tune/, docs/tuning.md);
``--resume DIR`` continues a killed search, ``--jobs N`` runs N trials at once."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from avcl.apps import tune
from avcl.config import build_config, load_config, load_saved_config, save_config
from avcl.core.errors import AvclError


# Shorthands of the command line for the `tune` config keys.
SHORT = {"method": "tune.method", "trials": "tune.trials"}


def _items(items: list[str]) -> tuple[str | None, list[str]]:
    """(the recipe, the overrides with method=/trials= spelled as tune.method=/tune.trials=)."""
    names = [item for item in items if "=" not in item]
    if len(names) > 1:
        raise AvclError(f"one recipe at a time, got {names} (overrides are key=value)")
    overrides = []
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            overrides.append(f"{SHORT.get(key, key)}={value}")
    return (names[0] if names else None), overrides


def _tune(args) -> int:

    if args.jobs < 1:
        raise AvclError(f"--jobs must be >= 1, got {args.jobs}")
    if args.join and not args.resume:
        raise AvclError("--join works with --resume DIR: it joins the search DIR holds")
    if args.resume:
        folder = Path(args.resume)
        recipe, overrides = _items(args.items)
        others = [o for o in overrides if not o.startswith("tune.trials=")]
        if recipe or others or args.out:
            raise AvclError("--resume continues a search with its saved config: give no recipe, --out or overrides "
                            "(trials=N alone may raise the number of trials)")
        config_path = folder / "config.yaml"
        if not config_path.is_file() or not (folder / "tune.json").is_file():
            raise AvclError(f"cannot resume: {folder} holds no search (config.yaml, tune.json)")
        cfg = load_saved_config(config_path)
        if not cfg.tune.storage and not (folder / tune.STUDY_FILE).is_file():
            raise AvclError(f"cannot resume: {folder / tune.STUDY_FILE} not found")
        if overrides:
            cfg = build_config(OmegaConf.to_container(cfg), overrides)
    else:
        recipe, overrides = _items(args.items)
        cfg = load_config(recipe, overrides)
        folder = Path(args.out) if args.out else \
            Path("tune") / f"{cfg.name}-{cfg.tune.method or 'method'}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (folder / tune.STUDY_FILE).exists() or (folder / "config.yaml").exists():
            raise AvclError(f"{folder} already holds a search: use --resume {folder}, or another --out")
    space, scenario = tune.prepare(cfg, args.data_root)  # every refusal happens here, before a file is written
    if args.resume:
        if overrides:
            save_config(cfg, folder / "config.yaml")  # a later --resume goes on to the new number of trials
    else:
        tune.start(cfg, folder, recipe, "avcl tune " + " ".join(shlex.quote(a) for a in sys.argv[2:])
                   if sys.argv[1:2] == ["tune"] else "avcl tune " + " ".join(args.items))
    args.interrupt_hint = f"avcl tune --resume {folder}"
    study = tune.search(cfg, folder, space, scenario, args.data_root, args.jobs, join=args.join)
    best = tune.best_trial(study)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    print(f"avcl: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, {states.count('FAIL')} failed "
          f"trial(s) in {folder} (study.db, trials.csv, objective.png)", file=sys.stderr)
    if best is None:
        print("avcl: no trial completed: no best values", file=sys.stderr)
        return 1
    values = ", ".join(f"{k}={v}" for k, v in best.params.items())
    print(f"best: trial {best.number}, {tune.describe_objective(cfg, cfg.scenario.num_tasks)} = {best.value:.4f}\n"
          f"values: {values}\nwritten: {folder / 'best.yaml'}\n"
          f"use: {tune.use_command(folder, cfg, space, best)}")
    return 0


def register(subparsers) -> None:
    cmd = subparsers.add_parser("tune", help="search a method's hyperparameters (recipe `search:`) on validation data "
                                             "only, with Optuna")
    cmd.add_argument("items", nargs="*", metavar="RECIPE method=NAME trials=N [key=value ...]",
                     help="a recipe, the method whose search: space is searched, the number of trials, overrides")
    cmd.add_argument("--out", default=None, help="the search's folder (default: tune/<recipe>-<method>-<time>)")
    cmd.add_argument("--resume", default=None, metavar="DIR", help="continue a killed search (trials=N may raise N)")
    cmd.add_argument("--jobs", type=int, default=1, metavar="N", help="N trials at once, in worker processes")
    cmd.add_argument("--join", action="store_true",
                     help="with --resume: another machine works on the same study (tune.storage) now; leave its "
                          "running trials alone")
    cmd.add_argument("--data-root", default=None,
                     help="folder with the datasets (default: $AVCL_DATA_DIR, then ~/.cache/avcl)")
    cmd.set_defaults(func=_tune)

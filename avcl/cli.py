"""Command line: ``avcl run``, ``avcl list``, ``avcl report``.

Bad input (unknown recipe or key, wrong type, missing data) ends with one line on stderr
and exit code 2; no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from avcl.errors import AvclError


def _run(args) -> int:
    from avcl.config import load_config, load_saved_config, save_config
    from avcl.engine import distributed
    from avcl.engine.runner import check_run, make_scenario
    from avcl.engine.sweep import run_all, seed_configs
    from avcl.engine.progress import stage
    from avcl.eval.report import report

    if args.resume:
        run_dir = Path(args.resume)
        if args.items or args.out:
            raise AvclError("--resume continues a run with its saved config: give no recipe, overrides or --out")
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise AvclError(f"cannot resume: {config_path} not found (is {run_dir} a run directory?)")
        cfg = load_saved_config(config_path)
        distributed.setup(cfg.train)  # under torchrun: join the process group (a no-op in one process)
    else:
        names = [item for item in args.items if "=" not in item]  # the recipe, wherever it stands
        if len(names) > 1:
            raise AvclError(f"one recipe at a time, got {names} (overrides are key=value)")
        recipe = names[0] if names else None
        items = [item for item in args.items if "=" in item]
        cfg = load_config(recipe, items)
        distributed.setup(cfg.train)  # under torchrun: join the process group (a no-op in one process)
        if distributed.current() and not args.out:
            raise AvclError("several processes write one run directory: give it with --out DIR")
        run_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (run_dir / "config.yaml").exists():
            raise AvclError(f"{run_dir} already holds a run: use --resume {run_dir}, or another --out")
    if args.jobs < 1:
        raise AvclError(f"--jobs must be >= 1, got {args.jobs}")
    first = seed_configs(cfg, run_dir)[0][0]  # with seeds=[...]: the first seed's run stands for the checks
    scenario = make_scenario(first, args.data_root)  # data problems surface before anything is written
    stage("checking the run: model and data shapes, evaluation, init stage")
    check_run(first, scenario)
    distributed.check_world(first)
    if distributed.current() and args.jobs > 1:
        raise AvclError("--jobs N starts worker processes of its own: under torchrun leave it at 1 (the ranks "
                        "train each run together)")
    if args.dry_run:
        clips = sum(len(t.train["label"]) + len(t.val["label"]) + len(t.test["label"]) for t in scenario.tasks)
        print(f"avcl: dry run: '{cfg.name}' is valid: methods {list(cfg.methods)}, {len(scenario.tasks)} tasks, "
              f"{scenario.num_classes} classes, {clips} clips; nothing written (the run would go to {run_dir})")
        return 0
    distributed.barrier("checking the run")  # every rank has looked for config.yaml before rank 0 writes it
    main = distributed.is_main()  # several processes: rank 0 alone writes and prints
    if not args.resume and main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    args.run_dir = run_dir  # from here on, an interrupted run can be resumed (main's hint)
    if main:
        where = f" ({distributed.world()} processes)" if distributed.current() else ""
        print(f"avcl: run '{cfg.name}' -> {run_dir}{where}", file=sys.stderr)
    failed = run_all(cfg, run_dir, args.data_root, args.jobs, show_progress=not args.quiet, scenario=scenario)
    distributed.close()
    if not main:
        return 0
    print(report(run_dir))
    size = sum(path.stat().st_size for path in run_dir.rglob("*") if path.is_file())
    print(f"\nrun directory: {run_dir} ({size / 2**20:.1f} MiB"
          + ("" if cfg.train.keep_checkpoints else "; train.keep_checkpoints=true keeps each method's checkpoint")
          + ")")
    if failed:
        print(f"avcl: {failed} unit(s) failed (above); `avcl run --resume {run_dir}` runs them again",
              file=sys.stderr)
    return 1 if failed else 0


def _list(args) -> int:
    from avcl.config import list_recipes
    from avcl.data import DATASETS
    from avcl.methods import METHODS

    sections = [("recipes", list_recipes()),
                ("methods", {n: c.description for n, c in sorted(METHODS.items())}),
                ("datasets", {n: e.description for n, e in sorted(DATASETS.items())})]
    for title, entries in sections:
        print(f"{title}:")
        width = max((len(n) for n in entries), default=0)
        for name, description in entries.items():
            print(f"  {name.ljust(width)}  {description}")
    return 0


def _report(args) -> int:
    from avcl.eval.report import report
    print(report(Path(args.run_dir)))
    if args.html is not None:
        from avcl.eval.html import write_html
        print(f"\nhtml report: {write_html(Path(args.run_dir), args.html or None)}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="avcl", description="Continual learning of audio-visual models.")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe (default: avdigits) and print the results table")
    run.add_argument("items", nargs="*", metavar="[RECIPE] [key=value ...]",
                     help="a recipe name from recipes/ or a YAML path, then dotted overrides")
    run.add_argument("--data-root", default=None,
                     help="folder with the datasets (default: $AVCL_DATA_DIR, then ~/.cache/avcl)")
    run.add_argument("--out", default=None, help="run directory (default: runs/<recipe>-<time>)")
    run.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a killed run")
    run.add_argument("--quiet", action="store_true", help="no progress bar, no progress lines")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="run the methods x seeds in N worker processes, each with its share of the cores")
    run.add_argument("--dry-run", action="store_true",
                     help="validate the config, overrides and data (present, shapes), then exit; writes nothing")
    run.set_defaults(func=_run)
    lst = sub.add_parser("list", help="recipes, methods and datasets available")
    lst.set_defaults(func=_list)
    rep = sub.add_parser("report", help="print the results table of a run directory")
    rep.add_argument("run_dir")
    rep.add_argument("--html", nargs="?", const="", default=None, metavar="FILE",
                     help="also write one self-contained HTML page (default: RUN_DIR/report.html)")
    rep.set_defaults(func=_report)
    from avcl.commands import register_all
    register_all(sub)
    return top


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order (``avcl run RECIPE --out DIR k=v``): words
    argparse leaves over join the command's positional list (``items`` / ``overrides``)."""
    top = parser()
    args, extra = top.parse_known_args(argv)
    field = next((f for f in ("items", "overrides") if isinstance(getattr(args, f, None), list)), None)
    stray = [word for word in extra if field is None or word.startswith("-")]
    if stray:
        top.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        setattr(args, field, getattr(args, field) + extra)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `avcl list | head`: the reader left; say nothing more (as cat does)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's exit flush must not raise again
        return 141
    except AvclError as err:
        from avcl.engine import distributed
        if distributed.speaks(err):  # several processes: one line, from one rank
            resume = getattr(args, "run_dir", None)
            print(f"avcl: error: {str(err).replace('RUN_DIR', str(resume or 'RUN_DIR'))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = getattr(args, "run_dir", None)
        command = getattr(args, "interrupt_hint", None) or (f"avcl run --resume {resume}" if resume else None)
        hint = f"; continue with: {command}" if command else ""
        print(f"avcl: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``avcl run [RECIPE] [key=value ...]``: run a recipe (default: avdigits), then print its results table;
``--resume RUN_DIR`` continues a killed run, ``--dry-run`` checks everything and writes nothing."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from avcl import parallel
from avcl.apps.sweep import run_all, seed_configs
from avcl.config import load_config, load_saved_config, save_config
from avcl.core.errors import AvclError
from avcl.engine.checks import check_run
from avcl.engine.progress import stage
from avcl.engine.runner import make_scenario
from avcl.report.tables import report


def _run(args) -> int:
    if args.resume:
        run_dir = Path(args.resume)
        if args.items or args.out:
            raise AvclError("--resume continues a run with its saved config: give no recipe, overrides or --out")
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise AvclError(f"cannot resume: {config_path} not found (is {run_dir} a run directory?)")
        cfg = load_saved_config(config_path)
        parallel.setup(cfg.train)  # under torchrun: join the process group (a no-op in one process)
    else:
        names = [item for item in args.items if "=" not in item]  # the recipe, wherever it stands
        if len(names) > 1:
            raise AvclError(f"one recipe at a time, got {names} (overrides are key=value)")
        recipe = names[0] if names else None
        items = [item for item in args.items if "=" in item]
        cfg = load_config(recipe, items)
        parallel.setup(cfg.train)  # under torchrun: join the process group (a no-op in one process)
        if parallel.current() and not args.out:
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
    parallel.check_world(first)
    if parallel.current() and args.jobs > 1:
        raise AvclError("--jobs N starts worker processes of its own: under torchrun leave it at 1 (the ranks "
                        "train each run together)")
    if args.dry_run:
        clips = sum(len(t.train["label"]) + len(t.val["label"]) + len(t.test["label"]) for t in scenario.tasks)
        print(f"avcl: dry run: '{cfg.name}' is valid: methods {list(cfg.methods)}, {len(scenario.tasks)} tasks, "
              f"{scenario.num_classes} classes, {clips} clips; nothing written (the run would go to {run_dir})")
        return 0
    parallel.barrier("checking the run")  # every rank has looked for config.yaml before rank 0 writes it
    main = parallel.is_main()  # several processes: rank 0 alone writes and prints
    if not args.resume and main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    args.run_dir = run_dir  # from here on, an interrupted run can be resumed (main's hint)
    if main:
        where = f" ({parallel.world()} processes)" if parallel.current() else ""
        print(f"avcl: run '{cfg.name}' -> {run_dir}{where}", file=sys.stderr)
    failed = run_all(cfg, run_dir, args.data_root, args.jobs, show_progress=not args.quiet, scenario=scenario)
    parallel.close()
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
    diverged = diverged_rows(run_dir)
    if diverged:
        print(f"avcl: training diverged (a non-finite loss) for {', '.join(diverged)}: their rows are marked (!) "
              "and are not results", file=sys.stderr)
    return 1 if failed or diverged else 0


def diverged_rows(run_dir: Path) -> list[str]:
    """``method`` (or ``method, seed S``) of every row whose metrics.json records a divergence."""
    rows = []
    for path in sorted(run_dir.glob("**/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if metrics.get("diverged"):
            seed = path.parent.parent.name
            rows.append(path.parent.name + (f", {seed.replace('-', ' ')}" if seed.startswith("seed-") else ""))
    return rows


def register(sub) -> None:
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

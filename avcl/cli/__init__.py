"""Layer ``cli``: the ``avcl`` command line, one module per subcommand (``avcl run`` is ``cli/run.py``).

The top layer: it may import every other layer, and nothing imports it. A module here defines
``register(subparsers)``, which adds its subparser and sets ``func=handler`` (``handler(args) -> exit
code``). Bad input (unknown recipe or key, wrong type, missing data) raises AvclError: it ends as one
line on stderr and exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from avcl import parallel
from avcl.core.errors import AvclError


FIRST = ("run", "listing", "report")  # `avcl --help` lists these first, then the others by name


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="avcl", description="Continual learning of audio-visual models.")
    sub = top.add_subparsers(dest="command", required=True)
    others = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in FIRST)
    for name in (*FIRST, *others):
        importlib.import_module(f"{__name__}.{name}").register(sub)
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
        if parallel.speaks(err):  # several processes: one line, from one rank
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

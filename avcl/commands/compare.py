"""``avcl compare RUN [RUN ...]``: several runs side by side (one results table, rows "run: method",
and the config keys whose values differ); ``--html FILE`` also writes it as one page with the curves."""
from __future__ import annotations

from pathlib import Path


def _compare(args) -> int:
    from avcl.eval.html import compare_html, compare_text
    runs = [Path(d) for d in args.run_dirs]
    print(compare_text(runs))
    if args.html:
        from avcl.engine.checkpoint import atomic_write_text
        atomic_write_text(Path(args.html), compare_html(runs))
        print(f"\nhtml: {args.html}")
    return 0


def register(subparsers) -> None:
    cmd = subparsers.add_parser("compare", help="several run directories side by side: results and config differences")
    cmd.add_argument("run_dirs", nargs="+", metavar="RUN")
    cmd.add_argument("--html", default=None, metavar="FILE", help="also write one self-contained HTML page")
    cmd.set_defaults(func=_compare)

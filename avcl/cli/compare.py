"""``avcl compare RUN [RUN ...]``: several runs side by side (one results table, rows "run: method",
and the config keys whose values differ); ``--html FILE`` also writes it as one page with the curves."""
from __future__ import annotations

from pathlib import Path

from avcl.core.io import atomic_write_text
from avcl.report.html import compare_html, compare_text


def _compare(args) -> int:
    runs = [Path(d) for d in args.run_dirs]
    print(compare_text(runs))
    if args.html:
        atomic_write_text(Path(args.html), compare_html(runs))
        print(f"\nhtml: {args.html}")
    return 0


def register(subparsers) -> None:
    cmd = subparsers.add_parser("compare", help="several run directories side by side: results and config differences")
    cmd.add_argument("run_dirs", nargs="+", metavar="RUN")
    cmd.add_argument("--html", default=None, metavar="FILE", help="also write one self-contained HTML page")
    cmd.set_defaults(func=_compare)

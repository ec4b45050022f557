"""``avcl report RUN_DIR [--html [FILE]]``: the results table of a run directory (mean ± std over seeds)."""
from __future__ import annotations

from pathlib import Path

from avcl.report.html import write_html
from avcl.report.tables import report


def _report(args) -> int:
    print(report(Path(args.run_dir)))
    if args.html is not None:
        print(f"\nhtml report: {write_html(Path(args.run_dir), args.html or None)}")
    return 0


def register(sub) -> None:
    rep = sub.add_parser("report", help="print the results table of a run directory")
    rep.add_argument("run_dir")
    rep.add_argument("--html", nargs="?", const="", default=None, metavar="FILE",
                     help="also write one self-contained HTML page (default: RUN_DIR/report.html)")
    rep.set_defaults(func=_report)

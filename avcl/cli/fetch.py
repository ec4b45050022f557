"""``avcl fetch avdigits --to DIR [--from SRC]``: download and verify (sha256) the data a dataset
needs, ahead of time, for a machine without network (avcl/data/fetch.py). Then
``avcl run avdigits --data-root DIR`` (or ``AVCL_DATA_DIR=DIR``) finds it there."""
from __future__ import annotations

from avcl.core.errors import AvclError
from avcl.data import fetch


FETCHABLE = ("avdigits",)  # the other datasets are the user's videos or the AV-CIL release files


def _handler(args) -> int:
    if args.dataset not in FETCHABLE:
        raise AvclError(f"avcl fetch knows {', '.join(FETCHABLE)}, not '{args.dataset}' (the other datasets are "
                        "videos or feature files you provide: see docs/extraction.md and docs/avcil.md)")
    fetch.fetch_avdigits(args.to, args.source, fetch.FSDD_RECORDINGS_SHA256, fetch.MNIST_IDX_SHA256,
                         progress=not args.quiet, quiet=args.quiet)
    return 0


def register(subparsers) -> None:
    cmd = subparsers.add_parser(
        "fetch", help="download and verify (sha256) a dataset's files ahead of time, for an offline machine",
        description="Download and verify the data of DATASET into DIR (the layout --data-root reads).")
    cmd.add_argument("dataset", metavar="DATASET", help=f"one of: {', '.join(FETCHABLE)}")
    cmd.add_argument("--to", required=True, metavar="DIR", help="the data root to fill (created if needed)")
    cmd.add_argument("--from", dest="source", default=None, metavar="SRC",
                     help="a mirror URL (http://, https://, file://) or a local directory holding the archives "
                          "or a data root (fsdd/recordings/, mnist/); default: the official download URLs")
    cmd.add_argument("--quiet", action="store_true", help="no progress lines")
    cmd.set_defaults(func=_handler)

"""``avcl make-avdigits-videos OUT``: AV-Digits clips as MP4 files (H.264 + AAC) with a manifest CSV.

Then ``avcl extract OUT/manifest.csv --out OUT/features.h5 --preset avdigits --output avcil`` and
``avcl run files/avdigits data.store=OUT/features.h5`` train on them.
"""
from __future__ import annotations

from avcl.apps.avdigits_videos import VideoDigitsOptions, make_videos


def _make(args) -> int:
    opts = VideoDigitsOptions(per_class=args.per_class, test_per_class=args.test_per_class, seed=args.seed,
                              frames=args.frames, frame_size=args.frame_size, download=args.download)
    manifest = make_videos(args.out, opts, data_root=args.data_root)
    count = len(manifest.read_text().splitlines()) - 1
    print(f"{count} clips in {args.out}; manifest: {manifest}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("make-avdigits-videos", help="write AV-Digits clips as MP4 files with a manifest",
                                   description=__doc__.split("\n\n", 1)[1])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--per-class", type=int, default=0, help="training clips per digit (0: all 270)")
    parser.add_argument("--test-per-class", type=int, default=0,
                        help="test clips per digit (0: all 30, or per-class // 4 + 1 with --per-class)")
    parser.add_argument("--frames", type=int, default=8, help="frames per 1-second clip (= fps)")
    parser.add_argument("--frame-size", type=int, default=64, help="frame width and height in pixels (even)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None, help="where FSDD and MNIST are (default: $AVCL_DATA_DIR)")
    parser.add_argument("--download", action="store_true", help="download FSDD / MNIST when not found")
    parser.set_defaults(func=_make)

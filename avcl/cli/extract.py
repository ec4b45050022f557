"""``avcl extract DATASET [section.key=value ...] --out STORE``: video files -> features in avcl's feature store.

DATASET is a manifest CSV (``path,label[,split][,start,end]``), a folder with one subfolder per
class, or a benchmark list (AVE ``Annotations.txt``, a VGGSound or Kinetics-style CSV) with
``--video-dir``. ``--output raw`` stores the decoded inputs (uint8 frames, float16 fbank) instead
of encoder features, for the pre-training models (``--preset cav``). Bad files are reported one
line each and counted in the closing summary; they never change the exit code (0), only bad
arguments do (2). Running the same command again on an unfinished store resumes it.
"""
from __future__ import annotations

import sys

from avcl.apps.extract import OUTPUTS, PRESETS, extract, make_config
from avcl.data.store import COMPRESSIONS
from avcl.media.manifests import READERS, read_dataset


def _extract(args) -> int:

    config = make_config(args.preset, args.overrides, encoder=args.encoder, output=args.output,
                         snippets=args.snippets, workers=args.workers, batch_size=args.batch_size,
                         test_fraction=args.test_fraction, compression=args.compression)
    if args.weights:
        config.encoder_options.weights = args.weights
        config.check()
    dataset = read_dataset(args.dataset, video_dir=args.video_dir, kind=args.kind)
    if dataset.missing:
        print(f"{len(dataset.missing)} of {len(dataset.items)} clips of {args.dataset} have no file "
              f"under {args.video_dir} (e.g. {dataset.missing[0].path}); they are recorded as failed rows",
              file=sys.stderr)
    encoder = "no encoder" if config.output == "raw" else f"encoder '{config.encoder}'"
    print(f"extracting {len(dataset.items)} clips ({len(dataset.class_names)} classes) with preset "
          f"'{args.preset}' ({PRESETS[args.preset]().note}), {encoder}, output '{config.output}'",
          file=sys.stderr)
    summary = extract(dataset, args.out, config, report=lambda line: print(line, file=sys.stderr))
    print(summary.line(args.out))
    return 0


def register(subparsers) -> None:

    parser = subparsers.add_parser(
        "extract", help="decode video files and write their features to a feature store",
        description=__doc__.split("\n\n", 1)[1],
        epilog="overrides: decode.frames=16 decode.size=112 decode.gray=true decode.sampling=uniform|fps "
               "decode.fps=10 decode.sample_rate=16000 decode.missing_audio=silent|skip decode.audio=false "
               "audio.kind=fbank|logmel audio.num_bins=128 audio.target_frames=1024 audio.norm_mean=.. "
               "audio.norm_std=.. encoder.dim=128 encoder.seed=0 "
               "encoder.video_model=DIR encoder.audio_model=DIR (with --encoder hf)")
    parser.add_argument("dataset", help="manifest CSV, class-folder directory, or benchmark list")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="preprocessing/encoder settings, right after DATASET")
    parser.add_argument("--out", required=True, help="the feature store to write (.h5); resumed if unfinished")
    parser.add_argument("--video-dir", help="folder of the videos named by a benchmark list")
    parser.add_argument("--kind", choices=sorted(READERS), help="dataset list format (default: detected)")
    parser.add_argument("--preset", default="builtin", choices=sorted(PRESETS), help="preprocessing preset")
    parser.add_argument("--encoder", default="builtin", help="builtin (default: avcl's small encoders) or hf (VideoMAE + AST from local "
                             "directories, see encoder.video_model / encoder.audio_model)")
    parser.add_argument("--weights", help="checkpoint of an avcl model whose encoders to use (default: seeded init)")
    parser.add_argument("--output", default="clip", choices=OUTPUTS,
                        help="clip: one vector per modality; tokens: audio (L,D), video (T,P,D); snippets: (N,D); "
                             "avcil: audio (D,) + video (T,P,D) for model.name=avcil; raw: no encoder, the decoded "
                             "inputs: video uint8 (T,S,S,3), audio float16 fbank (frames,bins) (--preset cav)")
    parser.add_argument("--snippets", type=int, default=10, help="N for --output snippets")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0: decode in-process)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per encoder batch")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="share of clips without a split that go to 'test' (stable per clip id)")
    parser.add_argument("--compression", default="none", choices=COMPRESSIONS,
                        help="per-row compression of the store's fields (default none: the fastest random reads; "
                             "lzf/gzip: smaller files, measured in docs/scaling.md)")
    parser.set_defaults(func=_extract)

"""``avcl convert-features``: AV-CIL's released features -> an avcl feature store (HDF5).

Reads one dataset folder of the official layout (avcl/data/avcil_official.py; protocol
files through the restricted unpickler) and writes every train/val/test video as one row:
fields "audio" (Da,) and "video" (L, Dv), float16 by default, with labels, splits, the class
names in the official order and a manifest (source files with sizes and sha256, shapes,
dtypes). The default output is ``<dir>/avcl_features.h5``, which the ``avcil_official``
dataset then reads instead of the pickles and per-video HDF5 datasets. An interrupted
conversion resumes where it stopped.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from avcl.core.errors import AvclError
from avcl.core.io import file_sha256
from avcl.data.avcil_official import (FOLDERS, PROTOCOL_FILES, SPLITS, STORE_FILE, AVCILOfficialOptions, FeatureSource,
                                      locate, read_protocol)
from avcl.data.store import create_store


ROWS_PER_WRITE = 64  # rows gathered in memory before each write


def convert(dataset: str, root: str, out: str | None = None, protocol_root: str = "",
            dtype: str = "float16", checksums: bool = True, show_progress: bool = True) -> Path:
    """Write the store; returns its path."""


    if dtype not in ("float16", "float32"):
        raise AvclError(f"--dtype must be float16 or float32, got '{dtype}'")
    folder, protocol_folder = locate(AVCILOfficialOptions(dataset=dataset, root=root,
                                                          protocol_root=protocol_root), None)
    protocol = read_protocol(protocol_folder)
    ids = [vid for split in SPLITS for vid in protocol.ids[split]]
    labels = [label for split in SPLITS for label in protocol.labels[split]]
    splits = [split for split in SPLITS for _ in protocol.ids[split]]
    source = FeatureSource(folder, dataset, ids)
    try:
        files = [protocol_folder / name for name in PROTOCOL_FILES] + [source.audio_path, source.visual_path]
        manifest = {"source": f"AV-CIL released features ({dataset})", "dataset": dataset,
                    "folder": str(folder), "protocol_folder": str(protocol_folder),
                    "source_dtype": "float32",
                    "shapes": {"audio": list(source.audio_shape), "video": list(source.visual_shape)}}
        path = Path(out) if out else folder / STORE_FILE
        fields = {"audio": (source.audio_shape, dtype), "video": (source.visual_shape, dtype)}
        with create_store(path, ids, fields, labels=labels, splits=splits,
                          class_names=protocol.class_names, manifest=manifest) as writer:
            pending = writer.pending()
            for start in tqdm(range(0, len(pending), ROWS_PER_WRITE), disable=not show_progress,
                              desc="convert", unit_scale=ROWS_PER_WRITE):
                rows = pending[start:start + ROWS_PER_WRITE]
                read = [source.read(ids[r]) for r in rows]
                writer.write(rows, {"audio": np.stack([a for a, _ in read]).astype(dtype),
                                    "video": np.stack([v for _, v in read]).astype(dtype)})
            # Hashed once, by the run that completes the store (a resumed or refused run does not).
            writer.finalize(extra_manifest={"files": {
                str(f): {"bytes": f.stat().st_size, **({"sha256": file_sha256(f)} if checksums else {})}
                for f in files}})
    finally:
        source.close()
    return path


def _handler(args) -> int:
    path = convert(args.dataset, args.root, args.out, args.protocol_root, args.dtype,
                   not args.no_checksums, show_progress=not args.quiet)
    print(f"avcl: wrote {path}", file=sys.stderr)
    return 0


def register(subparsers) -> None:

    cmd = subparsers.add_parser("convert-features",
                                help="AV-CIL's released features (AVE, ksounds, VGGSound_100) -> avcl feature store")
    cmd.add_argument("--dataset", required=True, choices=list(FOLDERS))
    cmd.add_argument("--root", required=True,
                     help="folder holding AVE/, kinetics-sounds/ or VGGSound_100/ (the official data/)")
    cmd.add_argument("--protocol-root", default="",
                     help="folder holding <dataset dir>/ with the three protocol .npy files (default: --root)")
    cmd.add_argument("--out", default=None, help="store path (default: <root>/<dataset dir>/avcl_features.h5)")
    cmd.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    cmd.add_argument("--no-checksums", action="store_true", help="skip the sha256 of the source files")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(func=_handler)

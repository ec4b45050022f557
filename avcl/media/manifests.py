"""Datasets of video files: which clips, their labels, splits and time windows.

Readers (``read_dataset`` picks one from what it is given):

* CSV manifest with a header: ``path,label[,split][,start,end]`` (paths relative to the CSV);
* a folder with one subfolder per class (``train/``, ``val/``, ``test/`` level optional);
* AVE ``Annotations.txt`` (``Category&VideoID&Quality&StartTime&EndTime``; the whole 10-second
  video is the clip, as in AV-CIL, the event window is kept in ``ClipItem.event``; a video listed
  again under another category gets the id ``<VideoID>#1``, ``#2``, ...);
* VGGSound CSV: ``youtube_id,start_seconds,label[,split]`` or ``<file>.mp4,label`` (the released
  ``test.csv``; the split then comes from the file name when it is train/val/test);
* Kinetics-style CSV with a header: ``youtube_id,time_start,time_end,label,split`` (any order).

Benchmark lists name YouTube ids, not files: they are mapped onto the files under a video
folder by trying the usual namings (``<id>_<start:06d>_<end:06d>``, ``<id>_<start:06d>``,
``<id>_<start>_<end>``, ``<id>_<start>``, ``<id>``; any video extension, any subfolder).
Items whose file is not found are kept with ``missing=True`` so that extraction reports them.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from avcl.core.errors import AvclError


VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp", ".ogv")
SPLITS = ("train", "val", "test")


@dataclass
class ClipItem:
    id: str  # unique sample id (file path relative to the dataset, or the benchmark's video id)
    path: str  # the video file (the expected location when ``missing``)
    label: str
    split: str = ""  # train | val | test | "" (unknown)
    start: float | None = None  # window in seconds; None: from the beginning / to the end
    end: float | None = None
    missing: bool = False  # the benchmark names this clip but no file was found for it
    event: tuple[float, float] | None = None  # AVE: the annotated event's window


@dataclass
class ClipList:
    items: list[ClipItem]
    class_names: list[str]  # the class order (label index = position)
    source: str  # the file or folder it was read from
    kind: str  # manifest | folders | ave | vggsound | kinetics

    @property
    def missing(self) -> list[ClipItem]:
        return [item for item in self.items if item.missing]

    def label_index(self) -> list[int]:
        index = {name: i for i, name in enumerate(self.class_names)}
        return [index[item.label] for item in self.items]


def _split(value: str, where: str) -> str:
    value = (value or "").strip().lower()
    value = {"training": "train", "validation": "val", "validate": "val", "valid": "val", "testing": "test"}.get(value, value)
    if value not in ("", *SPLITS):
        raise AvclError(f"{where}: split must be train, val or test, got '{value}'")
    return value


def _float(value: str | None, where: str) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise AvclError(f"{where}: not a number: '{value}'") from None


def _sorted_classes(items: list[ClipItem]) -> list[str]:
    return sorted({item.label for item in items})


def read_manifest(path) -> ClipList:
    """CSV with a header naming at least ``path`` and ``label``."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise AvclError(f"{path}: a manifest needs a header with 'path' and 'label' columns (found {columns})")
        items, seen = [], set()
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            where = f"{path}:{line}"
            if not row["path"] or not row["label"]:
                raise AvclError(f"{where}: empty path or label")
            file = Path(row["path"]) if Path(row["path"]).is_absolute() else path.parent / row["path"]
            if row["path"] in seen:
                raise AvclError(f"{where}: '{row['path']}' listed twice")
            seen.add(row["path"])
            items.append(ClipItem(id=row["path"], path=str(file), label=row["label"],
                                  split=_split(row.get("split", ""), where),
                                  start=_float(row.get("start"), where), end=_float(row.get("end"), where)))
    if not items:
        raise AvclError(f"{path}: the manifest lists no clips")
    return ClipList(items, _sorted_classes(items), str(path), "manifest")


def _videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())


def read_folders(root) -> ClipList:
    """``root/<class>/**/<video>`` or ``root/<split>/<class>/**/<video>``."""
    root = Path(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    split_dirs = [p for p in subdirs if p.name in SPLITS]
    items = []
    for split_dir in split_dirs or [root]:
        split = split_dir.name if split_dirs else ""
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for video in _videos(class_dir):
                items.append(ClipItem(id=str(video.relative_to(root)), path=str(video), label=class_dir.name,
                                      split=split))
    if not items:
        raise AvclError(f"{root}: no videos found in class subfolders (extensions: {' '.join(VIDEO_EXTENSIONS)})")
    return ClipList(items, _sorted_classes(items), str(root), "folders")


class VideoIndex:
    """The video files under a folder by file stem (any extension, any subfolder)."""

    def __init__(self, folder):
        self.folder = Path(folder) if folder else None
        self.by_stem: dict[str, str] = {}
        if self.folder is not None:
            if not self.folder.is_dir():
                raise AvclError(f"video folder not found: {self.folder}")
            for dirpath, _, names in os.walk(self.folder):
                for name in sorted(names):
                    stem, ext = os.path.splitext(name)
                    if ext.lower() in VIDEO_EXTENSIONS:
                        self.by_stem.setdefault(stem, os.path.join(dirpath, name))

    def find(self, stems: list[str], expected: str | None = None) -> tuple[str, bool]:
        """(path, missing): the first stem that exists, else ``expected`` (default: the first stem) .mp4."""
        for stem in stems:
            if stem in self.by_stem:
                return self.by_stem[stem], False
        return str((self.folder or Path(".")) / f"{expected or stems[0]}.mp4"), True


def youtube_stems(video_id: str, start: float | None, end: float | None) -> list[str]:
    """The usual file namings of a YouTube clip, most specific first."""
    stems = []
    if start is not None:
        s = int(round(start))
        if end is not None:
            e = int(round(end))
            stems += [f"{video_id}_{s:06d}_{e:06d}", f"{video_id}_{s}_{e}"]
        stems += [f"{video_id}_{s:06d}", f"{video_id}_{s}"]
    return stems + [video_id]


def read_ave(path, video_dir=None) -> ClipList:
    path = Path(path)
    index = VideoIndex(video_dir)
    items, seen = [], {}
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        parts = text.strip().split("&")
        if len(parts) != 5:
            raise AvclError(f"{path}:{line}: expected Category&VideoID&Quality&StartTime&EndTime, got '{text}'")
        category, video_id, _quality, start, end = parts
        if line == 1 and video_id == "VideoID":  # header
            continue
        file, missing = index.find([video_id])
        repeats = seen.get(video_id, 0)
        seen[video_id] = repeats + 1
        items.append(ClipItem(id=f"{video_id}#{repeats}" if repeats else video_id, path=file, label=category,
                              missing=missing,
                              event=(_float(start, f"{path}:{line}"), _float(end, f"{path}:{line}"))))
    if not items:
        raise AvclError(f"{path}: no annotations")
    return ClipList(items, _sorted_classes(items), str(path), "ave")


def read_vggsound(path, video_dir=None) -> ClipList:
    """``youtube_id,start_seconds,label[,split]`` rows, or ``<id>_<start>.mp4,label`` rows."""
    path = Path(path)
    index = VideoIndex(video_dir)
    default_split = path.stem if path.stem in SPLITS else ""
    items = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row:
                continue
            where = f"{path}:{line}"
            row = [c.strip() for c in row]
            if line == 1 and row[0].lower() in ("youtube_id", "ytid", "# ytid", "file", "path"):
                continue
            if len(row) == 2 and Path(row[0]).suffix.lower() in VIDEO_EXTENSIONS:  # <id>_<start:06d>.mp4,label
                youtube_id, _, start = Path(row[0]).stem.rpartition("_")
                row = [youtube_id, start, row[1]]
            if len(row) not in (3, 4):
                raise AvclError(f"{where}: expected youtube_id,start_seconds,label[,split], got {row}")
            start = _float(row[1], where)
            stems = youtube_stems(row[0], start, start + 10)
            clip_id = f"{row[0]}_{int(start):06d}"
            file, missing = index.find(stems, expected=clip_id)
            # A file cut to the 10-second clip starts at 0; a full video needs the window.
            window = (start, start + 10) if Path(file).stem == row[0] else (None, None)
            items.append(ClipItem(id=clip_id, path=file, label=row[2], missing=missing,
                                  split=_split(row[3] if len(row) == 4 else default_split, where),
                                  start=window[0], end=window[1]))
    if not items:
        raise AvclError(f"{path}: no clips")
    return ClipList(items, _sorted_classes(items), str(path), "vggsound")


def read_kinetics(path, video_dir=None) -> ClipList:
    """Kinetics-style CSV with a header: youtube_id, time_start, time_end, label, split."""
    path = Path(path)
    index = VideoIndex(video_dir)
    items = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        need = {"youtube_id", "time_start", "time_end", "label"}
        if not need <= set(reader.fieldnames or []):
            raise AvclError(f"{path}: a Kinetics-style CSV needs columns {sorted(need)} (found {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            start, end = _float(row["time_start"], where), _float(row["time_end"], where)
            stems = youtube_stems(row["youtube_id"], start, end)
            file, missing = index.find(stems)
            window = (start, end) if Path(file).stem == row["youtube_id"] else (None, None)
            items.append(ClipItem(id=stems[0], path=file, label=row["label"].strip(), missing=missing,
                                  split=_split(row.get("split", ""), where), start=window[0], end=window[1]))
    if not items:
        raise AvclError(f"{path}: no clips")
    return ClipList(items, _sorted_classes(items), str(path), "kinetics")


def detect_kind(path: Path) -> str:
    """Which reader fits ``path``: by being a folder, by content of the first line."""
    if path.is_dir():
        return "folders"
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline().strip()
    if first.count("&") == 4:
        return "ave"
    header = [c.strip().lower() for c in next(csv.reader([first]), [])]
    if "path" in header and "label" in header:
        return "manifest"
    if {"youtube_id", "time_start", "time_end"} <= set(header):
        return "kinetics"
    if header and (len(header) in (3, 4) or (len(header) == 2 and Path(header[0]).suffix in VIDEO_EXTENSIONS)):
        return "vggsound"
    raise AvclError(f"{path}: not a known dataset list (a manifest CSV with path,label columns, a class-folder "
                    "directory, AVE Annotations.txt, a VGGSound CSV or a Kinetics-style CSV)")


READERS = {"manifest": read_manifest, "folders": read_folders, "ave": read_ave, "vggsound": read_vggsound,
           "kinetics": read_kinetics}


def read_dataset(source, video_dir=None, kind: str | None = None) -> ClipList:
    """Read a dataset list; ``kind`` (one of READERS) is detected when not given."""
    source = Path(source)
    if not source.exists():
        raise AvclError(f"dataset not found: {source}")
    kind = kind or detect_kind(source)
    if kind not in READERS:
        raise AvclError(f"unknown dataset kind '{kind}' (known: {', '.join(READERS)})")
    if kind in ("manifest", "folders"):
        if video_dir is not None:
            raise AvclError(f"--video-dir applies to benchmark lists (AVE, VGGSound, Kinetics), not to a {kind}")
        return READERS[kind](source)
    return READERS[kind](source, video_dir)

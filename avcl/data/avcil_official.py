"""Dataset ``avcil_official``: AV-CIL's released features and protocol files, as the authors ship them.

Layout (as in ``weiguoPian/AV-CIL_ICCV2023``), under ``data.root`` (the official repo's ``data/``
folder; default: the data root, ``--data-root`` / ``$AVCL_DATA_DIR``)::

    <dir>/category_encode_dict.npy       {class_name: class_index}; index order = class order
    <dir>/all_id_category_dict.npy       {split: {video_id: class_name}}
    <dir>/all_classId_vid_dict.npy       {split: {class_index: [video_id, ...]}}
    <dir>/audio_pretrained_feature/audio_pretrained_feature_dict.npy     {video_id: float32[Da]}
    <dir>/visual_pretrained_feature/visual_pretrained_feature_dict.npy   AVE: {video_id: float32[L, Dv]}
    <dir>/visual_pretrained_feature/visual_features.h5                   KS, VS100: one dataset per video_id

with <dir> = AVE | kinetics-sounds | VGGSound_100 for ``data.dataset`` = AVE | ksounds |
VGGSound_100. The ``.npy`` dicts are pickles: they are read with a restricted unpickler that
admits only numpy's array reconstruction and plain builtins (never ``allow_pickle=True``).
``data.protocol_root`` may point elsewhere for the three protocol files (e.g. the copies in
``meta/avcil/`` of avcl's shared data).

Samples: "audio" (N, Da), "video" (N, L, Dv) (L = T*P tokens, 1568 for VideoMAE),
"label" (class index). When an avcl feature store made by ``avcl convert-features`` exists
(``data.store``, default ``<dir>/avcl_features.h5``) it is read instead: same samples, much
faster. Deviation from the official loaders: features are held in memory as ``data.dtype``
(float16 by default; the official code keeps float32 and re-reads them every epoch).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from avcl.core.errors import AvclError
from avcl.data import AVDataset, register_dataset
from avcl.data.features import FeaturesOptions, build_features, torch_dtype
from avcl.data.sources import data_roots
from avcl.data.stream import ResidencyOptions


FOLDERS = {"AVE": "AVE", "ksounds": "kinetics-sounds", "VGGSound_100": "VGGSound_100"}
SPLITS = ("train", "val", "test")
PROTOCOL_FILES = ("category_encode_dict.npy", "all_id_category_dict.npy", "all_classId_vid_dict.npy")
AUDIO_FILE = "audio_pretrained_feature/audio_pretrained_feature_dict.npy"
VISUAL_DICT_FILE = "visual_pretrained_feature/visual_pretrained_feature_dict.npy"  # AVE
VISUAL_H5_FILE = "visual_pretrained_feature/visual_features.h5"  # ksounds, VGGSound_100
STORE_FILE = "avcl_features.h5"


@dataclass
class AVCILOfficialOptions(ResidencyOptions):
    name: str = "avcil_official"
    dataset: str = "AVE"  # AVE | ksounds | VGGSound_100
    root: str = ""  # folder holding <dir>/ (the official data/); "" = the data root
    protocol_root: str = ""  # folder holding <dir>/ with the three protocol .npy files; "" = root
    store: str = ""  # avcl feature store; "" = <root>/<dir>/avcl_features.h5 when it exists
    dtype: str = "float16"  # features in memory: float32 | float16 | bfloat16


# ----- restricted unpickling --------------------------------------------------------------------
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]  # numpy's _reconstruct, whatever module it lives in
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # pickles written by numpy < 2
            ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy >= 2
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only numpy arrays, dtypes and plain builtins (dict, list, str, numbers): no code runs."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_pickled_npy(path: Path):
    """The object inside a ``.npy`` written by ``np.save(path, obj)`` (a pickled dict), read safely."""
    path = Path(path)
    if not path.is_file():
        raise AvclError(f"missing file: {path}")
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = read_header(handle)
        except ValueError as err:
            raise AvclError(f"{path}: not a .npy file ({err})") from None
        if dtype != np.dtype(object):
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
        try:
            array = _RestrictedUnpickler(handle, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
            raise AvclError(f"{path}: malformed or unsafe pickle ({err})") from None
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise AvclError(f"{path}: expected a pickled numpy array of shape {shape}")
    return array.item() if array.shape == () else array


# ----- protocol --------------------------------------------------------------------------------
@dataclass
class Protocol:
    class_names: list[str]  # in class-index order
    ids: dict[str, list[str]]  # split -> video ids (class by class, in the files' order)
    labels: dict[str, list[int]]  # split -> class index of each id


def _expect_dict(value, path: Path, what: str) -> dict:
    if not isinstance(value, dict):
        raise AvclError(f"{path}: expected {what}, got {type(value).__name__}")
    return value


def read_protocol(folder: Path) -> Protocol:
    """The three protocol files of one dataset folder, checked against each other."""
    folder = Path(folder)
    encode_path, id_path, class_path = (folder / name for name in PROTOCOL_FILES)
    encode = _expect_dict(load_pickled_npy(encode_path), encode_path, "{class_name: class_index}")
    if sorted(encode.values()) != list(range(len(encode))):
        raise AvclError(f"{encode_path}: class indices must be 0..{len(encode) - 1}")
    class_names = sorted(encode, key=encode.get)
    id_category = _expect_dict(load_pickled_npy(id_path), id_path, "{split: {video_id: class_name}}")
    class_ids = _expect_dict(load_pickled_npy(class_path), class_path, "{split: {class_index: [video_id]}}")
    ids, labels = {}, {}
    for split in SPLITS:
        for path, table in ((id_path, id_category), (class_path, class_ids)):
            if split not in table:
                raise AvclError(f"{path}: no '{split}' split (found: {sorted(table)})")
        ids[split], labels[split] = [], []
        for index in sorted(class_ids[split]):
            if index not in range(len(class_names)):
                raise AvclError(f"{class_path}: unknown class index {index!r} in split '{split}'")
            ids[split] += list(class_ids[split][index])
            labels[split] += [int(index)] * len(class_ids[split][index])
        named = {vid: encode.get(name) for vid, name in id_category[split].items()}
        if named != dict(zip(ids[split], labels[split])):
            raise AvclError(f"{id_path} and {class_path} disagree on the '{split}' split")
    return Protocol(class_names, ids, labels)


# ----- features ---------------------------------------------------------------------------------
class FeatureSource:
    """Per-video audio and visual features of one dataset folder in the official layout.

    Opening checks that every id of ``ids`` has both features (one error naming the missing ones);
    ``read`` checks every video's shapes against the first one's.
    """

    def __init__(self, folder: Path, dataset: str, ids: list[str]):
        self.folder = Path(folder)
        self.audio_path = self.folder / AUDIO_FILE
        self.audio = _expect_dict(load_pickled_npy(self.audio_path), self.audio_path, "{video_id: array}")
        self.h5 = None
        if dataset == "AVE":
            self.visual_path = self.folder / VISUAL_DICT_FILE
            self.visual = _expect_dict(load_pickled_npy(self.visual_path), self.visual_path, "{video_id: array}")
        else:
            self.visual_path = self.folder / VISUAL_H5_FILE
            if not self.visual_path.is_file():
                raise AvclError(f"missing file: {self.visual_path}")
            self.h5 = self.visual = h5py.File(self.visual_path, "r")
        for path, table in ((self.audio_path, self.audio), (self.visual_path, self.visual)):
            missing = [vid for vid in ids if vid not in table]
            if missing:
                self.close()
                raise AvclError(f"{path}: no features for {len(missing)} video id(s), e.g. {missing[:5]}")
        self.audio_shape = tuple(np.shape(self.audio[ids[0]]))
        self.visual_shape = tuple(self.visual[ids[0]].shape)

    def read(self, vid: str) -> tuple[np.ndarray, np.ndarray]:
        audio, visual = np.asarray(self.audio[vid]), np.asarray(self.visual[vid][()])
        if (audio.shape, visual.shape) != (self.audio_shape, self.visual_shape):
            raise AvclError(f"video id {vid}: feature shapes {audio.shape}, {visual.shape} differ from the "
                            f"first video's {self.audio_shape}, {self.visual_shape} "
                            f"({self.audio_path}, {self.visual_path})")
        return audio, visual

    def close(self) -> None:
        if self.h5 is not None:
            self.h5.close()


def locate(opts: AVCILOfficialOptions, data_root: str | None) -> tuple[Path, Path]:
    """(feature folder, protocol folder) of ``opts.dataset``."""
    if opts.dataset not in FOLDERS:
        raise AvclError(f"data.dataset must be one of {list(FOLDERS)}, got '{opts.dataset}'")
    roots = [Path(opts.root).expanduser()] if opts.root else data_roots(data_root)
    if not roots:
        raise AvclError("avcil_official: no data folder; set data.root, --data-root or $AVCL_DATA_DIR "
                        "to the folder holding AVE/, kinetics-sounds/ or VGGSound_100/")
    folder = roots[0] / FOLDERS[opts.dataset]
    protocol = Path(opts.protocol_root).expanduser() / FOLDERS[opts.dataset] if opts.protocol_root else folder
    return folder, protocol


@register_dataset("avcil_official", AVCILOfficialOptions,
                  "AV-CIL's released features (AVE, Kinetics-Sounds, VGGSound-100) in the authors' layout")
def build_avcil_official(opts: AVCILOfficialOptions, data_root: str | None, seed: int) -> AVDataset:
    dtype = torch_dtype(opts.dtype)
    folder, protocol_folder = locate(opts, data_root)
    store = Path(opts.store).expanduser() if opts.store else folder / STORE_FILE
    if opts.store or store.is_file():
        dataset = build_features(FeaturesOptions(store=str(store), dtype=opts.dtype, val_fraction=0.0),
                                 data_root, seed)
        dataset.name = f"avcil_official/{opts.dataset}"
        return dataset
    try:
        protocol = read_protocol(protocol_folder)
        all_ids = [vid for split in SPLITS for vid in protocol.ids[split]]
        source = FeatureSource(folder, opts.dataset, all_ids)
    except AvclError as err:
        if not str(err).startswith("missing file"):
            raise
        raise AvclError(f"{err}: neither the feature store {store} nor the authors' released files are there; "
                        f"put AV-CIL's data/{FOLDERS[opts.dataset]}/ under --data-root (or $AVCL_DATA_DIR), then "
                        f"convert it once with `avcl convert-features --dataset {opts.dataset} --root DATA_ROOT` "
                        "(docs/avcil.md)") from None
    try:
        audio_shape, visual_shape = source.audio_shape, source.visual_shape
        splits = {}
        for split in SPLITS:
            ids = protocol.ids[split]
            audio = torch.empty((len(ids), *audio_shape), dtype=dtype)
            video = torch.empty((len(ids), *visual_shape), dtype=dtype)
            for row, vid in enumerate(ids):  # row by row: never a float32 copy of a whole split
                a, v = source.read(vid)
                audio[row], video[row] = torch.from_numpy(a), torch.from_numpy(v)
            splits[split] = {"audio": audio, "video": video,
                             "label": torch.tensor(protocol.labels[split], dtype=torch.long)}
    finally:
        source.close()
    return AVDataset(name=f"avcil_official/{opts.dataset}", class_names=protocol.class_names, **splits,
                     info={"folder": str(folder), "protocol": str(protocol_folder),
                           "audio_shape": list(audio_shape), "visual_shape": list(visual_shape)})


def write_synthetic_layout(root, dataset: str = "AVE", num_classes: int = 8,
                           per_class: tuple[int, int, int] = (20, 4, 6), audio_dim: int = 16,
                           tokens: int = 8, video_dim: int = 16, noise: float = 1.0, seed: int = 0) -> Path:
    """Write learnable random features and protocol files in the exact official layout (tests, benchmarks).

    Each class has an audio prototype and a visual token prototype; a video is its class's
    prototypes plus Gaussian noise of std ``noise``. Returns ``root/<dir>``.
    """

    rng = np.random.default_rng(seed)
    folder = Path(root) / FOLDERS[dataset]
    (folder / "audio_pretrained_feature").mkdir(parents=True, exist_ok=True)
    (folder / "visual_pretrained_feature").mkdir(parents=True, exist_ok=True)
    names = [f"class {c}" for c in range(num_classes)]
    audio_proto = rng.standard_normal((num_classes, audio_dim)).astype(np.float32)
    visual_proto = rng.standard_normal((num_classes, tokens, video_dim)).astype(np.float32)
    id_category, class_ids, audio, visual = {}, {}, {}, {}
    for split, count in zip(SPLITS, per_class):
        id_category[split], class_ids[split] = {}, {}
        for c in range(num_classes):
            ids = [f"{split[:2]}{c:03d}{i:05d}x" for i in range(count)]  # 11 chars, like YouTube ids
            if dataset == "VGGSound_100":
                ids = [f"{vid}_{i:06d}" for i, vid in enumerate(ids)]
            class_ids[split][c] = ids
            for vid in ids:
                id_category[split][vid] = names[c]
                audio[vid] = audio_proto[c] + noise * rng.standard_normal(audio_dim).astype(np.float32)
                visual[vid] = visual_proto[c] + noise * rng.standard_normal((tokens, video_dim)).astype(np.float32)
    for name, value in zip(PROTOCOL_FILES, ({n: i for i, n in enumerate(names)}, id_category, class_ids)):
        np.save(folder / name, value)  # writing pickles is safe; only reading them needs care
    np.save(folder / AUDIO_FILE, audio)
    if dataset == "AVE":
        np.save(folder / VISUAL_DICT_FILE, visual)
    else:
        with h5py.File(folder / VISUAL_H5_FILE, "w") as h5:
            for vid, value in visual.items():
                h5.create_dataset(vid, data=value)
    return folder

"""The reader of AV-CIL's released layout: synthetic files in the exact layout, and the real protocol files."""
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from avcl.data import build_dataset
from avcl.data.avcil_official import (AUDIO_FILE, FOLDERS, VISUAL_H5_FILE, AVCILOfficialOptions,
                                      load_pickled_npy, read_protocol, write_synthetic_layout)
from avcl.core.errors import AvclError
from conftest import needs_data


@pytest.mark.parametrize("dataset", list(FOLDERS))
def test_reads_the_official_layout(tmp_path, dataset):
    folder = write_synthetic_layout(tmp_path, dataset, num_classes=3, per_class=(4, 2, 3), audio_dim=5,
                                    tokens=6, video_dim=7)
    data = build_dataset(AVCILOfficialOptions(dataset=dataset, root=str(tmp_path), dtype="float32"), None, 0)
    assert data.class_names == ["class 0", "class 1", "class 2"]
    assert data.train["audio"].shape == (12, 5) and data.train["video"].shape == (12, 6, 7)
    assert data.test["label"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Row k holds the features of the k-th id of the protocol, exactly.
    vid = read_protocol(folder).ids["val"][3]
    assert vid == pickle_free_ids(folder)["val"][3]
    audio = load_pickled_npy(folder / AUDIO_FILE)[vid]
    torch.testing.assert_close(data.val["audio"][3], torch.from_numpy(audio))
    if dataset != "AVE":
        with h5py.File(folder / VISUAL_H5_FILE) as h5:
            torch.testing.assert_close(data.val["video"][3], torch.from_numpy(h5[vid][()]))


def pickle_free_ids(folder: Path) -> dict:
    """The ids in protocol order, via numpy's own (unrestricted) loader: a cross-check of the reader."""
    table = np.load(folder / "all_classId_vid_dict.npy", allow_pickle=True).item()
    return {split: [v for c in sorted(table[split]) for v in table[split][c]] for split in table}


def test_class_order_is_the_encode_dict_index_order(tmp_path):
    folder = write_synthetic_layout(tmp_path, "AVE", num_classes=3, per_class=(2, 1, 1))
    np.save(folder / "category_encode_dict.npy", {"class 2": 2, "class 0": 0, "class 1": 1})
    assert read_protocol(folder).class_names == ["class 0", "class 1", "class 2"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_code_in_pickles(tmp_path):
    path = tmp_path / "category_encode_dict.npy"
    np.save(path, np.array({"a": Evil()}, dtype=object))
    with pytest.raises(AvclError, match="unsafe pickle.*system"):
        load_pickled_npy(path)


def test_missing_file_and_missing_video_are_named(tmp_path):
    folder = write_synthetic_layout(tmp_path, "ksounds", num_classes=2, per_class=(2, 1, 1))
    with h5py.File(folder / VISUAL_H5_FILE, "a") as h5:
        gone = sorted(h5)[0]
        del h5[gone]
    options = AVCILOfficialOptions(dataset="ksounds", root=str(tmp_path))
    with pytest.raises(AvclError, match=f"visual_features.h5: no features for 1 video id.*{gone}"):
        build_dataset(options, None, 0)
    (folder / "all_id_category_dict.npy").unlink()
    with pytest.raises(AvclError, match="missing file: .*all_id_category_dict.npy"):
        build_dataset(options, None, 0)
    with pytest.raises(AvclError, match="data.dataset must be one of"):
        build_dataset(AVCILOfficialOptions(dataset="kinetics", root=str(tmp_path)), None, 0)


def test_truncated_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.array({"a": np.zeros(3)}, dtype=object))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AvclError, match="malformed"):
        load_pickled_npy(path)


@needs_data
@pytest.mark.parametrize("folder, classes, sizes", [
    ("AVE", 28, (3294, 391, 394)), ("kinetics-sounds", 30, (19220, 1947, 1958)),
    ("VGGSound_100", 100, (51195, 5000, 5000))])
def test_real_protocol_files(folder, classes, sizes):
    protocol = read_protocol(Path(os.environ["AVCL_DATA_DIR"]) / "meta" / "avcil" / folder)
    assert len(protocol.class_names) == classes
    assert tuple(len(protocol.ids[s]) for s in ("train", "val", "test")) == sizes
    assert sorted(set(protocol.labels["test"])) == list(range(classes))
    if folder == "VGGSound_100":
        assert protocol.class_names[14] == "subway, metr"  # the official truncation, kept as is
    if folder == "AVE":
        assert protocol.class_names[:2] == ["Acoustic guitar", "Cat"]

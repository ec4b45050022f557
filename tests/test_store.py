"""The feature store: resumable writes, completeness, reading back; the `features` dataset."""
import numpy as np
import pytest
import torch

from avcl.config import load_config
from avcl.data import build_dataset
from avcl.data.store import FAILED, create_store, open_store
from avcl.core.errors import AvclError

FIELDS = {"audio": ((4,), "float16"), "video": ((2, 3, 5), "float16")}


def make_store(path, n=12, finish=True):
    ids = [f"v{i}" for i in range(n)]
    labels = [i % 3 for i in range(n)]
    splits = ["train" if i < 9 else "test" for i in range(n)]
    with create_store(path, ids, FIELDS, labels=labels, splits=splits, class_names=["a", "b", "c"],
                      manifest={"encoder": "toy"}) as writer:
        writer.write(np.arange(n), {"audio": np.arange(n * 4).reshape(n, 4),
                                    "video": np.ones((n, 2, 3, 5))})
        if finish:
            writer.finalize({"done_by": "test"})
    return ids


def test_roundtrip(tmp_path):
    ids = make_store(tmp_path / "s.h5")
    store = open_store(tmp_path / "s.h5")
    assert store.complete and store.ids == ids and store.class_names == ["a", "b", "c"]
    assert store.manifest == {"encoder": "toy", "done_by": "test"}
    audio = store.load("audio", rows=[5, 1, 2])
    assert audio.dtype == torch.float32 and audio[0].tolist() == [4, 5, 6, 7]  # rows come back sorted
    assert store.fields["video"] == ((2, 3, 5), "float16")


def test_resume_keeps_written_rows_and_refuses_pending_finalize(tmp_path):
    path = tmp_path / "s.h5"
    ids = [f"v{i}" for i in range(4)]
    with create_store(path, ids, FIELDS) as writer:
        writer.write(0, {"audio": np.full(4, 7.0), "video": np.zeros((2, 3, 5))})
        writer.fail(1, "corrupt file")
        with pytest.raises(AvclError, match="pending"):
            writer.finalize()
    with create_store(path, ids, FIELDS) as again:  # reopened, not recreated
        assert again.done.tolist() == [True, True, False, False]
        assert again.pending().tolist() == [2, 3]
        again.write([3, 2], {"audio": np.zeros((2, 4)), "video": np.zeros((2, 2, 3, 5))},
                    masks={"audio": [False, True]})
        again.finalize()
    store = open_store(path)
    assert store.load("audio", rows=[0])[0].tolist() == [7.0] * 4
    assert store.status[1] == FAILED and store.errors == {1: "corrupt file"}
    assert store.mask("audio").tolist() == [True, False, True, False]
    with pytest.raises(AvclError, match="complete"):
        create_store(path, ids, FIELDS)
    with pytest.raises(AvclError, match="different"):
        create_store(tmp_path / "other.h5", ids, FIELDS).close()
        create_store(tmp_path / "other.h5", ids[:2], FIELDS)


def test_not_a_store(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(AvclError, match="bad.h5"):
        open_store(bad)
    with pytest.raises(AvclError, match="not found"):
        open_store(tmp_path / "missing.h5")


def test_features_dataset_holds_out_validation(tmp_path):
    make_store(tmp_path / "s.h5")
    cfg = load_config("synthetic", ["data.name=features", f"data.store={tmp_path / 's.h5'}", "data.val_fraction=0.34",
                                    "scenario.num_tasks=1"])
    dataset = build_dataset(cfg.data, None, 0)
    assert len(dataset.train["label"]) == 6 and len(dataset.val["label"]) == 3 and len(dataset.test["label"]) == 3
    assert dataset.train["video"].shape[1:] == (2, 3, 5) and dataset.class_names == ["a", "b", "c"]


def test_features_dataset_refuses_unfinished_store(tmp_path):
    make_store(tmp_path / "s.h5", finish=False)
    cfg = load_config("synthetic", ["data.name=features", f"data.store={tmp_path / 's.h5'}"])
    with pytest.raises(AvclError, match="not finished"):
        build_dataset(cfg.data, None, 0)
